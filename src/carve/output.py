"""Atomic output directories: written under a hidden temporary name, renamed when complete, so
Ctrl-C or a crash never leaves a half-written output."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carve.errors import UsageError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise UsageError(f"output {str(path)!r} already exists: choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is not a directory")
    return path


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    path = check_output(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.carve-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.carve-old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
