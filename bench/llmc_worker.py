"""Run llm-compressor's oneshot on the same model and calibration blocks as carve.

Runs inside the separate virtual environment bench/extract.py creates (llm-compressor pins an
older transformers).  Prints one JSON line: wall time of oneshot, peak RSS, achieved sparsity,
or the failure.  Usage: python llmc_worker.py MODEL_DIR CALIB.pt METHOD PATTERN OUT_DIR [DTYPE]
(DTYPE: the precision the model is loaded and pruned in, float32 by default; bfloat16 is its
fastest CPU path)."""

import json
import resource
import sys
import time
import traceback

import torch


def main() -> None:
    model_dir, calib_path, method, pattern, out_dir = sys.argv[1:6]
    dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float32  # the precision oneshot runs in
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = torch.load(calib_path)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # SparseGPT/Wanda spell unstructured "0:0"; the magnitude modifier spells it "unstructured"
    structure = "0:0" if pattern == "unstructured" else pattern
    # targets must be a list (a bare string matches nothing); lm_head ignored by regex
    common = {"sparsity": 0.5, "mask_structure": structure, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    modifier = {
        "sparsegpt": lambda: SparseGPTModifier(block_size=128, dampening_frac=0.01, **common),
        "wanda": lambda: WandaPruningModifier(**common),
        "magnitude": lambda: MagnitudePruningModifier(
            init_sparsity=0.5,
            final_sparsity=0.5,
            start=0,
            end=0,
            targets=["re:.*proj.weight"],
            mask_structure="unstructured" if pattern == "unstructured" else pattern,
        ),
    }[method]()
    result = {"method": method, "pattern": pattern}
    t = time.perf_counter()
    try:
        oneshot(
            model=model,
            tokenizer=tok,
            dataset=ds,
            recipe=[modifier],
            num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False,
        )
        result["seconds"] = round(time.perf_counter() - t, 2)
        lin = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        zeros = sum(int((w == 0).sum()) for w in lin)
        result["linear_sparsity"] = zeros / sum(w.numel() for w in lin)
        if result["linear_sparsity"] < 0.01:
            result["error"] = "oneshot finished but pruned nothing"
        else:
            model.save_pretrained(out_dir, safe_serialization=True)
            tok.save_pretrained(out_dir)
    except Exception as exc:  # the comparator's failure is a result to report
        result["seconds"] = round(time.perf_counter() - t, 2)
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        traceback.print_exc(file=sys.stderr)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
