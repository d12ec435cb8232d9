"""Tensors stored as a bit-packed mask plus the values at its set bits, in safetensors: the one
layout of carve's sparse model files and of fine-tuning updates (models/delta.py).

Layout of a file: for each masked tensor NAME, `mask/NAME` (uint8: np.packbits of the row-major
bool mask) and `value/NAME` (the entries at the set bits, in row-major order, in the tensor's
dtype); metadata `carve_mask_shapes` (JSON: NAME -> shape).  A sparse model file
(`model.sparse.safetensors`) also holds each tensor that is not worth masking under its own name,
and in its metadata `carve_format` and `carve_aliases` (JSON: tied name -> the name stored).  A
weight is masked where that is smaller: where fewer than 1 − 1/(8·bytes per entry) of its entries
are non-zero (15/16 in bfloat16).  The mask marks entries whose bits are not all zero, so -0.0 is a
stored value and decoding gives back every tensor bit for bit.

Format "sparse-2" (what carve writes; "sparse-1" files, the same without it, are still read):
every floating-point value tensor and dense tensor of at least `PLANE_MIN` entries and 2+ bytes an
entry is stored as byte planes — its most significant byte of each entry (sign and exponent bits,
few distinct values in trained weights) deflate-compressed (zlib, level 1), the other bytes as
they are — in one uint8 tensor under the same name: [compressed top bytes | low bytes].  Metadata
`carve_planes` (JSON: name -> [dtype, shape, compressed length]) says how to decode it.  Lossless:
the same bits come back (tested).

`carve densify` turns a sparse model into plain `model.safetensors` for stock `from_pretrained`.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.masks.mask import holds_bits_of, is_shape, pack_bits, reading_safetensors, unpack_bits

SPARSE_FILE = "model.sparse.safetensors"
FORMAT = "sparse-2"
FORMATS = ("sparse-1", FORMAT)  # every format carve reads
PLANE_MIN = 1024  # entries: smaller tensors are stored as they are
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PLANE_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def to_planes(t: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """`t` as one uint8 tensor [deflated top byte of each entry | the entries' other bytes] and
    what `from_planes` needs: [dtype, shape, compressed length]."""
    import numpy as np

    size = t.element_size()
    b = t.detach().contiguous().cpu().view(torch.uint8).reshape(-1, size).numpy()
    # little-endian: the last byte of each entry is its top one (sign and exponent)
    top = zlib.compress(np.ascontiguousarray(b[:, size - 1]).data, 1)
    out = np.empty(len(top) + b.shape[0] * (size - 1), dtype=np.uint8)  # written in place: no copy of copies
    out[: len(top)] = np.frombuffer(top, dtype=np.uint8)
    out[len(top) :].reshape(-1, size - 1)[:] = b[:, : size - 1]
    return torch.from_numpy(out), [str(t.dtype).removeprefix("torch."), list(t.shape), len(top)]


def from_planes(blob: torch.Tensor, info: Any) -> torch.Tensor:
    """The tensor `to_planes` stored, bit for bit; a ValueError when `blob` or `info` is damaged."""
    import numpy as np

    if not _plane_info(info):
        raise ValueError(f"its carve_planes entry {str(info)[:80]} is not [dtype, shape, length]")
    dtype, shape, cut = PLANE_DTYPES[info[0]], info[1], info[2]
    size, n = torch.empty((), dtype=dtype).element_size(), math.prod(shape)
    data = blob.contiguous().numpy().reshape(-1)  # read in place, not copied
    if not 0 < cut <= len(data) or len(data) - cut != n * (size - 1):
        raise ValueError(f"its byte planes do not hold {n} entries of {info[0]}")
    unzip = zlib.decompressobj()
    try:
        top = unzip.decompress(data[:cut].data, n)  # at most n bytes: a damaged stream cannot balloon
    except zlib.error as exc:
        raise ValueError(f"its compressed top bytes are damaged ({exc})") from None
    if len(top) != n or unzip.unconsumed_tail or not unzip.eof:
        raise ValueError(f"its compressed top bytes do not hold {n} entries")
    b = np.empty((n, size), dtype=np.uint8)
    b[:, size - 1] = np.frombuffer(top, dtype=np.uint8)
    b[:, : size - 1] = data[cut:].reshape(n, size - 1)
    return torch.from_numpy(b).view(dtype).reshape(shape)


def planes_of(meta: dict[str, str], keys: set[str]) -> dict[str, Any]:
    """A file's `carve_planes` metadata (entry -> [dtype, shape, length]); a ValueError when it is
    not one or names entries the file does not hold."""
    planes = json.loads(meta.get("carve_planes", "{}"))
    if not isinstance(planes, dict) or not set(planes) <= keys or not all(map(_plane_info, planes.values())):
        raise ValueError("its carve_planes metadata does not describe its tensors")
    return planes


def _plane_info(info: Any) -> bool:
    return isinstance(info, list) and len(info) == 3 and info[0] in PLANE_DTYPES and is_shape(info[1]) and (
        type(info[2]) is int
    )  # fmt: skip


def _planed(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() >= 2 and t.numel() >= PLANE_MIN


def nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    """Entries whose bit pattern is not all zeros (so -0.0 counts as a value)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()]) != 0 if t.is_floating_point() else t != 0


