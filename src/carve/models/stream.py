"""Models read one tensor at a time and safetensors written one tensor at a time: what `carve merge`
streams through, so that its peak memory is a few tensors per model, never a whole model.

`TensorSource(DIR)` reads a model directory lazily: plain safetensors (one file or shards with
their index), carve's sparse format (models/sparse.py) and a `--save-delta` update over its base
(models/delta.py), each tensor decoded when asked for; a checkpoint whose config declares MXFP4
(gpt-oss as OpenAI ships it) shows each MXFP4 pair (`X_blocks`, `X_scales`) as the float tensor `X`
the model holds, de-quantized when read.  `StreamWriter` writes the safetensors
header first, from the tensors' names, dtypes and shapes known in advance, then each tensor's bytes
at its place as soon as it is computed; past `max_shard_bytes` it starts another shard and writes
the index transformers reads.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.masks.mask import is_shape, reading_safetensors
from carve.models.sparse import PLANE_DTYPES, from_planes, indexed_shards, planes_of, read_entry

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}

# MXFP4 (the OCP microscaling format; gpt-oss's experts): 4-bit e2m1 values, two to a byte (low
# nibble first), 32 to a block sharing one power-of-two scale stored as a biased exponent (127 = 2^0)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_DTYPE = torch.bfloat16  # what transformers de-quantizes gpt-oss's experts to; every value is exact in it


def mxfp4_values(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = MXFP4_DTYPE) -> torch.Tensor:
    """The float tensor [..., in, out] that MXFP4 `blocks` [..., out, in/32, 16] (uint8) and `scales`
    [..., out, in/32] (uint8) hold, as gpt-oss's experts are laid out in the model (the checkpoint
    stores each expert's transpose); one leading index (expert) at a time, so the 4-byte
    intermediate is one expert's, not the whole tensor's."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise UsageError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair up")
    lut = torch.tensor(FP4_VALUES)
    lead = blocks.shape[:-3]
    flat_b, flat_s = blocks.reshape(-1, *blocks.shape[-3:]), scales.reshape(-1, *scales.shape[-2:])
    out = torch.empty(flat_b.shape[0], flat_b.shape[-2] * 32, flat_b.shape[-3], dtype=dtype)
    for e in range(flat_b.shape[0]):
        b = flat_b[e].long()
        values = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # [out, G, 32]
        values = torch.ldexp(values, (flat_s[e].int() - 127)[..., None].float())
        out[e] = values.flatten(-2).t().to(dtype)
    return out.reshape(*lead, *out.shape[1:])


def quantization_method(directory: Path) -> str | None:
    """The quantization a checkpoint's config.json declares (gpt-oss's "mxfp4", "fp8" ...), or None."""
    try:
        quantized = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return str(quantized.get("quant_method", "unnamed")) if isinstance(quantized, dict) else None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors header's name of a torch dtype."""
    return _CODES[dtype]


