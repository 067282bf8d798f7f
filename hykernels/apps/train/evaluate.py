"""Accuracy and calibration of a model's own answers to held-out questions (``--eval-queries``).

The model answers each prompt greedily (the prompt tokenized as TRL tokenizes it: text, or a
conversation through the chat template). Its
answer is found as HyTuningTrainer finds a rollout's (after the first answer cue, or the cue
without its surrounding whitespace, to the end of that line, stripped), and it is correct when it equals the gold answer,
stripped. Confidence is exp of the mean log-prob of the answer tokens (the tokens holding the
answer's text) given the prompt and the response before them (docs/math.md §7). A response
without the cue, or with nothing after it, is unanswered: wrong for accuracy and left out of the
calibration metrics, as in the ablation: both score with hykernels/apps/scoring.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...integrations._trl_rows import find_answer
from ..scoring import span_confidence, summarize
from .data import prompt_ids as encode_prompt

COLUMNS = (("accuracy", "accuracy"), ("answered", "answered"), ("ece", "ECE"), ("brier", "Brier"),
           ("auroc", "AUROC"), ("mean_confidence", "mean confidence"))


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int) -> tuple:
    """(prompt ids, response ids up to and including the end of sequence) per prompt, greedy."""
    from transformers import GenerationConfig

    if tokenizer.pad_token is None:  # as TRL does
        tokenizer.pad_token = tokenizer.eos_token
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    device, eos = next(model.parameters()).device, tokenizer.eos_token_id
    prompt_ids, responses = [encode_prompt(tokenizer, p) for p in prompts], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompt_ids[i:i + batch_size]
        width = max(len(ids) for ids in chunk)  # left-padded, as TRL pads prompts
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            responses.append(row[:row.index(eos) + 1] if eos in row else row)
    return prompt_ids, responses


def answer_span(tokenizer, response: list, cue: str, answer_fn=None) -> tuple:
    """((start, end) of the answer tokens, the answer text) of one response, or (None, None)
    without an answer: the tokens whose text reaches into the answer's characters (None for an
    answer_fn answer that is not in the text)."""
    eos = tokenizer.eos_token_id
    ids = response[:response.index(eos)] if eos in response else response
    found = find_answer(tokenizer.decode(ids, skip_special_tokens=True), cue, answer_fn)  # as the trainer does
    if found is None:
        return None, None
    if found.start < 0:
        return None, found.answer

    def token_at(char: int) -> int:  # the first k with len(decode(ids[:k + 1])) > char; k = len - 1 qualifies
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(ids[:mid + 1], skip_special_tokens=True)) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo

    return (token_at(found.start), token_at(found.end - 1) + 1), found.answer


def evaluate(model, tokenizer, records: list, *, cue: str, max_new_tokens: int, batch_size: int = 8,
             answer_fn=None) -> dict:
    """Accuracy and calibration of the model's greedy answers to ``records`` (``prompt``, ``answer``).

    Returns ``summary`` (``accuracy`` over every question, ``answered``, and over the answered
    ones ECE, Brier, AUROC, AURC, overconfidence rate, mean confidence; None where nothing was
    answered) and ``questions``: per record its prompt, gold answer, response, answer, confidence
    (None unanswered) and correctness.
    """
    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in records]
    prompt_ids, responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    spans, answers = zip(*(answer_span(tokenizer, r, cue, answer_fn) for r in responses))
    conf = torch.cat([span_confidence(model, prompt_ids[i:i + batch_size], responses[i:i + batch_size],
                                      spans[i:i + batch_size], tokenizer.pad_token_id)
                      for i in range(0, len(records), batch_size)])
    model.train(was_training)
    correct = torch.tensor([a is not None and a == r["answer"].strip() for a, r in zip(answers, records)])
    questions = [dict(prompt=r["prompt"], gold=r["answer"], response=tokenizer.decode(resp, skip_special_tokens=True),
                      answer=a, confidence=None if c != c else c, correct=bool(o))
                 for r, resp, a, c, o in zip(records, responses, answers, conf.tolist(), correct.tolist())]
    return dict(summary=summarize(conf, correct), questions=questions)


def _cell(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(results: dict) -> str:
    """A markdown table of the summaries in ``results`` (row name -> evaluate's result)."""
    lines = ["| model | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row, result in results.items():
        lines.append(f"| {row} | " + " | ".join(_cell(result["summary"][key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)