def write_entries(
    path: Path,
    masked: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dense: dict[str, torch.Tensor] | None = None,
    meta: dict[str, str] | None = None,
    planes: bool = False,
) -> None:
    """`masked`: NAME -> (bool mask, values at its set bits); `dense`: tensors stored as they are
    (with `planes`, floating-point values and dense tensors as byte planes: the module docstring)."""
    from safetensors.torch import save_file

    tensors = {f"mask/{k}": pack_bits(m) for k, (m, _) in masked.items()}
    tensors.update({f"value/{k}": v.contiguous().cpu() for k, (_, v) in masked.items()})
    tensors.update({k: v.contiguous().cpu() for k, v in (dense or {}).items()})
    shapes = {k: list(m.shape) for k, (m, _) in masked.items()}
    extra = dict(meta or {})
    if planes:
        coded = {}
        for k, t in tensors.items():
            if not k.startswith("mask/") and _planed(t):
                tensors[k], coded[k] = to_planes(t)
        extra["carve_planes"] = json.dumps(coded)
    save_file(tensors, str(path), metadata={"carve_mask_shapes": json.dumps(shapes), **extra})


def read_entries(
    path: Path, what: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], dict[str, str]]:
    """(masked, dense, metadata) of a file `write_entries` wrote; a UsageError naming the file when
    it is damaged (its masks and values checked against the shapes it records)."""
    with reading_safetensors(path, what) as f:
        meta = dict(f.metadata() or {})
        shapes = json.loads(meta.get("carve_mask_shapes", "null"))
        if not isinstance(shapes, dict) or not all(is_shape(s) for s in shapes.values()):
            raise ValueError("its carve_mask_shapes metadata is missing or not shapes")
        keys = set(f.keys())
        planes = planes_of(meta, keys)
        get = lambda k: from_planes(f.get_tensor(k), planes[k]) if k in planes else f.get_tensor(k)  # noqa: E731
        masked = {}
        for name, shape in shapes.items():
            if f"mask/{name}" not in keys or f"value/{name}" not in keys:
                raise ValueError(f"{name} has no mask or no values")
            masked[name] = read_entry(f, name, shape, get)
        dense = {k: get(k) for k in keys if not k.startswith(("mask/", "value/"))}
    return masked, dense, meta


def read_entry(handle: Any, name: str, shape: list[int], get: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, values) of one masked tensor of an open file (`get(key)`: how a tensor is read, by
    default as stored); a ValueError when they do not fit `shape`."""
    bits, values = handle.get_tensor(f"mask/{name}"), (get or handle.get_tensor)(f"value/{name}")
    if not holds_bits_of(bits, shape):
        raise ValueError(f"the mask of {name} does not hold {shape}'s bits")
    keep = unpack_bits(bits, shape)
    if values.dim() != 1 or len(values) != int(keep.sum()):
        raise ValueError(f"{name} holds {tuple(values.shape)} values for {int(keep.sum())} set bits")
    return keep, values


def _encoded(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mask, values) when masking `t` stores it in fewer bytes, else None."""
    if t.dim() < 2 or not t.is_floating_point():
        return None
    keep = nonzero_bits(t)
    if int(keep.sum()) * t.element_size() * 8 + t.numel() >= t.numel() * t.element_size() * 8:
        return None
    return keep, t[keep]


def save_sparse_model(directory: Path, model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The model's weights in `dtype` as `SPARSE_FILE` (config and generation config beside it);
    returns what the manifest records: tensors masked, bytes of the file and of the dense one."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where in first:  # tied weights: stored once
            aliases[name] = first[where]
            continue
        first[where] = name
        state[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
    masked, dense = {}, {}
    for name, t in state.items():
        enc = _encoded(t)
        if enc is None:
            dense[name] = t
        else:
            masked[name] = enc
    meta = {"carve_format": FORMAT, "carve_aliases": json.dumps(aliases), "format": "pt"}
    write_entries(directory / SPARSE_FILE, masked, dense, meta, planes=True)
    config = model.config
    config.dtype = dtype
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    return {
        "format": FORMAT,
        "masked_tensors": len(masked),
        "dense_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "file_bytes": (directory / SPARSE_FILE).stat().st_size,
    }


def read_sparse_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense state dict a sparse model file holds (tied names as in its aliases), bit for bit."""
    path = directory / SPARSE_FILE
    masked, dense, meta = read_entries(path, "a carve sparse model")
    if meta.get("carve_format") not in FORMATS:
        raise UsageError(f"{str(path)!r} is not a carve sparse model (format {meta.get('carve_format')!r})")
    try:
        aliases = json.loads(meta.get("carve_aliases", "{}"))
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ValueError
    except ValueError:
        raise UsageError(f"{str(path)!r} is damaged: its carve_aliases are not a mapping of names") from None
    state = dict(dense)
    for name, (keep, values) in masked.items():
        t = torch.zeros(keep.shape, dtype=values.dtype)
        t[keep] = values
        state[name] = t
    missing = sorted(v for v in aliases.values() if v not in state)
    if missing:
        raise UsageError(f"{str(path)!r} is damaged: tied names point at {missing[:3]}, which it does not hold")
    return state, aliases


def densify_output(src: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """`carve densify`: a carve output in the sparse format written to `out` as plain weights in
    their own precision (stock `from_pretrained` loads it), its manifest saying so."""
    from carve.convert import convert

    source = Path(src).expanduser()
    if not (source / SPARSE_FILE).is_file():
        raise UsageError(f"{str(source)!r} holds no {SPARSE_FILE}: it is not a carve output in the sparse format")
    return convert(source, out, None, "dense", overwrite)
