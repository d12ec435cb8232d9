"""A strict reader of a GGUF file's header (metadata and tensor table), run before transformers
parses the file: a file cut short, a foreign file or a damaged table is one clear error naming
the file instead of a traceback from deep inside the GGUF loader.

Layout (GGUF v2/v3, little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic "GGUF", u32 version, u64 tensor count, u64 metadata count; each metadata entry a string
key, a u32 value type and the value (a string is a u64 length and UTF-8 bytes; an array a u32
item type, a u64 count and the items); each tensor a string name, u32 dimension count, u64 per
dimension, u32 ggml type and u64 offset into the data section, which starts at the next multiple
of `general.alignment` (32 by default)."""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from carve.errors import UsageError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8


class _Damaged(Exception):
    pass


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Damaged(f"the file ends inside its header (at byte {self.pos} of {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, item_bytes: int = 1) -> int:
        n = self.take("<Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise _Damaged(f"{n} {what} do not fit in the {len(self.buf) - self.pos} bytes left (cut short or damaged)")
        return int(n)

    def string(self) -> str:
        n = self.count("string bytes")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"a string at byte {self.pos - n} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY and depth == 0:
            item = self.take("<I")
            n = self.count("array items", 1 if item not in _SCALARS else struct.calcsize(_SCALARS[item]))
            return [self.value(item, depth + 1) for _ in range(n)] if item in (_STRING, _ARRAY) else self._skip(item, n)
        raise _Damaged(f"unknown metadata value type {kind}")

    def _skip(self, item: int, n: int) -> list[Any]:
        if item not in _SCALARS:
            raise _Damaged(f"unknown array item type {item}")
        self.pos += n * struct.calcsize(_SCALARS[item])  # numeric arrays are not needed here, only their extent
        return []


def _nbytes(name: str, shape: list[int], kind: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise _Damaged(f"tensor {name!r} has an unknown ggml type {kind}") from None
    return math.prod(shape) // block * size


def read_gguf_header(path: Path) -> dict[str, Any]:
    """The metadata of the GGUF file `path` (numeric arrays left out; "carve.tensor_types": the ggml
    type ids of its tensors) after checking that its header and tensor table are complete and
    consistent; a UsageError otherwise."""
    try:
        with open(path, "rb") as fh:
            if path.stat().st_size < 24:
                raise _Damaged("the file is shorter than a GGUF header")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(memoryview(buf)))
    except _Damaged as exc:
        raise UsageError(f"{path} is not a complete GGUF file: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _parse(r: _Reader) -> dict[str, Any]:
    try:
        if bytes(r.buf[:4]) != b"GGUF":
            raise _Damaged("it does not start with the GGUF magic bytes")
        r.pos = 4
        version = r.take("<I")
        if version not in (2, 3):
            raise _Damaged(f"GGUF version {version} is not one carve reads (2 or 3)")
        n_tensors, n_kv = r.count("tensors", 24), r.count("metadata entries", 12)
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.take("<I"))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise _Damaged(f"general.alignment {align!r} is not a power of two")
        tensors = []
        for _ in range(n_tensors):
            name, dims = r.string(), r.take("<I")
            if dims > _MAX_DIMS:
                raise _Damaged(f"tensor {name!r} claims {dims} dimensions")
            shape = [r.take("<Q") for _ in range(dims)]
            kind = r.take("<I")
            tensors.append((name, shape, kind, r.take("<Q")))
        data_start = -(-r.pos // align) * align
        for name, shape, kind, offset in tensors:
            if data_start + offset + _nbytes(name, shape, kind) > len(r.buf):
                raise _Damaged(f"tensor {name!r} ends past the end of the file (the file is cut short)")
        meta["carve.tensor_types"] = sorted({kind for _, _, kind, _ in tensors})  # ggml type ids present
        return meta
    finally:
        r.buf.release()


def precision_class(tensor_types: list[int]) -> str:
    """The torch dtype name a GGUF's weights correspond to: F32, F16 or BF16 when those are all it
    holds (the most compact of them), bfloat16 when any tensor is quantized."""
    floats = {0: "float32", 1: "float16", 30: "bfloat16"}
    if any(t not in floats for t in tensor_types):
        return "bfloat16"
    present = [floats[t] for t in tensor_types]
    return next((name for name in ("float16", "bfloat16") if name in present), "float32")
