"""Facts about extracted models and their masks, for `carve inspect` and `carve report`:
per-layer sparsity, the overlap of two masks per layer (which weights two domains share and
which each keeps alone), importance by module.  A target is a carve output directory (its
carve.json, mask.safetensors, importance.safetensors) or a mask / importance file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.manifest import read_manifest
from carve.masks.mask import ImportanceMap, Mask, reading_safetensors

MASK_FILE, IMPORTANCE_FILE = "mask.safetensors", "importance.safetensors"


def layer_and_type(param: str) -> tuple[int | None, str]:
    """("model.layers.12.mlp.down_proj.weight") -> (12, "mlp.down_proj"): the first integer
    component is the block index, what follows it (without .weight) the module type."""
    parts = param.removesuffix(".weight").split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p):
            return int(p), ".".join(parts[i + 1 :]) or p
    return None, ".".join(parts)


@dataclass
class Run:
    """What one target holds (any part may be missing)."""

    name: str
    manifest: dict[str, Any] | None = None
    mask: Mask | None = None
    importance: ImportanceMap | None = None
    tall: dict[str, Mask] | None = None  # a merge's TALL masks, by task
    selection: dict[str, Any] | None = None  # a `carve select` manifest (its output, or a job's domain's)


def _is_mask(path: Path) -> bool:
    with reading_safetensors(path, "a mask or importance map") as f:
        return "carve_mask_shapes" in (f.metadata() or {})


def load_run(target: str | Path) -> Run:
    path = Path(target).expanduser()
    if path.is_dir():
        run = Run(path.name, manifest=read_manifest(path))
        if (path / MASK_FILE).is_file():
            run.mask = Mask.load(path / MASK_FILE)
        if (path / IMPORTANCE_FILE).is_file():
            run.importance = ImportanceMap.load(path / IMPORTANCE_FILE)
        from carve.tall import TALL_FILE, load_masks

        if (path / TALL_FILE).is_file():
            run.tall = {t: Mask(m) for t, m in load_masks(path / TALL_FILE)[0].items()}
        run.selection = (((run.manifest or {}).get("data") or {}).get("domain") or {}).get("selection")
        return run
    if path.is_file() and path.suffix == ".jsonl":
        from carve.selection import read_selection

        selection = read_selection(path)
        if selection is None:
            raise UsageError(f"{str(target)!r} is no carve select output (its .carve.json is missing)")
        return Run(path.stem, selection=selection)
    if path.is_file():
        if _is_mask(path):
            return Run(path.stem, mask=Mask.load(path))
        return Run(path.stem, importance=ImportanceMap.load(path))
    raise UsageError(f"{str(target)!r} does not exist")


def per_layer_sparsity(mask: Mask) -> dict[int | None, dict[str, float]]:
    """Block index -> module type -> share of removed weights."""
    out: dict[int | None, dict[str, float]] = {}
    for name, keep in mask.items():
        layer, kind = layer_and_type(name)
        out.setdefault(layer, {})[kind] = 1 - keep.float().mean().item()
    return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def tall_categories(masks: dict[str, Mask]) -> list[dict[str, Any]]:
    """Per block (and overall, layer "all"), the TALL paper's categories of weights: shared (kept
    by two or more tasks' masks), selfish (by exactly one), catastrophic (by none), and each task's
    kept share."""
    tasks = list(masks)
    acc: dict[Any, dict[str, float]] = {}
    for name in masks[tasks[0]]:
        votes = torch.stack([masks[t][name] for t in tasks]).sum(dim=0)
        layer, _ = layer_and_type(name)
        for key in (layer, "all"):
            a = acc.setdefault(key, {"n": 0, "shared": 0, "selfish": 0, "catastrophic": 0, **{t: 0 for t in tasks}})
            a["n"] += votes.numel()
            a["shared"] += int((votes >= 2).sum())
            a["selfish"] += int((votes == 1).sum())
            a["catastrophic"] += int((votes == 0).sum())
            for t in tasks:
                a[t] += int(masks[t][name].sum())
    order = sorted((k for k in acc if k != "all"), key=lambda k: -1 if k is None else k)
    return [{"layer": k, **{c: v / acc[k]["n"] for c, v in acc[k].items() if c != "n"}} for k in [*order, "all"]]


def per_layer_overlap(a: Mask, b: Mask) -> list[dict[str, Any]]:
    """Per block, over its weights: Jaccard |A∩B|/|A∪B| of the kept sets, and the shares of
    weights kept by both, by A only, by B only and by neither."""
    if a.keys() != b.keys():
        raise UsageError("the two masks cover different weights (masks of different models?)")
    acc: dict[int | None, list[int]] = {}
    for name in a:
        ka, kb = a[name], b[name]
        layer, _ = layer_and_type(name)
        row = acc.setdefault(layer, [0, 0, 0, 0, 0])
        row[0] += int((ka & kb).sum())
        row[1] += int((ka & ~kb).sum())
        row[2] += int((~ka & kb).sum())
        row[3] += int((~ka & ~kb).sum())
        row[4] += ka.numel()
    rows = []
    for layer, (both, only_a, only_b, neither, n) in sorted(acc.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        union = both + only_a + only_b
        rows.append(
            {
                "layer": layer,
                "jaccard": both / union if union else 1.0,
                "both": both / n,
                "only_a": only_a / n,
                "only_b": only_b / n,
                "neither": neither / n,
            }
        )
    return rows


def importance_by_type(imp: ImportanceMap, sample: int = 20000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Module type -> a seeded sample of its scores (for distributions), all blocks pooled."""
    gen = torch.Generator().manual_seed(seed)
    pooled: dict[str, list[torch.Tensor]] = {}
    for name, scores in imp.items():
        _, kind = layer_and_type(name)
        flat = scores.float().reshape(-1)
        idx = torch.randint(0, flat.numel(), (min(sample, flat.numel()),), generator=gen)
        pooled.setdefault(kind, []).append(flat[idx])
    return {k: torch.cat(v) for k, v in pooled.items()}


def top_modules(imp: ImportanceMap, k: int = 10) -> list[tuple[str, float]]:
    """The `k` modules with the highest mean importance."""
    means = [(name.removesuffix(".weight"), scores.float().mean().item()) for name, scores in imp.items()]
    return sorted(means, key=lambda t: -t[1])[:k]
