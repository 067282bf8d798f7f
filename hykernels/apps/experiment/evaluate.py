"""Held-out evaluation with generated reasoning: the model answers each prompt greedily, then its
confidence is scored on its own generated answer (docs/math.md §7's default: exp of the mean log-prob of
the answer tokens, given the prompt, the generated reasoning and the cue).

A response without the cue or without a number after it is unanswered: wrong for accuracy (over
every question) and left out of the calibration metrics, which are defined per answered question
(docs/math.md §7); the answered share is reported beside them. (Counting an unanswered question
as confidence 0 would make a model that stops answering look perfectly calibrated.)
"""
from __future__ import annotations

import torch

from ... import metrics
from ..scoring import span_confidence, summarize
from . import task


@torch.no_grad()
def generate(model, tok: task.CharTokenizer, problems: list, *, sample: bool, max_new: int = 40,
             num_return_sequences: int = 1) -> list:
    """Responses (token ids up to and including end of sequence) of every problem's prompt,
    ``num_return_sequences`` per prompt, in order. Every prompt has the same length."""
    prompts = torch.tensor([tok.encode(p.prompt) for p in problems])
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new,
                         num_return_sequences=num_return_sequences, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kwargs)
    responses = []
    for row in out[:, prompts.shape[1]:].tolist():
        responses.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return responses


def answer_spans(tok: task.CharTokenizer, responses: list) -> list:
    """Per response: (start, end) of its answer tokens (after the cue, before end of sequence),
    or None when it has no parsable answer."""
    spans = []
    for r in responses:
        text = tok.decode(r)
        _, answer = task.parse_answer(text)
        if answer is None:
            spans.append(None)
            continue
        cue_end = len(tok.encode(text.partition(task.CUE)[0] + task.CUE))
        stop = r.index(tok.eos_token_id) if tok.eos_token_id in r else len(r)
        spans.append((cue_end, stop))
    return spans


def answer_confidence(model, tok: task.CharTokenizer, problems: list, responses: list) -> torch.Tensor:
    """exp(mean log p(answer tokens)) of each response's own answer; NaN without an answer."""
    return span_confidence(model, [tok.encode(p.prompt) for p in problems], responses, answer_spans(tok, responses),
                           tok.pad_token_id)


def correctness(tok: task.CharTokenizer, problems: list, responses: list) -> torch.Tensor:
    return torch.tensor([task.parse_answer(tok.decode(r))[1] == p.answer for p, r in zip(problems, responses)])


def evaluate(model, tok: task.CharTokenizer, problems: list) -> dict:
    """Of greedy answers: ``accuracy`` over every question and ``answered`` (share with an
    answer); over the answered ones, metrics.summary (ECE, Brier, AUROC, AURC, overconfidence
    rate, mean confidence; its accuracy as ``accuracy_answered``), None where nothing was
    answered. Also the per-question confidences (None unanswered) and correctness, and the
    first three responses as text (``examples``), to see what a model that changed now writes."""
    was_training = model.training
    model.eval()
    responses = generate(model, tok, problems, sample=False)
    conf = answer_confidence(model, tok, problems, responses)
    correct = correctness(tok, problems, responses)
    model.train(was_training)
    return dict(summary=summarize(conf, correct), confidence=[None if a != a else a for a in conf.tolist()],
                correct=correct.tolist(), examples=[tok.decode(r) for r in responses[:3]])


def rank_auroc(scores, labels):
    """AUROC of any real-valued scores for 0/1 labels: P(score of a positive > score of a
    negative), ties counting ½ (metrics.auroc on the scores' ranks, which only order matters
    for); None when only one class is present."""
    import numpy as np

    y = np.asarray(labels, dtype=float)
    if y.size == 0 or y.min() == y.max():
        return None
    _, ranks = np.unique(np.asarray(scores, dtype=float), return_inverse=True)
    return metrics.auroc(ranks / max(int(ranks.max()), 1), y)


def within_group_auroc(scores, correct, groups, *, resamples: int = 2000, seed: int = 0) -> dict:
    """How well a score orders the rollouts of one query by correctness, which is what GRPO
    compares: P(score of a right rollout > score of a wrong one of the SAME group), ties
    counting ½, over every such pair of every group (groups with only right or only wrong
    rollouts have no pair). Pooled AUROC mixes in question difficulty (easy questions have both
    more right rollouts and more confident ones); this does not.

    Returns dict(auroc, ci95: [low, high], the 2.5 and 97.5 percentiles over ``resamples``
    bootstrap resamples of the groups (the questions: rollouts of one question are not
    independent), groups: with a pair, pairs), auroc and ci95 None without any pair."""
    import numpy as np

    scores, correct, groups = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool), np.asarray(groups)
    wins, pairs = [], []
    for g in np.unique(groups):
        s, c = scores[groups == g], correct[groups == g]
        right, wrong = s[c], s[~c]
        if right.size and wrong.size:
            diff = right[:, None] - wrong[None, :]
            wins.append(float((diff > 0).sum() + 0.5 * (diff == 0).sum()))
            pairs.append(right.size * wrong.size)
    if not pairs:
        return dict(auroc=None, ci95=None, groups=0, pairs=0)
    wins, pairs = np.array(wins), np.array(pairs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, wins.size, size=(resamples, wins.size))
    boot = wins[idx].sum(1) / pairs[idx].sum(1)
    return dict(auroc=float(wins.sum() / pairs.sum()), ci95=[float(np.percentile(boot, 2.5)),
                                                            float(np.percentile(boot, 97.5))],
                groups=int(wins.size), pairs=int(pairs.sum()))
