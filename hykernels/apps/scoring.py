"""Scoring a model's own generated answers, shared by the applications (the experiment's
evaluation and ``python -m hykernels train``'s): the confidence of each answer span, from one
forward pass and the fused token statistics, and accuracy with calibration over the answered
questions (docs/math.md §7)."""
from __future__ import annotations

import torch

from .. import metrics, token_stats
from ..integrations.transformers import last_hidden_states, lm_head
from .batching import make_batch


@torch.no_grad()
def span_confidence(model, prompts: list, responses: list, spans: list, pad_token_id: int) -> torch.Tensor:
    """exp(mean log p) of each response's tokens ``responses[i][start:end]`` given ``prompts[i]`` and
    the response before them, in one forward pass; NaN where ``spans[i]`` is None. Prompts and
    responses are token id lists of any lengths (right-padded here)."""
    conf = torch.full((len(responses),), float("nan"))
    keep = [i for i, s in enumerate(spans) if s is not None]
    if not keep:
        return conf
    batch = make_batch([prompts[i] for i in keep], [responses[i] for i in keep], pad_token_id)
    plen = batch.ids.shape[1]
    rows, which = [], []
    for j, i in enumerate(keep):
        start, end = spans[i]
        offset = len(prompts[i])
        # the hidden state at position t predicts token t + 1
        rows += [j * plen + offset + k - 1 for k in range(start, end)]
        which += [j] * (end - start)
    device = next(model.parameters()).device
    hidden = last_hidden_states(model, batch.ids.to(device), attention_mask=batch.mask.to(device))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    rows, which = torch.tensor(rows, device=device), torch.tensor(which, device=device)
    head = lm_head(model)
    stats = token_stats(hidden[rows], head.weight, batch.ids.to(device).reshape(-1)[rows + 1], **head.kwargs())
    mean = torch.zeros(len(keep), device=device).index_add_(0, which, stats.logp.float())
    conf[keep] = (mean / torch.bincount(which, minlength=len(keep))).exp().cpu()
    return conf


def summarize(conf: torch.Tensor, correct: torch.Tensor) -> dict:
    """``accuracy`` over every question and ``answered`` (the share with a confidence, not NaN);
    over the answered ones, metrics.summary (its accuracy as ``accuracy_answered``), None where
    nothing was answered; ``questions``, the count."""
    answered = ~conf.isnan()
    out = dict.fromkeys(("n", "mean_confidence", "ece", "ece_quantile", "brier", "auroc", "aurc",
                         "overconfidence_rate"))
    if answered.any():
        out.update(metrics.summary(conf[answered], correct[answered]))
    out["accuracy_answered"] = out.pop("accuracy", None)
    out.update(accuracy=float(correct.float().mean()), answered=float(answered.float().mean()), questions=len(conf))
    return out
