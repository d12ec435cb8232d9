"""ImportanceMap (param name -> float scores) and Mask (param name -> bool, True = keep)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carve.errors import UsageError
from carve.masks.select import check_sparsity, keep_mask, parse_pattern


@dataclass
class ImportanceMap(Mapping[str, torch.Tensor]):
    """Scores of the same shape as each parameter, with how they were made.  `meta["transposed"]`
    lists parameters stored [in, out] (GPT-2's Conv1D), so row selection uses output rows;
    `meta["experts"]` (name -> E) the 2-D parameters stacking E experts' matrices along their rows
    (DBRX's, carve.models.experts), each selected as a matrix of its own."""

    scores: MutableMapping[str, torch.Tensor]  # a dict, or a streamed job's SpilledTensors
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.scores[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous().cpu() for k, v in self.scores.items()},
            str(path),
            metadata={"carve": json.dumps(self.meta)},
        )

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False) -> ImportanceMap:
        """An importance map file; a UsageError naming the file when it is not one.  `lazy`: each
        matrix's scores read from the file when asked for (a streamed job's: never the whole map)."""
        with reading_safetensors(path, "an importance map") as f:
            meta = json.loads((f.metadata() or {}).get("carve", "{}"))
            if not isinstance(meta, dict):
                raise ValueError("its carve metadata is not a mapping")
            kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            scores: MutableMapping[str, torch.Tensor] = _FileScores(Path(path), list(kinds)) if lazy else {
                k: f.get_tensor(k) for k in f.keys()}  # fmt: skip
        for k, kind in kinds.items():
            if kind not in ("F16", "BF16", "F32", "F64"):
                raise UsageError(f"{str(path)!r} is not an importance map: {k} holds {kind}, not scores")
        return cls(scores, meta)


class _FileScores(MutableMapping[str, torch.Tensor]):
    """An importance map file's tensors, each read when asked for (an entry set later is held in memory)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self._names = path, names
        self._set: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._set:
            return self._set[key]
        if key not in self._names:
            raise KeyError(key)
        with reading_safetensors(self.path, "an importance map") as f:
            return f.get_tensor(key)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._set[key] = value
        if key not in self._names:
            self._names.append(key)

    def __delitem__(self, key: str) -> None:
        self._set.pop(key, None)
        self._names.remove(key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


class PackedKeep(MutableMapping[str, torch.Tensor]):
    """Keep-masks held bit-packed (one bit per weight, an eighth of a bool tensor), each unpacked when
    read: what a streamed extraction accumulates, so a large model's mask fits its memory budget."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        packed, shape = self._packed[key]
        return unpack_bits(packed, shape)

    def __setitem__(self, key: str, keep: torch.Tensor) -> None:
        self._packed[key] = (pack_bits(keep), list(keep.shape))

    def __delitem__(self, key: str) -> None:
        del self._packed[key]

    def packed(self, key: str) -> tuple[torch.Tensor, list[int]]:
        """The stored bits and shape of `key`, as `Mask.save` writes them (no unpacking)."""
        return self._packed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


