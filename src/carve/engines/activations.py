"""Calibration activations within a memory budget: what the layer-wise engine carries from one
block to the next (each calibration batch's hidden states), kept in memory while every live list
together stays under `budget` bytes; past it, each further tensor is written to a file in a
temporary directory and read back (file reads, not a memory map) when the list is walked.

The bits written are the bits read: a run with a budget gives the same masks and weights as one
without (tested).  With no budget, `Activations` is a plain in-memory list.

`bound_heap_retention` keeps freed large buffers from staying in the process's heap (the gradient
engine and the streamed jobs call it; the in-memory layer-wise engine does not: measured there, it
left the load + prune peak RSS where it was, 1251-1260 MB against 1261, and slowed the pruning and
a later plain forward by page-faulting every large buffer afresh)."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch

from carve.errors import UsageError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'4GB', '512MiB', '1.5gb', '2000000' -> bytes."""
    s = text.strip().lower().replace(" ", "")
    digits = s.rstrip("kmgtib")
    unit = s[len(digits) :]
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    if unit not in UNITS or not value >= 0 or value == float("inf"):
        raise UsageError(f"--max-memory {text!r}: give a size such as 4GB, 512MB or 2GiB")
    return int(value * UNITS[unit])


class Budget:
    """The bytes of activations every live `Activations` list may hold in memory, and the
    temporary directory the rest goes to (made when first needed, removed by `close`)."""

    def __init__(self, limit: int | None, directory: str | Path | None = None) -> None:
        self.limit, self.used, self.spilled = limit, 0, 0
        self._parent = directory
        self._dir: Path | None = None
        self._files = 0

    def new(self) -> Activations:
        return Activations(self)

    def _take(self, nbytes: int) -> bool:
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def _file(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="carve-activations-", dir=self._parent))
        self._files += 1
        return self._dir / f"{self._files}.bin"

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _OnDisk:
    def __init__(self, path: Path, t: torch.Tensor) -> None:
        self.path, self.shape, self.dtype, self.device = path, tuple(t.shape), t.dtype, t.device
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        with open(path, "wb") as f:
            data.numpy().tofile(f)
        self.nbytes = data.numel()

    def load(self) -> torch.Tensor:
        buf = bytearray(self.nbytes)
        with open(self.path, "rb") as f:
            if f.readinto(buf) != self.nbytes:
                raise OSError(f"spilled activations {self.path} were cut short")
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(self.shape).to(self.device)


class Activations:
    """A list of tensors under a `Budget` (append, iterate, len, index)."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._items: list[torch.Tensor | _OnDisk] = []
        self._in_memory = 0

    def append(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._budget._take(nbytes):
            self._items.append(t)
            self._in_memory += nbytes
        else:
            item = _OnDisk(self._budget._file(), t)
            self._budget.spilled += item.nbytes
            self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item.load() if isinstance(item, _OnDisk) else item

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def release(self) -> None:
        """Give the list's memory back to the budget and delete its files."""
        for item in self._items:
            if isinstance(item, _OnDisk):
                item.path.unlink(missing_ok=True)
        self._budget.used -= self._in_memory
        self._items, self._in_memory = [], 0


class SpilledTensors(MutableMapping[str, torch.Tensor]):
    """Named tensors each kept in a file of a temporary directory and read back when asked for:
    what a streamed job holds per weight of the whole model (a float32 importance map takes
    twice a bfloat16 model).  The directory goes when the mapping does."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._budget = Budget(0, directory)
        self._items: dict[str, _OnDisk] = {}
        weakref.finalize(self, self._budget.close)

    def __setitem__(self, key: str, t: torch.Tensor) -> None:
        if key in self._items:
            del self[key]
        self._items[key] = _OnDisk(self._budget._file(), t)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._items[key].load()

    def __delitem__(self, key: str) -> None:
        self._items.pop(key).path.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


MMAP_THRESHOLD = 4 << 20  # bytes


def bound_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """On glibc, serve allocations of `threshold` bytes or more by mmap, so a freed large buffer
    (a logits chunk, an attention score matrix, a gradient) goes back to the OS at once.  glibc's
    default raises this threshold dynamically after the first large free (up to 32 MiB), after
    which freed buffers stay in the heap: the same live tensors then cost ~1.3-1.5x the peak RSS
    (measured on a SmolLM2-shaped model).  Process-wide and idempotent; returns False where
    there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
