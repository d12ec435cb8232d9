"""Concurrency (issue 20): one run at a time per output. A second run on an output another run
holds fails at once with one line; when the holder dies, the kernel releases its lock and the
next run proceeds; temporaries of dead runs are removed (and said) by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from carve.cli.main import main

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]


def _argv(model_dir: Path, corpus: Path, out: Path) -> list[str]:
    return ["extract", "--model", str(model_dir), "--domain", str(corpus), "--general", str(corpus),
            "--method", "magnitude", "--out", str(out), *FAST]  # fmt: skip


def _holder(path: Path) -> subprocess.Popen:
    """Another process holding `path` (as a running job does), until killed."""
    code = f"import sys, time\nfrom carve.output import claim\nwith claim({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(300)\n"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_at_once_while_the_first_holds_the_output(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(_argv(model_dir, small_corpus, out)) == 2
        err = capsys.readouterr().err
        assert f"is being written by another carve run (pid {holder.pid})" in err and err.count("\n") == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, the holder's lock untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: the kernel dropped its lock, the next run proceeds
    assert main(_argv(model_dir, small_corpus, out)) == 0
    assert (out / "carve.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_two_runs_started_together(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """Exactly one writes the output; the other fails with one line (held, or already exists)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "carve.cli.main", *_argv(model_dir, small_corpus, out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert "being written by another carve run" in err or "already exists" in err, err
    assert "Traceback" not in err
    assert (out / "carve.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_a_dead_runs_temporaries_are_removed_by_the_next_run(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.carve-tmp-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2**20)
    stale_file = tmp_path / ".mask.safetensors.carve-tmp-999999"
    stale_file.write_bytes(b"half a mask")
    assert main([*_argv(model_dir, small_corpus, out), "--save-mask", str(tmp_path / "mask.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "removed .out.carve-tmp-999999 (1.0 MB), left by an interrupted run" in err
    assert "removed .mask.safetensors.carve-tmp-999999" in err
    assert not stale.exists() and not stale_file.exists()


def test_interrupted_swap_is_put_back(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """A replacement killed between its two renames (systems without an atomic exchange) leaves the
    old output aside; the next run puts it back before deciding anything."""
    out = tmp_path / "out"
    assert main(_argv(model_dir, small_corpus, out)) == 0
    out.rename(tmp_path / ".out.carve-old-999999")
    assert main(_argv(model_dir, small_corpus, out)) == 2  # the old output is back: it exists
    assert (out / "carve.json").is_file()


def test_dead_temporaries_in_the_eval_cache_are_removed(
    tmp_path: Path, model_dir: Path, small_corpus: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CARVE_CACHE_DIR", str(cache))
    (cache / "eval").mkdir(parents=True)
    dead = cache / "eval" / ".abc.json.carve-tmp-999999"
    live = cache / "eval" / f".def.json.carve-tmp-{os.getpid()}"
    dead.write_text("{")
    live.write_text("{")
    assert main(_argv(model_dir, small_corpus, tmp_path / "out")) == 0
    assert not dead.exists() and live.exists()
