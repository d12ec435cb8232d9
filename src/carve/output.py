"""Atomic writes, the one way carve writes anything: a file or a directory is written under a
hidden temporary name beside its destination and renamed into place when complete, so Ctrl-C or a
crash leaves the old version or the new one, never half of one.

- `atomic_file(path)`: yields a temporary path to write; renamed over `path` on success.
- `atomic_output_dir(out)`: the same for a whole output directory (model files, carve.json ...).
  Replacing an existing directory takes two renames (old away, new in); a crash between them leaves
  the old one under `.NAME.carve-old-PID`, which `recover_replaced` puts back.
"""

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
    recover_replaced(path)
    if path.exists() and not overwrite:
        raise UsageError(f"output {str(path)!r} already exists: choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is not a directory")
    return path


def _sibling(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.carve-{what}-{os.getpid()}"


def recover_replaced(path: Path) -> None:
    """If a replacement of `path` was interrupted between its two renames (the old version moved
    aside, the new one not yet in place), put the old version back."""
    if path.exists() or not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.carve-old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        olds[-1].rename(path)


def replace_path(tmp: Path, path: Path) -> None:
    """Move the complete `tmp` to `path`, replacing what is there (a file: one atomic rename; a
    directory: old aside, new in, old removed)."""
    if path.is_dir() and not path.is_symlink():
        old = _sibling(path, "old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(path)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block completes it replaces `path`."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(p, "tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; when the block completes it becomes `out`."""
    path = check_output(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_replaced(path)  # interrupted between the renames: the old output back in place
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """JSON written atomically (a crash leaves the old file or the new one)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
