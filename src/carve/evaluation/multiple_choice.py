"""Text multiple-choice tasks, scored the way lm-evaluation-harness scores `multiple_choice`
tasks, so carve's own numbers and lm-eval's agree on the same task file.

An item is a context, its choices and the index of the true one. For each choice:
- trailing whitespace of the context moves to the start of the choice; context + choice is
  tokenized as one string (the tokenizer's default special tokens) and split after the tokens of
  the context alone;
- its log-likelihood is the sum of log p(token) over the choice's tokens given everything before.
`acc`: the choice with the highest log-likelihood is the true one; `acc_norm`: the same with each
log-likelihood divided by the choice's length in characters. Stderr: sample standard deviation
over items / √n.

The builtin cloze tasks as text (`carve_cloze_<domain>`, shipped under `evaluation/tasks/`) are
the held-out cloze items of `carve.evaluation.cloze` decoded to text with the default model's
tokenizer; any tokenizer can score them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carve.errors import UsageError
from carve.models.load import first_parameter
from carve.progress import progress

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int


def load_items(path: str | Path) -> list[MCItem]:
    """A JSONL file of {"context": str, "choices": [str, ...], "gold": int}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"task file {str(path)!r} does not exist")
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            items.append(MCItem(str(d["context"]), [str(c) for c in d["choices"]], int(d["gold"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{str(path)!r} line {n} is not a multiple-choice item ({exc})") from None
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation)
    ctx = tokenizer.encode(stripped)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def choice_logliks(
    model: nn.Module, tokenizer: Any, items: list[MCItem], desc: str = "multiple choice"
) -> list[list[float]]:
    device = first_parameter(model).device
    out = []
    for item in progress(items, desc):
        row = []
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.context, choice)
            ids = torch.tensor([ctx + cont], device=device)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0, -len(cont) :].float()
            logp = F.log_softmax(logits, -1).gather(-1, ids[0, -len(cont) :, None]).sum()
            row.append(float(logp))
        out.append(row)
    return out


def _mean_stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


def mc_accuracy(model: nn.Module, tokenizer: Any, items: list[MCItem], desc: str = "multiple choice") -> dict[str, Any]:
    lls = choice_logliks(model, tokenizer, items, desc)
    acc, acc_norm = [], []
    for item, ll in zip(items, lls, strict=True):
        acc.append(float(max(range(len(ll)), key=lambda i: ll[i]) == item.gold))
        norm = [v / len(c) for v, c in zip(ll, item.choices, strict=True)]
        acc_norm.append(float(max(range(len(norm)), key=lambda i: norm[i]) == item.gold))
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": _mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": _mean_stderr(acc_norm),
        "items": len(items),
    }


def cloze_as_text(task: Any, tokenizer: Any) -> list[MCItem]:
    """A token-level ClozeTask as text items (passage, the 4 continuations decoded)."""
    return [
        MCItem(tokenizer.decode(ctx), [tokenizer.decode(c) for c in choices], int(ans))
        for ctx, choices, ans in zip(task.contexts, task.choices, task.answers, strict=True)
    ]


def write_items(items: list[MCItem], path: str | Path) -> None:
    Path(path).write_text(
        "".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n" for i in items)
    )


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def task_yaml(name: str, data: str | Path) -> str:
    """An lm-eval task over a JSONL file of items, scored as above."""
    return TASK_YAML.format(name=name, data=json.dumps(str(Path(data).resolve())))


def builtin_tasks() -> dict[str, Path]:
    """Shipped text tasks: name -> JSONL file."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("carve_cloze_*.jsonl"))}
