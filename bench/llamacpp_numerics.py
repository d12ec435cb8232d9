"""Where llama.cpp's own numerics, not the export, part its logits from transformers': the Gemma 3n row.

    .venv/bin/python bench/llamacpp_numerics.py      (after bench/export_archs.py --kinds gemma3n)

bench/export_archs.py's gemma3n row agrees with transformers at fewer positions than the other rows
(its tiny random model is sensitive: transformers against itself with its weights rounded to f16
changes the top-1 token at dozens of positions). This script takes that row's model, exports it with
`carve export --type f32` (the CLI), and scores the same 200-token block (seed 1):
- in llama.cpp with its default f16 key/value cache, and with a float32 cache;
- in transformers as it is; with the activation-sparsity cutoff's spread taken over n - 1 channels, as
  llama.cpp's gemma3n does (transformers: over n); and with that and GELU computed on f16 inputs and
  rounded to f16, as ggml's CPU GELU does (a lookup table of f16 values);
- in transformers with its weights rounded to f16, against itself: how far rounding alone moves it.
Each pair: top-1 agreement over 199 positions and the largest logit difference.
Results: bench/results/llamacpp_numerics.jsonl; the table: the `llamacpp-numerics` section of bench/RESULTS.md.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, OUT, commit, load_results, save_result, write_section
from llamacpp import run_gguf

RESULTS = HERE / "results" / "llamacpp_numerics.jsonl"
CARVE = str(Path(sys.executable).with_name("carve"))
SOURCE = OUT / "export-archs-gemma3n"


class _F16Gelu(torch.nn.Module):
    """ggml's CPU GELU: its input rounded to f16, its value a rounded f16 (tanh approximation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def _spread_over_n_minus_1(self: Any, inputs: torch.Tensor) -> torch.Tensor:
    """Gemma 3n's activation-sparsity cutoff with the spread over n - 1 channels (llama.cpp's)."""
    level = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.activation_sparsity)).to(inputs.dtype)
    cutoff = inputs.mean(-1, keepdim=True) + inputs.std(-1, keepdim=True, unbiased=True) * level
    return torch.nn.functional.relu(inputs - cutoff)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    same = int((a.argmax(-1) == b.argmax(-1))[:-1].sum())
    return {"id": name, "top1_agree": same, "positions": a.shape[0] - 1,
            "max_logit_diff": round(float((a - b).abs().max()), 5)}  # fmt: skip


def rows() -> list[dict[str, Any]]:
    import transformers.models.gemma3n.modeling_gemma3n as gemma3n
    from transformers import AutoModelForCausalLM

    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} is missing: run bench/export_archs.py --kinds gemma3n first")
    gguf = OUT / "llamacpp-numerics-gemma3n.f32.gguf"
    subprocess.run([CARVE, "export", str(SOURCE), "--gguf", str(gguf), "--type", "f32", "--overwrite", "--quiet"],
                   check=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(SOURCE).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    cpp = {}
    for kv_f32 in (False, True):
        path = OUT / f"llamacpp-numerics-logits-{'f32' if kv_f32 else 'f16'}.npy"
        run_gguf(gguf, [ids[0].tolist()], decode_tokens=1, kv_f32=kv_f32, save_logits=path)
        cpp[kv_f32] = torch.from_numpy(np.load(path)).float()
    plain = _logits(model, ids)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    out = [_compare("transformers, weights rounded to f16 / transformers", _logits(rounded, ids), plain),
           _compare("llama.cpp f32, f16 KV cache / transformers", cpp[False], plain),
           _compare("llama.cpp f32, f32 KV cache / transformers", cpp[True], plain)]  # fmt: skip
    kept = gemma3n.Gemma3nTextMLP._gaussian_topk
    gemma3n.Gemma3nTextMLP._gaussian_topk = _spread_over_n_minus_1  # type: ignore[method-assign]
    try:
        out.append(_compare("llama.cpp f32, f32 KV cache / transformers, spread over n - 1", cpp[True],
                            _logits(model, ids)))  # fmt: skip
        for layer in model.model.layers:
            layer.mlp.act_fn = _F16Gelu()
            layer.act_fn = _F16Gelu()
        out.append(_compare("llama.cpp f32, f32 KV cache / transformers, spread over n - 1, f16 GELU", cpp[True],
                            _logits(model, ids)))  # fmt: skip
    finally:
        gemma3n.Gemma3nTextMLP._gaussian_topk = kept  # type: ignore[method-assign]
    return [{**r, "commit": commit()} for r in out]


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "## llama.cpp's numerics against the export: Gemma 3n (bench/llamacpp_numerics.py)",
        "",
        "bench/export_archs.py's gemma3n model exported with `carve export --type f32`, one 200-token block "
        "(seed 1) scored in llama.cpp (llama-cpp-python 0.3.36) and in transformers, each with and without what "
        "llama.cpp computes otherwise: its f16 key/value cache, the activation-sparsity cutoff's spread over "
        "n - 1 channels (transformers: n), GELU on f16 inputs rounded to f16 (ggml's CPU table). First row: "
        "transformers against itself with its weights rounded to f16.",
        "",
        "| pair | top-1 agreement | largest logit difference |",
        "|---|---|---|",
    ]
    lines += [f"| {r['id']} | {r['top1_agree']} / {r['positions']} | {r['max_logit_diff']} |" for r in results]
    lines += ["", f"Commit {', '.join(sorted({r['commit'] for r in results}))}; one run (deterministic)."]
    return "\n".join(lines)


def main() -> None:
    for r in rows():
        save_result(RESULTS, r)
        print(json.dumps(r), flush=True)
    results = list(load_results(RESULTS).values())
    text = table(results)
    write_section("llamacpp-numerics", text)
    print(text)


if __name__ == "__main__":
    main()
