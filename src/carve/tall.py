"""TALL masks as a product (Wang et al. 2024, arXiv 2405.07813): one merged model plus one bit per
weight per task, from which each task's expert is rebuilt.

For task t, with τ_t = θ_t − θ₀ and τ_MTL = θ_merged − θ₀ (the merge's task vector, as saved):
m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}; the rebuilt expert is θ₀ where m_t is 0 and θ_merged where it
is 1 (θ₀ + m_t ⊙ τ_MTL, taken from the stored tensors so no rounding enters).  λ_t is chosen per
task from a grid by the rebuilt expert's perplexity on held-out blocks of the task's domain that the
evaluation does not use (`carve merge --select-blocks`, after its `--eval-blocks`).  Consensus
merging keeps τ_MTL only where at least k tasks' masks select it.

`tall_masks.safetensors`: for each task and tensor, `TASK/NAME` (uint8, np.packbits of the mask);
metadata `carve_mask_shapes` (JSON: key -> shape) and `carve_tall` (JSON: task -> λ_t).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.masks.mask import holds_bits_of, is_shape, pack_bits, reading_safetensors, unpack_bits
from carve.models.stream import StreamWriter, TensorSource
from carve.ops.merge import consensus_mask, tall_mask

TALL_FILE = "tall_masks.safetensors"
GRID = (0.2, 0.3, 0.4, 0.5, 0.6)  # the paper's λ_t candidates


def _masks(base: TensorSource, expert: TensorSource, merged: TensorSource, lam: float) -> dict[str, torch.Tensor]:
    out = {}
    for name in base.names():
        b = base.get(name)
        if b.is_floating_point():
            b = b.float()
            out[name] = tall_mask(expert.get(name).float() - b, merged.get(name).float() - b, lam)
    return out


def _rebuild_into(
    model: torch.nn.Module, base: TensorSource, merged: TensorSource, masks: dict[str, torch.Tensor]
) -> None:
    """The rebuilt expert's weights copied into `model` (in place)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, m in masks.items():
            if name in state:
                state[name].copy_(torch.where(m, merged.get(name), base.get(name)))


