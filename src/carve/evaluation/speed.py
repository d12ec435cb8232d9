"""Inference speed on the current device: prefill and greedy-decode tokens per second, batch 1.

- prefill: one forward pass over a `prompt` of P tokens (logits of the last position only, as a
  generation's first step computes them); tokens/s = P / seconds.
- decode: greedy generation of exactly `new_tokens` tokens with the KV cache after a 16-token
  prompt; tokens/s = new_tokens / seconds (the short prompt's prefill is included).
Each figure is the best of `repeats` timed runs after one untimed warm-up run: the least
disturbed run on a shared machine.  Compare two models only with figures from the same process.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from carve.models.arch import last_logits
from carve.models.load import first_parameter
from carve.progress import progress


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def measure_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 128, repeats: int = 3) -> dict[str, Any]:
    """Prefill and decode tokens/s of `model` for a [1, P] `prompt` (see the module docstring)."""
    device = first_parameter(model).device
    ids = prompt.reshape(1, -1).to(device)
    was_training = model.training
    model.eval()

    def prefill() -> None:
        last_logits(model, ids, 1)

    short = ids[:, :16]

    def decode() -> None:
        model.generate(  # type: ignore[operator]
            short,
            attention_mask=torch.ones_like(short),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    try:
        steps = progress(["prefill", "decode"], "speed")
        seconds = {name: _best_seconds(prefill if name == "prefill" else decode, repeats) for name in steps}
    finally:
        model.train(was_training)
    return {
        "prefill_tokens_per_s": round(ids.shape[1] / seconds["prefill"], 2),
        "decode_tokens_per_s": round(new_tokens / seconds["decode"], 2),
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def speedup(dense: dict[str, Any], extracted: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `speed` entry: both measurements and their ratios (extracted / dense)."""
    return {
        "dense": dense,
        "extracted": extracted,
        "prefill_speedup": round(extracted["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"], 3),
        "decode_speedup": round(extracted["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3),
    }