@dataclass
class Mask(Mapping[str, torch.Tensor]):
    """Keep-masks per parameter, with algebra, statistics and bit-packed storage."""

    keep: MutableMapping[str, torch.Tensor]  # a dict of bool tensors, or a PackedKeep

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.keep[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keep)

    def __len__(self) -> int:
        return len(self.keep)

    def _zip(self, other: Mask) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        if self.keep.keys() != other.keep.keys():
            raise UsageError("the two masks cover different parameters (masks of different models?)")
        for k, v in self.keep.items():
            if v.shape != other.keep[k].shape:
                raise UsageError(
                    f"the two masks differ in shape at {k} ({tuple(v.shape)} vs {tuple(other.keep[k].shape)})"
                )
            yield k, v, other.keep[k]

    def __and__(self, other: Mask) -> Mask:
        return Mask({k: a & b for k, a, b in self._zip(other)})

    def __or__(self, other: Mask) -> Mask:
        return Mask({k: a | b for k, a, b in self._zip(other)})

    def __invert__(self) -> Mask:
        return Mask({k: ~v for k, v in self.keep.items()})

    @staticmethod
    def vote(masks: list[Mask], at_least: int) -> Mask:
        """Keep a weight kept by at least `at_least` of the masks (TALL/consensus style)."""
        names = masks[0].keep.keys()
        return Mask({k: torch.stack([m[k] for m in masks]).sum(0) >= at_least for k in names})

    def sparsity(self) -> float:
        total = sum(v.numel() for v in self.keep.values())
        kept = sum(int(torch.count_nonzero(v)) for v in self.keep.values())
        return 1 - kept / total if total else 0.0

    def sparsity_per_param(self) -> dict[str, float]:
        return {k: 1 - v.float().mean().item() for k, v in self.keep.items()}

    def jaccard(self, other: Mask) -> float:
        """|A ∩ B| / |A ∪ B| over the kept weights of all parameters."""
        inter = sum(int(torch.count_nonzero(a & b)) for _, a, b in self._zip(other))
        union = sum(int(torch.count_nonzero(a | b)) for _, a, b in self._zip(other))
        return inter / union if union else 1.0

    def save(self, path: str | Path) -> None:
        """Bit-packed: one bit per weight, shapes in the metadata."""
        from safetensors.torch import save_file

        bits = {k: self._bits(k) for k in self.keep}
        shapes = {k: shape for k, (_, shape) in bits.items()}
        save_file({k: b for k, (b, _) in bits.items()}, str(path), metadata={"carve_mask_shapes": json.dumps(shapes)})

    def _bits(self, key: str) -> tuple[torch.Tensor, list[int]]:
        if isinstance(self.keep, PackedKeep):  # already packed: no round trip through bools
            return self.keep.packed(key)
        v = self.keep[key]
        return pack_bits(v), list(v.shape)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """A bit-packed mask file; a UsageError naming the file when it is not a complete one."""
        with reading_safetensors(path, "a carve mask") as f:
            shapes = json.loads((f.metadata() or {})["carve_mask_shapes"])
            ok = isinstance(shapes, dict) and set(shapes) == set(f.keys())
            if not ok or not all(is_shape(v) for v in shapes.values()):
                raise ValueError("its shapes do not match its tensors")
            keep = {}
            for k in f.keys():
                packed = f.get_tensor(k)
                if not holds_bits_of(packed, shapes[k]):
                    raise ValueError(f"{k} holds {tuple(packed.shape)} {packed.dtype}, not the bits of {shapes[k]}")
                keep[k] = unpack_bits(packed, shapes[k])
        return cls(keep)


def is_shape(v: Any) -> bool:
    """Whether a shape read from a file's metadata is one (a short list of sane whole numbers)."""
    return isinstance(v, list) and len(v) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in v)


