"""One masked training loop for every job that trains (finetune, recover, and later unlearn).

`train(model, batches, loss_fn, trainable, schedule)` runs `schedule.steps` AdamW steps of
`loss_fn(model, ids)` over `batches`, updating only the entries a trainable mask selects:

- `trainable` maps parameter names to a bool keep-tensor of the parameter's shape (True: trained)
  or to None (the whole parameter trained).  Every other parameter is frozen (requires_grad off).
- The optimizer (`MaskedAdamW`) holds its state only for the trained entries: for a masked
  parameter the flat indices (int32) of its trained entries and their first and second moments,
  k values each, so its memory is proportional to the mask's density (as LIFT's sparse AdamW).
  Gradients are gathered into that state by post-accumulate-grad hooks the moment backward has
  produced them and the dense gradient is freed: no full gradient of the model is ever held.
- Frozen entries are never written: updates are scattered into the trained entries only, so
  every other entry stays bitwise unchanged.
- Gradient accumulation: `schedule.batch_size` blocks per step in micro-batches of
  `schedule.micro_batch`; the loss of each micro-batch is scaled so a step sees the mean.
- Global-norm gradient clipping over the trained entries, linear warm-up then cosine decay to
  `schedule.min_lr` of the peak.
- Checkpoints (`checkpoint=Path`, every `schedule.checkpoint_every` steps): the trained entries'
  values and the optimizer state in safetensors, progress (step, losses) in JSON, the RNG state
  as a tensor; written atomically, no pickles.  `resume=True` continues from it and gives the same
  result as an uninterrupted run.

The AdamW update per trained entry (Loshchilov & Hutter, decoupled weight decay), step t:
    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − lr·wd·θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
which is torch.optim.AdamW's (tested against it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve import distributed
from carve.errors import UsageError
from carve.models.load import first_parameter
from carve.output import atomic_output_dir, recover_replaced, remove_path, write_json
from carve.progress import progress

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """How a training run steps: one frozen value instead of a dozen arguments."""

    steps: int
    lr: float
    batch_size: int = 1  # blocks per optimizer step
    micro_batch: int = 1  # blocks per forward/backward (gradient accumulation)
    warmup: int = 10  # linear warm-up steps, then cosine decay to min_lr · lr
    min_lr: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip: float | None = 1.0  # global gradient-norm clip (None: none)
    checkpoint_every: int = 50

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span)))


class MaskedAdamW:
    """AdamW over the trained entries of the named parameters only (see the module docstring)."""

    def __init__(self, params: Mapping[str, nn.Parameter], trainable: Mapping[str, torch.Tensor | None], s: Schedule):
        self.params = {n: params[n] for n in trainable}
        self.s = s
        self.step_count = 0
        self.idx: dict[str, torch.Tensor | None] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        for n, keep in trainable.items():
            p = self.params[n]
            if keep is not None and keep.shape != p.shape:
                raise ValueError(f"mask of {n} has shape {tuple(keep.shape)}, the parameter {tuple(p.shape)}")
            if keep is None or bool(keep.all()):
                self.idx[n] = None
                size = p.numel()
            else:
                self.idx[n] = keep.reshape(-1).nonzero().squeeze(1).to(torch.int32).to(p.device)
                size = int(self.idx[n].numel())  # type: ignore[union-attr]
            for buf in (self.m, self.v, self.g):
                buf[n] = torch.zeros(size, dtype=torch.float32, device=p.device)

    def trained_entries(self) -> int:
        return sum(int(t.numel()) for t in self.m.values())

    def state_bytes(self) -> int:
        """Bytes of optimizer state: moments and indices (the gathered-gradient buffer is not state)."""
        moments = sum(t.numel() * t.element_size() for buf in (self.m, self.v) for t in buf.values())
        return moments + sum(t.numel() * t.element_size() for t in self.idx.values() if t is not None)

    def gather(self, name: str, grad: torch.Tensor) -> None:
        """Fold a parameter's dense gradient into its trained entries (called from backward)."""
        flat = grad.detach().reshape(-1)
        idx = self.idx[name]
        self.g[name].add_((flat if idx is None else flat[idx.long()]).float())

    def hooks(self) -> list[Any]:
        def fold(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                assert p.grad is not None
                self.gather(name, p.grad)
                p.grad = None  # freed at once: no dense gradient outlives its backward

            return hook

        return [p.register_post_accumulate_grad_hook(fold(n)) for n, p in self.params.items()]

    @torch.no_grad()
    def sum_over_ranks(self) -> None:
        """Under torch.distributed, each rank's gathered gradients become their sum over the ranks
        (each micro-batch's loss is already scaled by its share of the step); one process: nothing."""
        for name in sorted(self.g):
            distributed.sum_(self.g[name])

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """One AdamW step from the gathered gradients (then cleared); returns the gradient norm."""
        s = self.s
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(self.g.values())))).item()
        scale = min(1.0, s.clip / (norm + 1e-6)) if s.clip is not None else 1.0
        self.step_count += 1
        b1, b2 = s.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        names = list(self.params)
        g, m, v = ([buf[n] for n in names] for buf in (self.g, self.m, self.v))
        # the trained entries in float32: a float32 parameter's own storage when it is trained
        # whole, else a gathered copy written back after the update
        theta = []
        for n in names:
            flat, idx = self.params[n].data.view(-1), self.idx[n]
            theta.append(
                flat
                if idx is None and flat.dtype == torch.float32
                else (flat if idx is None else flat[idx.long()]).float()
            )
        # torch's foreach AdamW: denominators √v/√c2 + ε, step lr/c1, decoupled decay
        torch._foreach_mul_(g, scale)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(c2))
        torch._foreach_add_(denom, s.eps)
        if s.weight_decay:
            torch._foreach_mul_(theta, 1 - lr * s.weight_decay)
        torch._foreach_addcdiv_(theta, m, denom, value=-lr / c1)
        for n, t in zip(names, theta, strict=True):
            flat, idx = self.params[n].data.view(-1), self.idx[n]
            if idx is not None:
                flat.index_copy_(0, idx.long(), t.to(flat.dtype))
            elif t.data_ptr() != flat.data_ptr():
                flat.copy_(t)
        torch._foreach_zero_(g)
        return norm

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            idx = self.idx[n]
            flat = p.detach().reshape(-1)
            out[f"value/{n}"] = (flat if idx is None else flat[idx.long()]).contiguous().cpu()
            out[f"m/{n}"], out[f"v/{n}"] = self.m[n].cpu(), self.v[n].cpu()
            if idx is not None:
                out[f"idx/{n}"] = idx.cpu()
        return out

    @torch.no_grad()
    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], where: str) -> None:
        for n, p in self.params.items():
            idx = self.idx[n]
            same = f"m/{n}" in saved and saved[f"m/{n}"].numel() == self.m[n].numel()
            if same and idx is not None:
                same = f"idx/{n}" in saved and torch.equal(saved[f"idx/{n}"], idx.cpu())
            if not same:
                raise UsageError(f"checkpoint {where!r} was written for other trainable weights ({n} differs)")
            self.m[n].copy_(saved[f"m/{n}"])
            self.v[n].copy_(saved[f"v/{n}"])
            flat = p.data.view(-1)
            value = saved[f"value/{n}"].to(flat.device, flat.dtype)
            if idx is None:
                flat.copy_(value)
            else:
                flat.index_copy_(0, idx.long(), value)


