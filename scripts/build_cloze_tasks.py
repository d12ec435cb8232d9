"""Write the shipped text cloze tasks (src/carve/evaluation/tasks/carve_cloze_<corpus>.jsonl).

    .venv/bin/python scripts/build_cloze_tasks.py [--tokenizer DIR]

Each is the builtin held-out cloze task of `carve.evaluation.cloze` (100 items, seed 0: a
48-token passage from a held-out document, its true 16-token continuation and 3 from other
held-out documents) built with the embedded default model's tokenizer (SmolLM2-135M-Instruct)
and decoded to text, so lm-evaluation-harness and carve score the same text.
"""

from __future__ import annotations

import argparse

import carve
from carve.evaluation.cloze import build_cloze
from carve.evaluation.multiple_choice import TASKS_DIR, cloze_as_text, write_items


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", help="a directory with the default model's tokenizer (default: load the model)")
    args = p.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = carve.load_model().tokenizer
    TASKS_DIR.mkdir(exist_ok=True)
    for name in ("legal", "code", "general"):
        items = cloze_as_text(build_cloze(carve.Corpus(name), tok, 100), tok)
        write_items(items, TASKS_DIR / f"carve_cloze_{name}.jsonl")
        print(name, len(items))


if __name__ == "__main__":
    main()