def holds_bits_of(packed: torch.Tensor, shape: list[int]) -> bool:
    """Whether `packed` is `pack_bits`' output for a mask of `shape`."""
    return packed.dtype == torch.uint8 and packed.dim() == 1 and len(packed) == -(-math.prod(shape) // 8)


@contextmanager
def reading_safetensors(path: str | Path, what: str) -> Iterator[Any]:
    """A safetensors file opened for reading; any damage becomes one UsageError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{str(path)!r} does not exist") from None
    except Exception as exc:  # safetensors' SafetensorError, JSON and shape errors of a damaged file
        raise UsageError(f"{str(path)!r} is not {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, eight entries per byte (row-major, big-endian bit order)."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy().reshape(-1)))


def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The bool tensor of `shape` that `pack_bits` packed."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool)).view(shape)


def select_mask(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None = None,
    granularity: str = "row",
    pattern: str | None = None,
    *,
    packed: bool = False,
) -> Mask:
    """Remove the lowest-scoring `sparsity` share: per output row, per matrix, over all
    matrices at once ("global", ties at the threshold removed in position order: the matrices in
    the map's order, each flattened in its own layout), or as N:M along the input dimension
    (`pattern="2:4"`).  `packed` keeps each matrix's mask bit-packed as it is chosen (PackedKeep: a
    streamed job's masks); a global selection reads each matrix three times and never holds more
    than one (a streamed job's scores stay in their temporary files)."""
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    if granularity == "global" and nm is None:
        return Mask(_select_global(scores, sparsity, packed))
    if granularity not in ("row", "matrix", "global"):
        raise UsageError(f"granularity {granularity!r} is not one of row, matrix, global")
    # scores are in each parameter's layout; GPT-2's Conv1D stores [in, out], so rows and N:M
    # groups are taken on the transpose for the parameters an ImportanceMap marks as such
    meta = scores.meta if isinstance(scores, ImportanceMap) else {}
    transposed, stacked = set(meta.get("transposed", [])), dict(meta.get("experts", {}))
    chosen: MutableMapping[str, torch.Tensor] = PackedKeep() if packed else {}
    for name, v in scores.items():
        if name in stacked:  # [E·rows, cols]: each expert's rows as in a 3-D [E, rows, cols]
            one = _keep(
                v.float().view(int(stacked[name]), -1, v.shape[-1]), name in transposed, sparsity, granularity, nm
            )
            chosen[name] = one.reshape(v.shape)
        else:
            chosen[name] = _keep(v.float(), name in transposed, sparsity, granularity, nm)
    return Mask(chosen)


def _keep(
    v: torch.Tensor, transposed: bool, sparsity: float, granularity: str, nm: tuple[int, int] | None
) -> torch.Tensor:
    """One parameter's keep-mask in its own layout.  A 3-D entry holds an MoE block's experts
    ([E, out, in], or [E, in, out] when transposed: carve.models.experts): each expert is a matrix of
    its own, as when its Linear was scored, so "matrix" and N:M never reach across experts."""
    if v.dim() == 3:
        return torch.stack([_keep(one, transposed, sparsity, granularity, nm) for one in v.unbind(0)])
    if transposed:
        return keep_mask(v.t(), sparsity, granularity, nm).t().contiguous()
    return keep_mask(v, sparsity, granularity, nm)


def _sortable(v: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys in the order of the float32 values: -0.0 equal to +0.0, NaN above +inf (as
    torch.topk ranks it).  Negative floats' bits are flipped so larger magnitudes sort lower."""
    x = v.detach().reshape(-1).to("cpu", torch.float32) + 0.0  # -0.0 + 0.0 = +0.0
    x = torch.where(torch.isnan(x), float("nan"), x)  # every NaN the positive one
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _below(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The first bin whose cumulative count reaches k, and the count in the bins before it."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    return b, int(cum[b - 1]) if b else 0


def _select_global(
    scores: Mapping[str, torch.Tensor], sparsity: float, packed: bool
) -> MutableMapping[str, torch.Tensor]:
    """Keep-masks removing the floor(sparsity·N) lowest of all N scores at once, out of core: the
    threshold is found by a two-pass radix selection on the scores' sortable 32-bit keys (a
    histogram of the high 16 bits over every matrix, then of the low 16 bits inside the bin that
    holds the k-th), and the ties at it are removed in position order, as a stable sort of the
    concatenated scores would (what `_prune_smallest` does inside one matrix)."""
    total = sum(scores[n].numel() for n in scores)
    k = int(total * sparsity)
    chosen: MutableMapping[str, torch.Tensor] = PackedKeep() if packed else {}
    if not k:
        for name in scores:
            chosen[name] = torch.ones_like(scores[name], dtype=torch.bool)
        return chosen
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for name in scores:
        high += torch.bincount((_sortable(scores[name]) >> 16) + 32768, minlength=1 << 16)
    top, before = _below(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for name in scores:
        key = _sortable(scores[name])
        low += torch.bincount(key[(key >> 16) + 32768 == top] & 0xFFFF, minlength=1 << 16)
    bottom, within = _below(low, k - before)
    threshold = (top - 32768) * 65536 + bottom
    ties_out = k - before - within  # how many of the scores equal to the threshold go
    for name in scores:
        v = scores[name]
        key = _sortable(v)
        tie = key == threshold
        removed = (key < threshold) | (tie & (tie.cumsum(0) <= ties_out))
        ties_out -= int(tie.sum())
        chosen[name] = (~removed).view(v.shape).to(v.device)
    return chosen