@dataclass
class TrainResult:
    losses: list[float]
    trained_entries: int  # parameters the optimizer updates
    optimizer_state_mb: float
    resumed_from_step: int | None = None
    grad_norms: list[float] = field(default_factory=list)
    stopped_at: int | None = None  # the step `on_step` stopped training at, before the schedule's last

    def describe(self, schedule: Schedule, block_len: int) -> dict[str, Any]:
        """The manifest's `training` section (`steps`: the schedule's; `tokens`: those trained on)."""
        done = self.stopped_at or schedule.steps
        return {
            "steps": schedule.steps,
            "stopped_at_step": self.stopped_at,
            "lr": schedule.lr,
            "tokens": done * schedule.batch_size * block_len,
            "trainable_parameters": self.trained_entries,
            "optimizer_state_mb": self.optimizer_state_mb,
            "resumed_from_step": self.resumed_from_step,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "losses": self.losses,
        }


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter that requires a gradient, trained whole (e.g. a PEFT model's adapters)."""
    return {n: None for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, opt: MaskedAdamW, step: int, losses: list[float], run: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = opt.state_tensors()
    tensors["rng/cpu"] = torch.get_rng_state()
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"optimizer_step": str(opt.step_count)})
        write_json(tmp / "progress.json", {"step": step, "losses": losses, "run": run})