class TensorSource:
    """A model directory's tensors by name, each read from disk only when asked for."""

    def __init__(self, directory: str | Path, mmap: bool = True) -> None:
        """`mmap=False`: plain tensors are read with file reads into fresh memory instead of from a
        memory map, so the pages read do not stay in the process's resident set (a streamed
        extraction reads every shard once and must stay within its budget)."""
        from carve.models.delta import DELTA_FILE
        from carve.models.sparse import sparse_files

        self.directory = Path(directory).expanduser()
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}  # name -> (open file, key in it)
        self._masked: dict[str, tuple[Any, list[int]]] = {}  # name -> (open file, shape) of mask/value entries
        self._aliases: dict[str, str] = {}
        self._planes: dict[str, Any] = {}  # key -> [dtype, shape, length] of tensors stored as byte planes
        self._base: TensorSource | None = None
        self._mxfp4: dict[str, tuple[str, str]] = {}  # name -> its (blocks, scales) tensors (MXFP4 checkpoints)
        self.files: list[Path] = []  # the weight files read (the model's fingerprint is of them)
        self._spans: dict[str, tuple[Path, int, int]] = {}  # with mmap=False: name -> (file, offset, bytes)
        d = self.directory
        if not d.is_dir():
            raise UsageError(f"{str(d)!r} is not a model directory")
        sparse = sparse_files(d)
        if sparse is not None:
            for f in sparse:
                self._open_entries(f, "a carve sparse model")
        elif (d / DELTA_FILE).is_file():
            self._base = TensorSource(_delta_base(d))
            self._open_entries(d / DELTA_FILE, "a carve update (delta)")
        else:
            files = _shards(d)
            for f in files:
                handle = self._open(f, "a model weights file")
                for k in handle.keys():
                    self._where[k] = (handle, k)
                if not mmap:
                    self._spans.update(_spans(f))
            if quantization_method(d) == "mxfp4":
                pairs = {k.removesuffix("_blocks") for k in self._where if k.endswith("_blocks")}
                self._mxfp4 = {k: (f"{k}_blocks", f"{k}_scales") for k in pairs if f"{k}_scales" in self._where}

    def _open(self, path: Path, what: str) -> Any:
        self.files.append(path)
        return self._stack.enter_context(reading_safetensors(path, what))

    def _open_entries(self, path: Path, what: str) -> None:
        handle = self._open(path, what)
        meta = dict(handle.metadata() or {})
        try:
            shapes = json.loads(meta.get("carve_mask_shapes", "null"))
            aliases = json.loads(meta.get("carve_aliases", "{}"))
        except ValueError:
            shapes = aliases = None
        if not isinstance(shapes, dict) or not all(is_shape(s) for s in shapes.values()):
            raise UsageError(f"{str(path)!r} is damaged: its carve_mask_shapes metadata is missing or not shapes")
        if not isinstance(aliases, dict):
            raise UsageError(f"{str(path)!r} is damaged: its carve_aliases are not a mapping of names")
        try:
            planes = planes_of(meta, set(handle.keys()))
        except ValueError as exc:
            raise UsageError(f"{str(path)!r} is damaged: {exc}") from None
        self._planes.update(planes)  # keys are the tensors' own: each in one shard
        for name, shape in shapes.items():
            self._masked[name] = (handle, shape)
        for k in handle.keys():
            if not k.startswith(("mask/", "value/")):
                self._where[k] = (handle, k)
        self._aliases.update({str(k): str(v) for k, v in aliases.items()})

    @property
    def dequantizes(self) -> bool:
        """Whether some tensors are de-quantized as they are read (an MXFP4 checkpoint)."""
        return bool(self._mxfp4)

    @property
    def aliases(self) -> dict[str, str]:
        """A sparse model's tied names -> the name each is stored under."""
        return dict(self._aliases)

    def names(self) -> list[str]:
        packed = {part for pair in self._mxfp4.values() for part in pair}
        own = [*(k for k in self._where if k not in packed), *self._mxfp4, *self._masked, *self._aliases]
        if self._base is None:
            return own
        return list(dict.fromkeys([*self._base.names(), *own]))

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._mxfp4 or name in self._masked or name in self._aliases or (
            self._base is not None and name in self._base
        )  # fmt: skip

    def shape(self, name: str) -> list[int]:
        name = self._aliases.get(name, name)
        if name in self._mxfp4:
            blocks = self.shape(self._mxfp4[name][0])  # [..., out, in/32, 16]
            return [*blocks[:-3], blocks[-2] * 32, blocks[-3]]
        if name in self._masked:
            return list(self._masked[name][1])
        if name in self._where:
            handle, key = self._where[name]
            return list(self._planes[key][1]) if key in self._planes else list(handle.get_slice(key).get_shape())
        if self._base is not None:
            return self._base.shape(name)
        raise KeyError(name)

    def dtype(self, name: str) -> torch.dtype:
        name = self._aliases.get(name, name)
        if name in self._mxfp4:
            return MXFP4_DTYPE
        if name in self._masked:
            handle, _ = self._masked[name]
            return self._stored_dtype(handle, f"value/{name}")
        if name in self._where:
            return self._stored_dtype(*self._where[name])
        if self._base is not None:
            return self._base.dtype(name)
        raise KeyError(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read (and decoded) now."""
        name = self._aliases.get(name, name)
        if name in self._mxfp4:
            blocks, scales = self._mxfp4[name]
            return mxfp4_values(self.get(blocks), self.get(scales))
        if name in self._spans:
            path, offset, size = self._spans[name]
            buf = bytearray(size)
            with path.open("rb") as fh:
                fh.seek(offset)
                if fh.readinto(buf) != size:
                    raise UsageError(f"{str(path)!r} is cut short: {name} ends past the end of the file")
            return (
                torch.frombuffer(buf, dtype=self.dtype(name)).reshape(self.shape(name))
                if size
                else torch.empty(self.shape(name), dtype=self.dtype(name))
            )
        try:
            if name in self._where:
                return self._read(*self._where[name])
            if name in self._masked:
                handle, shape = self._masked[name]
                keep, values = read_entry(handle, name, shape, lambda key: self._read(handle, key))
        except ValueError as exc:
            raise UsageError(f"{str(self.directory)!r} is damaged: {exc}") from None
        if name in self._masked:
            t = (
                self._base.get(name).to(values.dtype)
                if self._base is not None
                else torch.zeros(shape, dtype=values.dtype)
            )
            t[keep] = values
            return t
        if self._base is not None:
            return self._base.get(name)
        raise KeyError(name)

    def _read(self, handle: Any, key: str) -> torch.Tensor:
        """A stored tensor, decoded from byte planes where it was stored so."""
        return from_planes(handle.get_tensor(key), self._planes[key]) if key in self._planes else handle.get_tensor(key)

    def _stored_dtype(self, handle: Any, key: str) -> torch.dtype:
        if key in self._planes:  # checked when the file was opened
            return PLANE_DTYPES[self._planes[key][0]]
        return _DTYPES[handle.get_slice(key).get_dtype()]

    def close(self) -> None:
        self._stack.close()
        if self._base is not None:
            self._base.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spans(path: Path) -> dict[str, tuple[Path, int, int]]:
    """Where each tensor of a safetensors file lies: (file, byte offset, byte count)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = entry["data_offsets"]
            out[name] = (path, 8 + n + int(start), int(end) - int(start))
    return out


def _shards(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return indexed_shards(index, "shard")
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    raise UsageError(
        f"{str(d)!r} holds no safetensors weights (model.safetensors, an index with shards, carve's sparse format "
        "or an update): this reads safetensors only; convert other weights with `carve convert`"
    )


def _delta_base(d: Path) -> Path:
    from carve.manifest import read_manifest

    base = (read_manifest(d).get("source") or {}).get("model")
    if not isinstance(base, str) or not Path(base).expanduser().is_dir():
        raise UsageError(f"{str(d)!r} holds an update whose base {base!r} is not a model directory here")
    return Path(base).expanduser()


class StreamWriter:
    """Safetensors files written tensor by tensor: `specs` (name, dtype, shape) fix the layout and
    the header up front; `write(name, tensor)` puts each one's bytes in place.  The files are
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`
    (a tensor larger than that has a shard of its own) with `model.safetensors.index.json`."""

    def __init__(
        self,
        directory: Path,
        specs: list[tuple[str, torch.dtype, list[int]]],
        metadata: dict[str, str] | None = None,
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        groups: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
        size = 0
        for spec in specs:
            nbytes = _nbytes(spec)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = [directory / name for name in names]
        self._place: dict[str, tuple[int, int, torch.dtype, list[int]]] = {}  # name -> (file, offset, dtype, shape)
        self._written: set[str] = set()
        for i, (path, group) in enumerate(zip(self.files, groups, strict=True)):
            header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name, dtype, shape in group:
                end = offset + _nbytes((name, dtype, shape))
                header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
                offset = end
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with path.open("wb") as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                fh.truncate(8 + len(raw) + offset)
            for name, dtype, shape in group:
                self._place[name] = (i, 8 + len(raw) + header[name]["data_offsets"][0], dtype, shape)
        if n > 1:
            total = sum(_nbytes(s) for s in specs)
            weight_map = {name: names[i] for name, (i, *_) in self._place.items()}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self._handles = [path.open("r+b") for path in self.files]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, offset, dtype, shape = self._place[name]
        if list(tensor.shape) != list(shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not the announced {tuple(shape)}")
        data = tensor.detach().to("cpu", dtype).contiguous()
        fh = self._handles[i]
        fh.seek(offset)
        fh.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._written.add(name)

    def close(self) -> None:
        for fh in self._handles:
            fh.close()
        missing = sorted(set(self._place) - self._written)
        if missing:
            raise ValueError(f"tensors announced but never written: {missing[:3]}")


def _nbytes(spec: tuple[str, torch.dtype, list[int]]) -> int:
    _, dtype, shape = spec
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()
