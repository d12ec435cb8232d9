"""Unlearning measures, as MUSE defines them (Shi et al. 2024, arXiv 2407.06460) and OpenUnlearning
computes them:

- verbatim memorization: greedy continuations of forget-set prompts (the first `prompt` tokens of
  a passage) scored against the passage's true next tokens by ROUGE-L F1 over words (lower-cased
  alphanumeric runs, as rouge_score tokenizes; no stemming);
- membership inference by min-k% probability (Shi et al. 2023, arXiv 2310.16789): a passage's
  score is the mean of its lowest k share of token log-probabilities (k = 0.4, MUSE's); the AUC is
  the probability that a forget passage scores above a holdout passage (1: the forget set is
  recognisable, 0.5: it is not), by the Mann-Whitney statistic (ties count one half);
- PrivLeak: (AUC − AUC_ref) / AUC_ref against a reference (retain) model's AUC on the same
  passages; 0 means the model leaks exactly as much as a model never trained on the forget set.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carve.models.load import first_parameter
from carve.progress import progress

MIN_K = 0.4


@torch.no_grad()
def token_logprobs(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str = "log-probs"
) -> torch.Tensor:
    """log p(x_t | x_<t) for every predicted token of each block: [n, L-1], float32 on the CPU."""
    device = first_parameter(model).device
    out = []
    for batch in progress(blocks.split(batch_size), desc, total=math.ceil(len(blocks) / batch_size)):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        out.append(torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(2).cpu())
        del logits
    return torch.cat(out)


def min_k_scores(logprobs: torch.Tensor, k: float = MIN_K) -> torch.Tensor:
    """Per row, the mean of its lowest max(1, ⌊k·T⌋) token log-probabilities (higher: more likely
    a training member)."""
    count = max(1, int(logprobs.shape[1] * k))
    return logprobs.sort(dim=1).values[:, :count].mean(dim=1)


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(positive score > negative score) + ½·P(equal): the area under the ROC curve."""
    if not positive.numel() or not negative.numel():
        raise ValueError("an AUC needs scores of both kinds")
    p, n = positive.double()[:, None], negative.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def privleak(auc: float, reference_auc: float) -> float:
    return (auc - reference_auc) / reference_auc


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts over their words: LCS-based precision and recall."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, batch_size: int = 8) -> torch.Tensor:
    """`new_tokens` greedy tokens after each prompt [n, P] (equal lengths, no padding): [n, new_tokens]."""
    device = first_parameter(model).device
    out = []
    for batch in progress(
        prompts.split(batch_size), "greedy continuations", total=math.ceil(len(prompts) / batch_size)
    ):
        ids = batch.to(device)
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
        out.append(generated[:, ids.shape[1] :].cpu())
    return torch.cat(out)


def verbatim_rouge(model: nn.Module, tokenizer: Any, windows: torch.Tensor, prompt: int) -> float:
    """Mean ROUGE-L F1 of the model's greedy continuation of each window's first `prompt` tokens
    against the window's remaining tokens (MUSE's VerbMem)."""
    truth = windows[:, prompt:]
    made = greedy_continuations(model, windows[:, :prompt], truth.shape[1])
    scores = [
        rouge_l_f1(tokenizer.decode(m, skip_special_tokens=True), tokenizer.decode(t, skip_special_tokens=True))
        for m, t in zip(made, truth, strict=True)
    ]
    return sum(scores) / len(scores)


def mia_auc(model: nn.Module, forget: torch.Tensor, holdout: torch.Tensor, k: float = MIN_K) -> float:
    """Min-k% AUC of forget passages (members) against holdout passages (non-members)."""
    member = min_k_scores(token_logprobs(model, forget, desc="log-probs (forget)"), k)
    other = min_k_scores(token_logprobs(model, holdout, desc="log-probs (holdout)"), k)
    return roc_auc(member, other)
