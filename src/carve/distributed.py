"""carve under torch.distributed (`torchrun --nproc-per-node N -m carve extract ...`, or the Python
API inside an initialized process group): calibration is sharded across ranks, statistics are
all-reduced, every rank then prunes the same way, and rank 0 alone writes.

With one process (no process group, or a world of one) every function here is the identity: the
engines run exactly as before.

- `shard(items)`: this rank's share of the calibration batches (rank r takes items r, r+N, ...).
- `sum_(tensor)`: summed over the ranks in place.  The layer-wise statistics (Hessians, Wanda's row
  norms) are float64 sums over tokens (carve.scorers.stats), so the statistic of N ranks equals one
  process's up to float64 rounding, hidden by the cast to float32: the same mask.  An all-reduce
  gives every rank the same bits, so every rank's pruning step chooses the same mask.
- `merge_mean(tensor, n)`: a mean over n items on each rank made the mean over all ranks' items, in
  place; returns the total count (the gradient engine's per-weight means: float32, so equal to one
  process's within float tolerance, not bit for bit).
- `owners(costs)`, `broadcast_(tensor, src)`, `broadcast_json(obj, src)`: the per-Linear OBS sweeps
  of a block are shared out (each Linear to one rank, by cost) and their results (weights, masks,
  notes) broadcast from the rank that computed them, so every rank ends each block with the same
  bits (ops/prune.py's `_spread`).
- `writes()`: whether this process writes outputs (rank 0).
- The masked training loop (ops/train.py) shares each step's micro-batches out the same way and
  sums the gathered gradients over the ranks before the optimizer step (data parallel, as DDP):
  every rank then takes the same step.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import torch

from carve.errors import UsageError

T = TypeVar("T")


def _dist() -> object | None:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1  # type: ignore[attr-defined]


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0  # type: ignore[attr-defined]


def active() -> bool:
    return world() > 1


def writes() -> bool:
    return rank() == 0


def shard(items: list[T], what: str = "calibration batches") -> list[T]:
    """This rank's share of `items`; every rank must get at least one."""
    n = world()
    if n == 1:
        return items
    if len(items) < n:
        raise UsageError(f"{len(items)} {what} cannot be shared by {n} processes: use at least {n}")
    return items[rank() :: n]


def owners(costs: dict[str, float]) -> dict[str, int]:
    """Which rank does each item: largest cost first (ties by name) onto the least-loaded rank
    (lowest rank on ties).  The same answer on every rank; one process: all rank 0."""
    load = [0.0] * world()
    out: dict[str, int] = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(len(load)), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += costs[name]
    return out


def wire_device(device: torch.device, config: str | None = None) -> torch.device:
    """Where a tensor on `device` goes for a collective of the process group whose backend config
    is `config` (`torch.distributed.get_backend_config()`: "cpu:gloo,cuda:nccl", "cuda:nccl", ...):
    its own device when the group has a backend for that device type, else the current CUDA device
    when the group has one for CUDA (a group initialized with "nccl" alone carries no CPU tensor:
    carve's small CPU counts, notes and statistics go through the GPU there)."""
    if config is None:
        import torch.distributed as dist

        config = dist.get_backend_config()
    kinds = {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if not kinds or device.type in kinds:
        return device
    if "cuda" in kinds:
        return torch.device("cuda", torch.cuda.current_device())
    raise UsageError(f"the process group's backends ({config}) cannot carry {device.type} tensors")


def _collective(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    """`op(t)` on `tensor`, or on a copy on the device the group's backend needs, copied back."""
    device = wire_device(tensor.device)
    if device == tensor.device:
        op(tensor)
        return tensor
    moved = tensor.to(device)
    op(moved)
    tensor.copy_(moved)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """`tensor` (contiguous) overwritten in place on every rank by rank `src`'s bits (one process:
    as is).  Sent as raw bytes, so any dtype (bfloat16, bool) goes through any backend."""
    if active():
        import torch.distributed as dist

        _collective(tensor.view(torch.uint8), lambda t: dist.broadcast(t, src=src))
    return tensor


def broadcast_json(obj: Any, src: int) -> Any:
    """A JSON-serializable object as rank `src` has it (one process: as is): small per-Linear notes.
    Sent as JSON text, never pickled."""
    if not active():
        return obj
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8) if rank() == src else None
    size = broadcast_(torch.tensor([0 if data is None else data.numel()], dtype=torch.int64), src)
    buf = data if data is not None else torch.empty(int(size.item()), dtype=torch.uint8)
    return json.loads(bytes(broadcast_(buf, src).tolist()).decode())


def merge_mean(tensor: torch.Tensor, n: int) -> int:
    """`tensor`, a mean over `n` items on this rank, becomes the mean over every rank's items."""
    if not active():
        return n
    import torch.distributed as dist

    count = torch.tensor([float(n)], dtype=torch.float64, device=tensor.device)
    _collective(count, dist.all_reduce)
    tensor.mul_(n)
    _collective(tensor, dist.all_reduce)
    total = int(count.item())
    tensor.div_(total)
    return total


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (one process: as is)."""
    if active():
        import torch.distributed as dist

        _collective(tensor, dist.all_reduce)
    return tensor


def sum_float(x: float) -> float:
    if not active():
        return x
    return float(sum_(torch.tensor([x], dtype=torch.float64)).item())


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA (with gloo for CPU tensors), gloo on CPU.  Returns whether a group is (now) initialized."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dist.is_available() and dist.is_initialized()
    if not dist.is_initialized():
        # with CUDA, NCCL for the GPU's tensors and gloo beside it for the CPU's (counts, notes)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True
