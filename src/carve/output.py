"""Atomic writes, the one way carve writes anything: a file or a directory is written under a
hidden temporary name beside its destination and renamed into place when complete, so Ctrl-C or a
crash leaves the old version or the new one, never half of one.

- `atomic_file(path)`: yields a temporary path to write; renamed over `path` on success.
- `atomic_output_dir(out)`: the same for a whole output directory (model files, carve.json ...).
  An existing directory is replaced by one atomic exchange where Linux allows (renameat2), else by
  two renames (old away, new in); a crash between them leaves the old one under
  `.NAME.carve-old-PID`, which `recover_replaced` puts back.
- `claim(path, ...)`: held for a whole run. Checks before any work that each output can be
  written (its parent is or can be made a directory we may write, its name leaves room for the
  temporary names), takes an exclusive lock on it (`.NAME.carve-lock`, released by the kernel if
  the process dies) so a second run on the same output fails at once, and then removes what an
  interrupted run left: temporaries `.NAME.carve-tmp-PID`, an old version not yet removed.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from carve.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs on one output are not serialized
    fcntl = None  # type: ignore[assignment]

_LONGEST_SIBLING = len(".checkpoint.carve-lock-tmp-4194304") + 1  # the longest name carve derives from NAME


def cache_dir() -> Path:
    """$CARVE_CACHE_DIR, else $XDG_CACHE_HOME/carve, else ~/.cache/carve."""
    if os.environ.get("CARVE_CACHE_DIR"):
        return Path(os.environ["CARVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "carve"


@functools.cache
def source_digest(root: Path = Path(__file__).parent) -> str:
    """A digest of carve's own source files (the .py files under `root`, by relative path): with its
    version, what keys a result that carve's code computes and caches (source metrics, inline
    selections), so a result cached by other code, even under the same version string, is computed
    anew; manifests record it too."""
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f"{f.relative_to(root).as_posix()}\0".encode() + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


CACHE_KINDS = {
    "eval": "source models' before-metrics",
    "models": "de-quantized GGUF models",
    "select": "inline selections (--domain select:)",
    "hashes": "content hashes of weight files of 64 MiB or more",
}


def cache_usage() -> list[dict[str, Any]]:
    """What carve's cache holds, per kind: entries and megabytes."""
    rows = []
    for kind, what in CACHE_KINDS.items():
        folder = cache_dir() / kind
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
        mb = _size_mb(folder) if folder.is_dir() else 0.0
        rows.append({"kind": kind, "holds": what, "entries": len(entries), "mb": round(mb, 1), "path": str(folder)})
    return rows


