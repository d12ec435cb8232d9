"""A model stored as its update over a base model: the changed entries of each parameter as a
bit-packed mask and their values, in one safetensors file (`delta.safetensors`), the base named
by the output's carve.json.  What `carve finetune --save-delta` writes: a 5%-density expert of
the embedded default is ~1/10 of the full model file, and ready for merging (the task vector
θ − θ₀ at the changed entries).

Layout: for each changed parameter NAME, `mask/NAME` (uint8, np.packbits of the row-major bool
mask of changed entries) and `value/NAME` (the changed entries' new values, in mask order, the
parameter's dtype); metadata `carve_mask_shapes` (JSON: NAME -> shape).  Values, not differences,
so applying an update to its base gives the fine-tuned weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from carve.masks.mask import Mask, pack_bits, unpack_bits

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
    from safetensors.torch import save_file

    mask, values = sparse_delta(model, base)
    tensors = {f"mask/{k}": pack_bits(v) for k, v in mask.items()}
    tensors.update({f"value/{k}": v for k, v in values.items()})
    shapes = {k: list(v.shape) for k, v in mask.items()}
    save_file(tensors, str(path), metadata={"carve_mask_shapes": json.dumps(shapes)})
    return sum(int(v.numel()) for v in values.values())


def load_delta(path: str | Path) -> tuple[Mask, dict[str, torch.Tensor]]:
    """(Mask, values) of a saved update."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads((f.metadata() or {})["carve_mask_shapes"])
        keep = {k: unpack_bits(f.get_tensor(f"mask/{k}"), shapes[k]) for k in shapes}
        values = {k: f.get_tensor(f"value/{k}") for k in shapes}
    return Mask(keep), values


def apply_delta(model: nn.Module, mask: Mask, values: dict[str, torch.Tensor]) -> None:
    """Write a saved update's values into its base model, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in mask.items():
            p = params[name]
            idx = keep.reshape(-1).nonzero().squeeze(1).to(p.device)
            p.data.view(-1).index_copy_(0, idx, values[name].to(p.device, p.dtype))