def _check_same_run(path: Path, saved: Any, run: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with other settings: the manifest would describe a run that
    never happened."""
    run = json.loads(json.dumps(run))  # as the checkpoint holds it (tuples as lists)
    if not isinstance(saved, dict):
        raise UsageError(f"checkpoint {str(path)!r} does not record its run's settings; start over with --overwrite")
    changed = [f"{k} {saved.get(k)!r} -> {run.get(k)!r}" for k in sorted({*saved, *run}) if saved.get(k) != run.get(k)]
    if changed:
        raise UsageError(
            f"checkpoint {str(path)!r} was written by a run with other settings ({'; '.join(changed)}): resume with "
            "the same settings, or pass --overwrite to start over"
        )


def _load_checkpoint(path: Path, opt: MaskedAdamW, run: dict[str, Any]) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    damaged = f"checkpoint {str(path)!r} is incomplete or damaged"
    try:
        info = json.loads((path / "progress.json").read_text())
        step, losses = int(info["step"]), [float(x) for x in info["losses"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{damaged} ({type(exc).__name__}: {exc}); start over with --overwrite") from None
    _check_same_run(path, info.get("run"), run)
    try:
        saved = load_file(str(path / "state.safetensors"))
    except Exception as exc:  # safetensors' own error type for a damaged file
        raise UsageError(f"{damaged} ({type(exc).__name__}: {exc}); start over with --overwrite") from None
    if "rng/cpu" not in saved or not 0 <= step <= opt.s.steps:
        raise UsageError(f"{damaged} (its step or random state is missing); start over with --overwrite")
    opt.load_state_tensors(saved, str(path))
    opt.step_count = step
    torch.set_rng_state(saved["rng/cpu"])
    return step, losses


def has_checkpoint(path: Path) -> bool:
    recover_replaced(path)
    return path.is_dir()


def checkpoint_dir(out: str | Path) -> Path:
    p = Path(out).expanduser()
    return p.parent / f"{p.name}.checkpoint"


def check_checkpoint(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """The run's checkpoint directory, after refusing to ignore or silently replace one."""
    ckpt = checkpoint_dir(out)
    if resume and not has_checkpoint(ckpt):
        raise UsageError(f"nothing to resume: {str(ckpt)!r} does not exist")
    if has_checkpoint(ckpt) and not resume:
        if not overwrite:
            raise UsageError(
                f"{str(ckpt)!r} holds an interrupted run: pass --resume to continue it or --overwrite to start over"
            )
        remove_checkpoint(ckpt)
    return ckpt


def train(
    model: nn.Module,
    batches: torch.Tensor,
    loss_fn: LossFn,
    trainable: Mapping[str, torch.Tensor | None],
    schedule: Schedule,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    run: dict[str, Any] | None = None,
    on_step: Callable[[int], bool | None] | None = None,
    desc: str = "training",
) -> TrainResult:
    """Train the `trainable` entries of `model` in place on `batches` [n >= steps·batch_size, L]
    (step i takes rows i·batch_size ...).  `on_step(done)` runs after each step (and its checkpoint);
    training stops there when it returns True (`TrainResult.stopped_at`).
    `run`: the settings a checkpoint records and a resume must match (JSON values)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        raise ValueError(f"trainable names that are not parameters: {unknown[:3]}")
    if len(batches) < schedule.steps * schedule.batch_size:
        raise ValueError(f"{len(batches)} blocks for {schedule.steps} steps of {schedule.batch_size}")
    opt = MaskedAdamW(params, trainable, schedule)
    start, losses = 0, list[float]()
    if resume:
        assert checkpoint is not None
        start, losses = _load_checkpoint(checkpoint, opt, run or {})
    before = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    handles = opt.hooks()
    device = first_parameter(model).device
    norms: list[float] = []
    stopped: int | None = None
    was_training = model.training
    model.train()
    try:
        steps = progress(range(start, schedule.steps), desc, total=schedule.steps, initial=start)
        for step in steps:
            rows = batches[step * schedule.batch_size : (step + 1) * schedule.batch_size]
            total = 0.0
            # data parallel: this rank's share of the step's micro-batches (one process: all)
            micro = distributed.shard(list(rows.split(schedule.micro_batch)),
                                      "micro-batches of a training step (--batch-size / --micro-batch)")  # fmt: skip
            for ids in micro:
                loss = loss_fn(model, ids.to(device))
                (loss * (len(ids) / len(rows))).backward()
                total += loss.item() * len(ids) / len(rows)
            total = distributed.sum_float(total)
            opt.sum_over_ranks()
            norms.append(opt.step(schedule.lr_at(step)))
            losses.append(round(total, 5))
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            due = done % schedule.checkpoint_every == 0 and done < schedule.steps
            if checkpoint is not None and due and distributed.writes():
                _save_checkpoint(checkpoint, opt, done, losses, run or {})
            if on_step is not None and on_step(done):
                stopped = done if done < schedule.steps else None
                break
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(before[n])
            p.grad = None
        model.train(was_training)
    return TrainResult(
        losses, opt.trained_entries(), round(opt.state_bytes() / 2**20, 3), start if resume else None, norms, stopped
    )


def remove_checkpoint(path: Path) -> None:
    remove_path(path)  # whole or gone, never half a checkpoint
