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

A model too large for one file (or written block by block by a streamed extraction) is stored as
shards `model.sparse-0000i-of-0000n.safetensors`, each a sparse file of the layout above holding
its own tensors (its metadata: their shapes and planes, the format, every alias), and
`model.sparse.safetensors.index.json` ({"metadata": {"carve_format"}, "weight_map": name -> shard},
the names as a model's state dict has them).  `SparseWriter` writes them one tensor at a time.

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
SPARSE_INDEX = "model.sparse.safetensors.index.json"
SHARD_BYTES = 2 * 2**30  # a shard of the sparse format closes past this many bytes
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
    """The model's weights in `dtype` in the sparse format (config and generation config beside it);
    returns what the manifest records: tensors masked, bytes of the files and of the dense ones."""
    aliases: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    stored: list[str] = []
    state = model.state_dict()
    for name, t in state.items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where in first:  # tied weights: stored once
            aliases[name] = first[where]
        else:
            first[where] = name
            stored.append(name)
    writer = SparseWriter(directory, aliases)
    for name in stored:
        t = state[name]
        writer.write(name, t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype))
    said = writer.close()
    config = model.config
    config.dtype = dtype
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    return said


class SparseWriter:
    """A sparse model written one tensor at a time (each masked where that is smaller, its values and
    large dense tensors as byte planes), in memory a tensor at a time: each shard's bytes go to a
    file as they come and its header is put in front when it closes (past `max_shard_bytes`).  One
    shard is `SPARSE_FILE`; more are numbered shards with `SPARSE_INDEX`."""

    def __init__(self, directory: Path, aliases: dict[str, str], max_shard_bytes: int | None = None) -> None:
        self.directory, self.aliases = directory, dict(aliases)
        self.max = SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self._shards: list[Path] = []
        self._where: dict[str, int] = {}  # name -> shard
        self._open: _Appending | None = None
        self._shapes: dict[str, list[int]] = {}
        self._planes: dict[str, Any] = {}
        self.masked = self.dense_bytes = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._open is None:
            self._shards.append(self.directory / f".model.sparse-{len(self._shards) + 1:05d}.partial")
            self._open = _Appending(self._shards[-1])
        self.dense_bytes += t.numel() * t.element_size()
        enc = _encoded(t)
        parts = {name: t} if enc is None else {f"mask/{name}": pack_bits(enc[0]), f"value/{name}": enc[1]}
        if enc is not None:
            self._shapes[name] = list(t.shape)
            self.masked += 1
        for key, part in parts.items():
            if not key.startswith("mask/") and _planed(part):
                part, self._planes[key] = to_planes(part)
            self._open.add(key, part)
        self._where[name] = len(self._shards) - 1
        if self._open.nbytes >= self.max:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._open is not None
        meta = {"carve_format": FORMAT, "carve_aliases": json.dumps(self.aliases), "format": "pt",
                "carve_mask_shapes": json.dumps(self._shapes), "carve_planes": json.dumps(self._planes)}  # fmt: skip
        self._open.finish(meta)
        self._open, self._shapes, self._planes = None, {}, {}

    def close(self) -> dict[str, Any]:
        """The shards given their final names (and the index when there are several); returns what
        the manifest records."""
        if self._open is not None or not self._shards:
            if self._open is None:  # a model of no tensors: one empty file
                self._shards.append(self.directory / ".model.sparse-00001.partial")
                self._open = _Appending(self._shards[-1])
            self._close_shard()
        n = len(self._shards)
        names = [SPARSE_FILE] if n == 1 else [f"model.sparse-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self._shards, names, strict=True):
            path.rename(self.directory / name)
        if n > 1:
            weight_map = {k: names[i] for k, i in self._where.items()} | {a: names[self._where[s]]
                                                                         for a, s in self.aliases.items()}  # fmt: skip
            index = {"metadata": {"carve_format": FORMAT}, "weight_map": weight_map}
            (self.directory / SPARSE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return {
            "format": FORMAT,
            "masked_tensors": self.masked,
            "dense_bytes": self.dense_bytes,
            "file_bytes": sum((self.directory / name).stat().st_size for name in names),
            **({"shards": n} if n > 1 else {}),
        }


class _Appending:
    """One safetensors file written as its tensors come: their bytes to `path` + '.data' in order,
    the header (with its metadata) put in front by `finish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = self._data_path.open("wb")
        self._header: dict[str, Any] = {}
        self.nbytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        from carve.models.stream import dtype_code

        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._header[key] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                             "data_offsets": [self.nbytes, self.nbytes + data.nbytes]}  # fmt: skip
        self._data.write(data.data)
        self.nbytes += data.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        import shutil
        import struct

        self._data.close()
        raw = json.dumps({"__metadata__": metadata, **self._header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with self.path.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self._data_path.unlink()


def sparse_files(directory: Path) -> list[Path] | None:
    """The sparse model files of a directory (one, or the shards its index names); None when it holds
    none; a UsageError when its index is damaged or names a missing shard."""
    index = directory / SPARSE_INDEX
    if index.is_file():
        return indexed_shards(index, "sparse shard")
    return [directory / SPARSE_FILE] if (directory / SPARSE_FILE).is_file() else None


def indexed_shards(index: Path, what: str) -> list[Path]:
    """The files a shard index (`weight_map`: tensor name -> file) names, beside it; a UsageError
    when it is damaged or names a missing file."""
    try:
        files = sorted({index.parent / str(f) for f in json.loads(index.read_text())["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{str(index)!r} is damaged: no weight_map of tensor names to files") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{str(index.parent)!r} is missing the {what}(s) its index names: {', '.join(missing[:3])}")
    return files


def read_sparse_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense state dict a sparse model (one file or shards) holds (tied names as in its
    aliases), bit for bit."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for path in sparse_files(directory) or [directory / SPARSE_FILE]:
        masked, dense, meta = read_entries(path, "a carve sparse model")
        if meta.get("carve_format") not in FORMATS:
            raise UsageError(f"{str(path)!r} is not a carve sparse model (format {meta.get('carve_format')!r})")
        try:
            named = json.loads(meta.get("carve_aliases", "{}"))
            if not isinstance(named, dict) or not all(isinstance(v, str) for v in named.values()):
                raise ValueError
        except ValueError:
            raise UsageError(f"{str(path)!r} is damaged: its carve_aliases are not a mapping of names") from None
        aliases.update(named)
        state.update(dense)
        for name, (keep, values) in masked.items():
            t = torch.zeros(keep.shape, dtype=values.dtype)
            t[keep] = values
            state[name] = t
    missing = sorted(v for v in aliases.values() if v not in state)
    if missing:
        raise UsageError(
            f"{str(directory)!r} is damaged: tied names point at {missing[:3]}, which its sparse files do not hold"
        )
    return state, aliases


def is_sparse_model(directory: Path) -> bool:
    """Whether `directory` holds a model in the sparse format (one file, or an index of shards)."""
    return (directory / SPARSE_FILE).is_file() or (directory / SPARSE_INDEX).is_file()


def densify_output(src: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """`carve densify`: a carve output in the sparse format written to `out` as plain weights in
    their own precision (stock `from_pretrained` loads it), its manifest saying so."""
    from carve.convert import convert

    source = Path(src).expanduser()
    if not is_sparse_model(source):
        raise UsageError(f"{str(source)!r} holds no {SPARSE_FILE}: it is not a carve output in the sparse format")
    return convert(source, out, None, "dense", overwrite)
