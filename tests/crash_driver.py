"""Kill a carve command at each of its file-system writes in turn, as `kill -9` would, and record
what it left and whether the next run succeeds (used by test_crash_safety.py).

    python tests/crash_driver.py SPEC.json REPORT.json

SPEC: {"argv": [...], "out": DIR, "rerun": [...] (argv of the next run, default argv),
       "resume_argv": [...] (the next run when a checkpoint was left)}.

The driver forks one child per crash point; the child counts the writes (opening a file for
writing, creating, renaming, replacing, removing a file or directory, fsync) and at the n-th one
calls os._exit: no exception handler, no `finally`, exactly what a kill leaves. The parent then
records the output's state, runs the next run in another child, and records that run's exit code
and what is left beside the output. The parent never computes with torch, so forking is safe.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ["TOKENIZERS_PARALLELISM"] = "false"
CRASHED = 137


def _instrument(crash_at: int) -> Any:
    """Count writes in this (child) process; die at the `crash_at`-th (0: never). Returns the counter."""
    count = [0]

    def hit() -> None:
        count[0] += 1
        if count[0] == crash_at:
            os._exit(CRASHED)

    def wrap(module: Any, name: str, is_write: Any = None) -> None:
        real = getattr(module, name)

        def patched(*a: Any, **kw: Any) -> Any:
            if is_write is None or is_write(*a, **kw):
                hit()
            return real(*a, **kw)

        setattr(module, name, patched)

    def writes_file(file: Any, mode: str = "r", *a: Any, **kw: Any) -> bool:
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def creates(path: Any, flags: int, *a: Any, **kw: Any) -> bool:
        return bool(flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR))

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync", "ftruncate", "write"):
        wrap(os, name)
    wrap(os, "open", creates)
    wrap(builtins, "open", writes_file)
    io.open = builtins.open
    wrap(shutil, "rmtree")
    return count


ERRORS = Path(os.environ.get("TMPDIR", "/tmp")) / f"carve-crash-driver-{os.getpid()}.err"


def _child(argv: list[str], crash_at: int, counter: Path | None = None) -> int:
    """Run `carve argv` in a forked child that dies at its `crash_at`-th write; its exit code (its
    stderr in ERRORS)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        fd = os.open(ERRORS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        try:
            count = _instrument(crash_at)
            from carve.cli.main import main

            code = main(argv)
            if counter is not None:
                counter.write_text(str(count[0]))
        except BaseException:  # any failure is this run's result
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _state(out: Path) -> dict[str, Any]:
    """What a reader finds at `out` now: nothing, or a complete output (its manifest readable, its
    weights' digest: equal for two runs of the same deterministic job)."""
    from carve.manifest import read_manifest

    if not out.exists():
        return {"exists": False}
    try:
        read_manifest(out)
    except Exception as exc:  # recorded: the test fails on it
        return {"exists": True, "complete": False, "error": str(exc)}
    weights = sorted(out.glob("*.safetensors"))
    complete = (out / "config.json").is_file() and bool(weights)
    return {"exists": True, "complete": complete, "weights": _digest(weights)}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def main() -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401

    import carve.cli.main  # noqa: F401 - imported once here, not in every child (no torch compute: fork stays safe)

    spec = json.loads(Path(sys.argv[1]).read_text())
    argv, out = spec["argv"], Path(spec["out"])
    counter = Path(sys.argv[2]).with_suffix(".count")
    for _ in range(2):  # the second run is the one counted: it replaces an existing output
        assert _child(argv, 0, counter) == 0, "the uninterrupted run failed"
    writes = int(counter.read_text())
    reference = _state(out)
    results = []
    for n in range(1, writes + 1):
        before = _state(out)
        code = _child(argv, n)
        after = _state(out)
        checkpoint = out.parent / f"{out.name}.checkpoint"
        resume = checkpoint.is_dir() and "resume_argv" in spec
        rerun_code = _child(spec["resume_argv"] if resume else argv, 0)
        error = ERRORS.read_text(errors="replace").strip().splitlines()[-1:] if rerun_code else []
        results.append(
            {
                "n": n,
                "code": code,
                "before": before,
                "after": after,
                "resumed": resume,
                "rerun_code": rerun_code,
                "rerun_error": error,
                "final": _state(out),
                "leftovers": _leftovers(out),
            }
        )
    ERRORS.unlink(missing_ok=True)
    Path(sys.argv[2]).write_text(json.dumps({"writes": writes, "reference": reference, "results": results}, indent=1))


if __name__ == "__main__":
    main()
