"""Crash safety (issue 20): a job killed at any one of its file-system writes (an output, a
checkpoint, a manifest, a lock, a removal) leaves the old output or the new one, complete, and the
next run succeeds and leaves nothing behind.  tests/crash_driver.py kills a forked child with
os._exit at the n-th write, for every n (no exception handler runs, as with kill -9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

DRIVER = Path(__file__).with_name("crash_driver.py")
FAST = ["--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet"]


def _drive(tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    spec_file, report = tmp_path / "spec.json", tmp_path / "report.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(DRIVER), str(spec_file), str(report)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def _check(report: dict[str, Any]) -> None:
    reference = report["reference"]
    assert report["writes"] >= 10 and reference["complete"]
    killed = [r for r in report["results"] if r["code"] == 137]
    assert len(killed) >= report["writes"] - 3, "most kill points were never reached"
    for r in report["results"]:
        n = r["n"]
        # the last writes vary from run to run (a lock file's removal, a cache entry): a run that ends
        # before its n-th write is a run that completed
        assert r["code"] in (137, 0), f"write {n}: the child failed ({r['code']})"
        # an output existed before the kill: a reader finds it, complete, old or new (same weights here)
        assert r["after"] == reference, f"write {n}: after the kill the output is {r['after']}"
        assert r["rerun_code"] == 0, f"write {n}: the next run failed: {r['rerun_error']}"
        assert r["final"] == reference, f"write {n}: the next run wrote {r['final']}"
        assert r["leftovers"] == [], f"write {n}: left behind {r['leftovers']}"


def test_extract_killed_at_every_write(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "out"
    argv = ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--method", "magnitude", "--no-speed", "--out", str(out), "--overwrite", *FAST,
            "--save-mask", str(tmp_path / "mask.safetensors")]  # fmt: skip
    report = _drive(tmp_path, {"argv": argv, "out": str(out)})
    _check(report)
    assert not any(p.name.startswith(".mask.safetensors.") for p in tmp_path.iterdir())


def test_finetune_killed_at_every_write_resumes_to_the_same_model(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    """Checkpoints every step: a kill inside a checkpoint's write leaves the previous checkpoint or
    the new one; --resume from it gives the same weights as the uninterrupted run."""
    out = tmp_path / "ft"
    argv = ["finetune", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus),
            "--trainable", "random", "--steps", "3", "--checkpoint-every", "1", "--out", str(out), "--overwrite",
            "--no-cache", *FAST]  # fmt: skip
    report = _drive(tmp_path, {"argv": argv, "out": str(out), "resume_argv": [*argv, "--resume"]})
    _check(report)
    assert any(r["resumed"] for r in report["results"]), "no kill left a checkpoint to resume"
    assert not (tmp_path / "ft.checkpoint").exists()
