"""Builtin held-out cloze tasks: domain competence beyond perplexity.

An item is a passage of `context` tokens from a held-out document and four candidate
continuations of `continuation` tokens: the true one (the tokens that follow the passage) and
three distractors, each the continuation of a passage in another held-out document (seeded
choice).  A model picks the candidate with the highest length-normalized log-likelihood (mean
log-probability per continuation token, given the passage).  Accuracy is reported with a 95%
Wilson score interval for a binomial proportion.  Chance is 1/4.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carve.corpora import Corpus
from carve.corpora.corpus import embedded_ids
from carve.errors import UsageError
from carve.models.arch import last_logits
from carve.models.load import first_parameter
from carve.progress import progress

CHOICES = 4


@dataclass
class ClozeTask:
    name: str
    contexts: torch.Tensor  # [n, context]
    choices: torch.Tensor  # [n, CHOICES, continuation]
    answers: torch.Tensor  # [n] index of the true continuation

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.contexts, self.choices, self.answers):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def build_cloze(
    corpus: Corpus, tokenizer: Any, items: int = 100, context: int = 48, continuation: int = 16, seed: int = 0
) -> ClozeTask:
    """Up to `items` items from the corpus's held-out documents (several per document, from
    non-overlapping windows), distractors from other documents."""
    docs = [d for d in corpus.eval if d.strip()]
    span = context + continuation
    windows: list[tuple[int, torch.Tensor]] = []  # (document index, tokens of one window)
    for i, doc in enumerate(docs):
        ids = torch.tensor(embedded_ids(tokenizer, doc, f"corpus {corpus.spec!r}"), dtype=torch.long)
        for start in range(0, ids.numel() - span + 1, span):
            windows.append((i, ids[start : start + span]))
    if len({d for d, _ in windows}) < CHOICES:
        raise UsageError(
            f"corpus {corpus.spec!r} has too little held-out text for a cloze task: it needs "
            f"{CHOICES} held-out documents of at least {span} tokens"
        )
    rng = random.Random(seed)
    rng.shuffle(windows)
    chosen = windows[:items]
    contexts, choices, answers = [], [], []
    for doc_index, w in chosen:
        others = [x for d, x in windows if d != doc_index]
        distractors = [x[context:] for x in rng.sample(others, CHOICES - 1)]
        answer = rng.randrange(CHOICES)
        cands = [*distractors[:answer], w[context:], *distractors[answer:]]
        contexts.append(w[:context])
        choices.append(torch.stack(cands))
        answers.append(answer)
    return ClozeTask(corpus.name, torch.stack(contexts), torch.stack(choices), torch.tensor(answers))


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def choice_loglik(model: nn.Module, task: ClozeTask, batch_items: int = 4, desc: str = "cloze") -> torch.Tensor:
    """Mean log-probability per continuation token of every candidate: [n, CHOICES]."""
    device = first_parameter(model).device
    n, k, cont = task.choices.shape
    out = torch.empty(n, k)
    for s in progress(range(0, n, batch_items), desc, total=math.ceil(n / batch_items)):
        ctx = task.contexts[s : s + batch_items]
        cho = task.choices[s : s + batch_items]
        seqs = torch.cat([ctx.unsqueeze(1).expand(-1, k, -1), cho], dim=2).reshape(-1, ctx.shape[1] + cont)
        logits = last_logits(model, seqs.to(device), cont + 1)[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, seqs[:, -cont:, None].to(device)).squeeze(-1)
        out[s : s + batch_items] = logp.mean(-1).view(-1, k).cpu()
    return out


def cloze_accuracy(model: nn.Module, task: ClozeTask, desc: str | None = None) -> dict[str, Any]:
    scores = choice_loglik(model, task, desc=desc or f"cloze ({task.name})")
    correct = int((scores.argmax(-1) == task.answers).sum())
    n = len(task.answers)
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": round(correct / n, 4), "ci95": [round(lo, 4), round(hi, 4)], "items": n}