def clear_cache(kinds: list[str]) -> list[dict[str, Any]]:
    """Remove the cache's folders of `kinds` (each renamed aside, then deleted: a job reading an
    entry keeps its open files); returns what each held."""
    unknown = sorted(set(kinds) - set(CACHE_KINDS))
    if unknown:
        raise UsageError(f"unknown cache kind {unknown[0]!r}: use {', '.join(CACHE_KINDS)}")
    gone = [r for r in cache_usage() if r["kind"] in kinds and Path(r["path"]).exists()]
    for r in gone:
        remove_path(Path(r["path"]))
    return gone


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done."""
    path = Path(out).expanduser()
    recover_replaced(path)
    if path.exists() and not overwrite:
        raise UsageError(f"output {str(path)!r} already exists: choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is not a directory")
    return path


def temporary_path(path: Path, what: str) -> Path:
    """A hidden name beside `path` for a temporary (`what`: "tmp" or "old") owned by this process:
    the one rule `remove_dead_temporaries` and `recover_replaced` know."""
    return path.parent / f".{path.name}.carve-{what}-{os.getpid()}"


def _leftovers(path: Path, what: str) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.carve-{what}-*"), key=lambda p: p.stat().st_mtime)


def recover_replaced(path: Path) -> None:
    """If a replacement of `path` was interrupted between its two renames (the old version moved
    aside, the new one not yet in place), put the old version back."""
    if path.exists() or not path.parent.is_dir():
        return
    olds = _leftovers(path, "old")
    if olds:
        olds[-1].rename(path)


def _size_mb(path: Path) -> float:
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def remove_leftovers(path: Path) -> list[str]:
    """What interrupted runs left beside `path`, removed (call it holding `path`'s lock, so none
    belongs to a live run): its old version put back if the new one never arrived, temporaries
    and old versions deleted. Returns one line per removal, for the user."""
    recover_replaced(path)
    gone = _leftovers(path, "tmp") + (_leftovers(path, "old") if path.exists() else [])
    notes = []
    for p in gone:
        notes.append(f"removed {p.name} ({_size_mb(p):.1f} MB), left by an interrupted run")
        _delete(p)
    return notes


def _delete(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_dead_temporaries(directory: Path) -> None:
    """Temporaries in `directory` whose process is gone (a shared directory such as the cache, where
    no output lock is held: a live process's temporaries are left alone)."""
    for p in directory.glob(".*.carve-tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _delete(p)


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output that could not be written at the end: a name too long
    once carve adds its temporary suffix, a parent that is a file, a directory we may not write."""
    limit = 255
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        try:
            limit = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            pass
    for part in path.parts[len(existing.parts) : -1]:
        if len(os.fsencode(part)) > limit:
            raise UsageError(f"cannot write {str(path)!r}: the directory name {part[:40]!r}... is too long")
    if len(os.fsencode(path.name)) + _LONGEST_SIBLING > limit:
        raise UsageError(
            f"cannot write {str(path)!r}: its name is {len(os.fsencode(path.name))} bytes; carve needs "
            f"{_LONGEST_SIBLING} more for its temporary names and this file system allows {limit}"
        )
    if not existing.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {str(path)!r}: no permission to write in {str(existing)!r}")


def _make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent directories; returns those created, deepest first."""
    made: list[Path] = []
    for d in reversed(path.parents):
        if not d.exists():
            try:
                d.mkdir()
            except OSError as exc:
                for m in reversed(made):  # nothing left behind
                    m.rmdir()
                raise UsageError(f"cannot create the directory {str(d)!r} for {str(path)!r} ({exc.strerror})") from None
            made.append(d)
    return made[::-1]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for this process (flock on `.NAME.carve-lock`)."""
    lock = path.parent / f".{path.name}.carve-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{str(path)!r} is being written by another carve run (pid {holder}): wait for it to finish "
                "or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a lock file its last holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # removed while held: a waiting opener sees a new inode and retries
        os.close(fd)


@contextmanager
def claim(*paths: str | Path | None) -> Iterator[None]:
    """Hold every given output of a run (None: not written) for the whole run: checked writable,
    locked against a second run, cleared of an interrupted run's leftovers (each removal said on
    stderr). Directories created for an output are removed again if the run leaves them empty."""
    outs = list(dict.fromkeys(Path(p).expanduser().absolute() for p in paths if p is not None))
    for p in outs:
        check_writable(p)
    made: list[Path] = []
    try:
        with ExitStack() as stack:
            for p in outs:
                made += _make_parents(p)
                if fcntl is not None:
                    stack.enter_context(_locked(p))
            for p in outs:
                for note in remove_leftovers(p):
                    print(f"carve: {note}", file=sys.stderr)
            yield
    finally:
        for d in made:
            try:
                d.rmdir()  # only if the run left it empty
            except OSError:
                pass


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system
    or file system cannot, and then nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_path(path: Path) -> None:
    """Remove a file or directory so that a crash leaves it whole or gone: renamed to a temporary
    name first (which the next claim of `path` clears), then deleted."""
    if not path.exists() and not path.is_symlink():
        return
    doomed = temporary_path(path, "tmp")
    path.rename(doomed)
    _delete(doomed)


def replace_path(tmp: Path, path: Path) -> None:
    """Move the complete `tmp` to `path`, replacing what is there. A file: one atomic rename. A
    directory: swapped with the old one in one atomic step where the system can (the old one then
    removed), else old aside, new in, old removed (a crash between the two renames leaves the old
    one aside, which `recover_replaced` puts back)."""
    if path.is_dir() and not path.is_symlink():
        if _exchange(tmp, path):  # `tmp` now holds the old version
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = temporary_path(path, "old")
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
    tmp = temporary_path(p, "tmp")
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
    tmp = temporary_path(path, "tmp")
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