def choose(
    base_dir: Path,
    merged_dir: Path,
    experts: dict[str, Path],
    select: dict[str, Any],
    held_out: dict[str, Any] | None = None,
    grid: tuple[float, ...] = GRID,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Each task's mask at its best λ_t by the rebuilt expert's domain perplexity on its `select`
    blocks, and what was measured: every λ_t tried (`tried`, on `select`), and, with `held_out`
    (blocks disjoint from `select`), the chosen rebuilt expert's metrics on them (`rebuilt`)."""
    from carve.job import metrics_of
    from carve.models.load import load_model
    from carve.progress import progress

    model = load_model(str(merged_dir)).model
    chosen: dict[str, dict[str, torch.Tensor]] = {}
    report: dict[str, Any] = {}
    with TensorSource(base_dir) as base, TensorSource(merged_dir) as merged:
        for task, d in experts.items():
            with TensorSource(d) as expert:
                tried = {}
                for lam in progress(grid, desc=f"TALL λ ({task})"):
                    _rebuild_into(model, base, merged, _masks(base, expert, merged, lam))
                    tried[lam] = metrics_of(model, select[task])
                best = min(tried, key=lambda lam: tried[lam]["domain_ppl"])
                chosen[task] = _masks(base, expert, merged, best)
                report[task] = {"lambda": best, "tried": {str(k): v["domain_ppl"] for k, v in tried.items()},
                                "chosen_on_blocks": tried[best]["domain_eval_blocks"],
                                "mask_density": _density(chosen[task])}  # fmt: skip
                if held_out is not None:
                    _rebuild_into(model, base, merged, chosen[task])
                    report[task]["rebuilt"] = metrics_of(model, held_out[task])
    return chosen, report


def _density(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return round(kept / max(1, sum(m.numel() for m in masks.values())), 5)


def save_masks(path: Path, masks: dict[str, dict[str, torch.Tensor]], lambdas: dict[str, float]) -> None:
    from safetensors.torch import save_file

    packed = {f"{t}/{n}": pack_bits(m) for t, ms in masks.items() for n, m in ms.items()}
    shapes = {f"{t}/{n}": list(m.shape) for t, ms in masks.items() for n, m in ms.items()}
    meta = {"carve_mask_shapes": json.dumps(shapes), "carve_tall": json.dumps(lambdas)}
    save_file(packed, str(path), metadata=meta)


def load_masks(path: Path, task: str | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """(task -> name -> mask, task -> λ_t) of a TALL mask file (one task's only when `task` is given)."""
    with reading_safetensors(path, "a TALL mask file") as f:
        meta = f.metadata() or {}
        shapes, lambdas = json.loads(meta.get("carve_mask_shapes", "null")), json.loads(meta.get("carve_tall", "null"))
        if (
            not isinstance(shapes, dict)
            or not isinstance(lambdas, dict)
            or not all(is_shape(s) for s in shapes.values())
        ):
            raise ValueError("its carve_mask_shapes / carve_tall metadata is missing")
        if task is not None and task not in lambdas:
            raise UsageError(f"{str(path)!r} has no task {task!r}; it has {', '.join(lambdas)}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, shape in shapes.items():
            t, _, name = key.partition("/")
            if task is not None and t != task:
                continue
            bits = f.get_tensor(key)
            if not holds_bits_of(bits, shape):
                raise ValueError(f"{key} does not hold {shape}'s bits")
            out.setdefault(t, {})[name] = unpack_bits(bits, shape)
    return out, {str(k): float(v) for k, v in lambdas.items()}


def _select(base_dir: Path, merged_dir: Path, keep_of: Any, out_dir: Path) -> float:
    """The merged weights where `keep_of(name)` (a mask, or None: all of it) is set and the base's
    elsewhere, streamed into `out_dir`; returns the share of masked entries kept."""
    kept = total = 0
    with TensorSource(base_dir) as base, TensorSource(merged_dir) as merged:
        names = merged.names()
        writer = StreamWriter(out_dir, [(n, merged.dtype(n), merged.shape(n)) for n in names])
        try:
            for n in names:
                m, keep = merged.get(n), keep_of(n)
                if keep is not None:
                    m = torch.where(keep, m, base.get(n).to(m.dtype))
                    kept, total = kept + int(keep.sum()), total + keep.numel()
                writer.write(n, m)
        finally:
            writer.close()
    return kept / total if total else 1.0


def apply_consensus(
    base_dir: Path, merged_dir: Path, masks: dict[str, dict[str, torch.Tensor]], at_least: int, out_dir: Path
) -> float:
    """The merged model kept only where at least `at_least` tasks' masks select (θ₀ elsewhere),
    streamed into `out_dir`; returns the share of entries kept."""
    tasks = list(masks)

    def keep_of(n: str) -> torch.Tensor | None:
        return consensus_mask([masks[t][n] for t in tasks], at_least) if n in masks[tasks[0]] else None

    return _select(base_dir, merged_dir, keep_of, out_dir)


def reconstruct(merged_dir: str | Path, task: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """`carve merge --reconstruct TASK --merged DIR --out OUT`: the task's expert rebuilt from a TALL
    output (its base, its merged model and its masks), written atomically; returns its manifest."""
    from carve.manifest import read_manifest
    from carve.output import atomic_output_dir, claim, write_json

    merged_dir = Path(merged_dir).expanduser()
    if not (merged_dir / TALL_FILE).is_file():
        raise UsageError(f"{str(merged_dir)!r} holds no {TALL_FILE}: merge with --tall first")
    manifest = read_manifest(merged_dir)
    base_dir = Path(str((manifest.get("source") or {}).get("model"))).expanduser()
    if not base_dir.is_dir():
        raise UsageError(
            f"the base {str(base_dir)!r} named in {str(merged_dir)!r}'s carve.json is not a directory here"
        )
    masks, lambdas = load_masks(merged_dir / TALL_FILE, task)
    with claim(out), atomic_output_dir(out, overwrite) as tmp:
        _select(base_dir, merged_dir, masks[task].get, tmp)
        for f in merged_dir.iterdir():
            if f.is_file() and not f.name.startswith(("model", "carve.json", TALL_FILE.split(".")[0])):
                shutil.copy2(f, tmp / f.name)
        new: dict[str, Any] = {k: manifest[k] for k in ("carve_manifest", "versions", "source") if k in manifest}
        new["job"] = "reconstruct"
        new["reconstructed"] = {"task": task, "lambda": lambdas[task], "from": str(merged_dir)}
        write_json(tmp / "carve.json", new)
    return new


def retained_gain(base_ppl: float, expert_ppl: float, ppl: float) -> float | None:
    """The share of the expert's log-perplexity gain over the base that `ppl` keeps."""
    gain = math.log(base_ppl) - math.log(expert_ppl)
    return round((math.log(base_ppl) - math.log(ppl)) / gain, 4) if gain else None
