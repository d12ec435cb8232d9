"""A minimal W3C WebDriver client for headless Chromium (Debian's chromium + chromium-driver),
standard library only: open a page, run JavaScript, read the network log, take a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

DRIVERS = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
BROWSERS = ("chromium", "/usr/bin/chromium", "chromium-browser")


def find(names: tuple[str, ...]) -> str | None:
    for n in names:
        p = shutil.which(n) or (n if Path(n).is_file() else None)
        if p:
            return p
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Chromium:
    """`with Chromium() as b: b.open(path); b.js("return 1")`."""

    def __init__(self, width: int = 1200, height: int = 900) -> None:
        driver, browser = find(DRIVERS), find(BROWSERS)
        if driver is None or browser is None:
            raise RuntimeError(
                "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
            )
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": browser,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            f"--window-size={width},{height}",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--disable-default-apps",
                        ],
                    },
                    "goog:loggingPrefs": {"performance": "ALL"},
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def _s(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, path: str | Path) -> None:
        self._s("POST", "/url", {"url": Path(path).resolve().as_uri()})

    def js(self, script: str) -> Any:
        return self._s("POST", "/execute/sync", {"script": script, "args": []})

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network stack for (Network.requestWillBeSent events)."""
        entries = self._s("POST", "/se/log", {"type": "performance"})
        urls = []
        for e in entries:
            msg = json.loads(e["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        return urls

    def screenshot(self, path: str | Path) -> None:
        Path(path).write_bytes(base64.b64decode(self._s("GET", "/screenshot")))

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
