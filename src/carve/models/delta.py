"""A model stored as its update over a base model: the changed entries of each parameter as a
bit-packed mask and their values, in one safetensors file (`delta.safetensors`), the base named
by the output's carve.json.  What `carve finetune --save-delta` writes: a 5%-density expert of
the embedded default is ~1/10 of the full model file, and ready for merging (the task vector
θ − θ₀ at the changed entries).

Layout: models/sparse.py's mask + values entries, one per changed parameter (the mask marks the
changed entries).  Values, not differences, so applying an update to its base gives the
fine-tuned weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from carve.masks.mask import Mask
from carve.models.sparse import read_entries, write_entries

DELTA_FILE = "delta.safetensors"


def sparse_delta(model: nn.Module, base: dict[str, torch.Tensor]) -> tuple[Mask, dict[str, torch.Tensor]]:
    """Where each parameter changed from `base` (a Mask) and the changed entries' new values."""
    keep: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        b = base.get(name)
        if b is None or b.shape != p.shape:
            continue
        now = p.detach().cpu()
        changed = now != b
        if bool(changed.any()):
            keep[name] = changed
            values[name] = now[changed].contiguous()
    return Mask(keep), values


def save_delta(path: Path, model: nn.Module, base: dict[str, torch.Tensor]) -> int:
    """Write `model`'s update over `base` to `path`; returns the number of changed entries."""
    mask, values = sparse_delta(model, base)
    write_entries(path, {k: (m, values[k]) for k, m in mask.items()})
    return sum(int(v.numel()) for v in values.values())


def load_delta(path: str | Path) -> tuple[Mask, dict[str, torch.Tensor]]:
    """(Mask, values) of a saved update; a UsageError when the file is damaged."""
    masked, _, _ = read_entries(Path(path), "a carve update (delta)")
    return Mask({k: m for k, (m, _) in masked.items()}), {k: v for k, (_, v) in masked.items()}


def apply_delta(model: nn.Module, mask: Mask, values: dict[str, torch.Tensor]) -> None:
    """Write a saved update's values into its base model, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in mask.items():
            p = params[name]
            idx = keep.reshape(-1).nonzero().squeeze(1).to(p.device)
            p.data.view(-1).index_copy_(0, idx, values[name].to(p.device, p.dtype))
