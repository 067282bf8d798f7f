"""The rows HyTuningTrainer adds to TRL's micro-batches, in plain torch (no TRL import).

A curated trace becomes one row of TRL's layout: its prompt (left-padded, as TRL pads prompts)
and, as the "completion", reasoning + answer cue + answer + end of sequence, teacher-forced.
``merge_rows`` appends such rows to a micro-batch TRL built from its rollouts, filling every
per-row input TRL may carry with the value that leaves a trace out of that input's term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from ..hytuning import ProbeTrace

TRACE_COLUMNS = ("prompt", "reasoning", "answer")

# TRL's per-row inputs: the fill of trace rows and of the columns a wider batch adds.
PROMPT_FILL = {"prompt_ids": "pad", "prompt_mask": 0}
COMPLETION_FILL = {"completion_ids": "pad", "completion_mask": 0, "old_per_token_logps": 0.0,
                   "ref_per_token_logps": 0.0, "sampling_per_token_logps": 0.0,
                   "importance_sampling_ratio": 1.0, "tool_mask": 1}
ROW_FILL = {"advantages": 0.0}
SHARED = ("num_items_in_batch",)  # the rollouts' token count (dapo): traces do not change it


@dataclass
class TraceRow:
    """One curated trace as token ids: the trainer's RD row and its PRG probe."""

    prompt: list
    completion: list  # reasoning + cue + answer + end of sequence
    probe: ProbeTrace


def trace_row(prompt_ids: list, reasoning: list, cue: list, answer: list, eos: int) -> TraceRow:
    """The RD row of a trace: the answer follows the reasoning after the very cue tokens its probes use
    (encode_answer's three parts, so the row is the completion text's own encoding)."""
    return TraceRow(list(prompt_ids), list(reasoning) + list(cue) + list(answer) + [eos],
                    ProbeTrace(list(prompt_ids), list(reasoning), list(answer), cue=list(cue)))


class FoundAnswer(NamedTuple):
    """A completion's final answer: the text before its cue, the answer (stripped) and where the
    answer's text lies in the completion (``text[start:end] == answer``)."""

    reasoning: str
    answer: str
    start: int
    end: int


def find_answer(text: str, cue: str, answer_fn: Optional[Callable] = None) -> Optional[FoundAnswer]:
    """The final answer of a generated completion, or None without one.

    Default: the answer follows the first occurrence of ``cue``, or, where the completion has
    none, of the cue without its surrounding whitespace ("Answer:" for "\\nAnswer: ": an answer on
    the first line, "Answer:7"); it runs to the end of its line (or of the text), stripped, and
    None when that is blank. The reasoning is the text before the cue (before the stripped cue,
    without its trailing whitespace: the cue brings its own).

    With ``answer_fn`` the answer is ``str(answer_fn(text)).strip()`` (None or blank: no answer)
    and the reasoning the text before the cue found as above or, without a cue, before the
    answer's last occurrence (the whole text if the answer does not occur in it).
    """
    at, found = text.find(cue), cue
    if at < 0 and cue.strip():
        found = cue.strip()
        at = text.find(found)
    reasoning = text[:at] if at >= 0 else None
    if reasoning is not None and found != cue:
        reasoning = reasoning.rstrip()
    if answer_fn is None:
        if at < 0:
            return None
        line_start = at + len(found)
        line_end = text.find("\n", line_start)
        line = text[line_start:] if line_end < 0 else text[line_start:line_end]
        answer = line.strip()
        if not answer:
            return None
        start = line_start + line.index(answer)
        return FoundAnswer(reasoning, answer, start, start + len(answer))
    answer = answer_fn(text)
    answer = None if answer is None else str(answer).strip()
    if not answer:
        return None
    start = text.rfind(answer)
    if reasoning is None:
        reasoning = text[:start] if start >= 0 else text
    return FoundAnswer(reasoning, answer, start, start + len(answer) if start >= 0 else -1)


class TraceSampler:
    """Draws trace indices pass by pass over the traces, each pass in a seeded order; ``drawn``
    (how many so far) is its whole state, so a checkpoint restores it.

    Every process holds the same sampler (the same seed, the same draws) and keeps its own share
    of each draw (``share``). A draw never holds a trace twice while it asks for at most as many
    as there are: where a draw runs from one pass into the next, the traces it already took from
    the old pass go to the end of the new pass's order (which stays a permutation: every trace
    once per pass). That assumes draws of one size, as the trainer makes them."""

    def __init__(self, num_traces: int, seed: int):
        self.num_traces, self.seed, self.drawn = num_traces, seed, 0
        self._cache = (None, None, None)  # (draw size, pass, its order)

    def _permutation(self, epoch: int) -> list:
        return torch.randperm(self.num_traces, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def order(self, epoch: int, size: int) -> list:
        """Pass ``epoch``'s order for draws of ``size``: its seeded permutation, the traces that
        the draw crossing into it took from the previous pass moved to its end."""
        n = self.num_traces
        cached_size, e, order = self._cache
        if cached_size != size or e is None or e > epoch:
            e, order = 0, self._permutation(0)
        while e < epoch:  # each pass's order depends on the previous pass's tail
            e += 1
            crossing = (e * n) // size * size  # where the draw that crosses into pass e starts
            tail = set(order[crossing - (e - 1) * n:]) if size <= n and crossing < e * n else set()
            fresh = self._permutation(e)
            order = [i for i in fresh if i not in tail] + [i for i in fresh if i in tail]
        self._cache = (size, epoch, order)
        return order

    def draw(self, k: int) -> list:
        out = []
        while len(out) < k:
            epoch, at = divmod(self.drawn, self.num_traces)
            take = self.order(epoch, k)[at:at + k - len(out)]
            out += take
            self.drawn += len(take)
        return out

    def share(self, k: int, rank: int, world: int) -> list:
        """Process ``rank``'s ``k`` of a draw of ``k · world`` (every process calls it alike)."""
        return self.draw(k * world)[rank * k:(rank + 1) * k]


def _pad(rows: list, fill, side: str, dtype=torch.long) -> torch.Tensor:
    return pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True, padding_value=fill,
                        padding_side=side)


def trace_rows(rows: list, prg: torch.Tensor, pad_id: int, device) -> dict:
    """The per-row inputs of trace rows, as TRL lays out rollouts, plus ``prg`` and ``is_rd``."""
    n = len(rows)
    ones = [[1] * len(r.prompt) for r in rows], [[1] * len(r.completion) for r in rows]
    return dict(prompt_ids=_pad([r.prompt for r in rows], pad_id, "left").to(device),
                prompt_mask=_pad(ones[0], 0, "left").to(device),
                completion_ids=_pad([r.completion for r in rows], pad_id, "right").to(device),
                completion_mask=_pad(ones[1], 0, "right").to(device),
                advantages=torch.zeros(n, device=device), prg=prg.to(device),
                is_rd=torch.ones(n, dtype=torch.bool, device=device))


def _widen(x: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
    extra = x.new_full((x.shape[0], width - x.shape[1]), fill)
    return torch.cat([extra, x] if left else [x, extra], 1)


def merge_rows(inputs: dict, traces: Optional[dict], pad_id: int) -> dict:
    """A micro-batch of TRL's rollouts with ``traces`` (trace_rows) appended as further rows.

    Prompts stay left-padded and completions right-padded, to the wider of the two; per-token
    inputs the traces lack get the value that leaves a trace out of their term: old and
    reference log-probs 0, under a zero RLIF and KL weight (the ratio exp(logp − 0) ≤ 1 and
    k3's exp(0 − logp) stay finite while logp > −88), importance ratio and tool mask 1.

    Raises:
        ValueError: An input whose per-row layout is unknown (a multimodal field).
    """
    if traces is None:
        return inputs
    widths = {"prompt": max(inputs["prompt_ids"].shape[1], traces["prompt_ids"].shape[1]),
              "completion": max(inputs["completion_ids"].shape[1], traces["completion_ids"].shape[1])}
    n, out = traces["prompt_ids"].shape[0], {}
    for key, value in inputs.items():
        if key in SHARED or value is None or (isinstance(value, torch.Tensor) and value.dim() == 0):
            out[key] = value
            continue
        part = "prompt" if key in PROMPT_FILL else "completion" if key in COMPLETION_FILL else None
        if part is None and key not in ROW_FILL and key not in ("prg", "is_rd"):
            raise ValueError(f"{key}: HyTuningTrainer cannot add curated traces to a batch with this input")
        if part is None:
            mine = traces.get(key, value.new_full((n,), ROW_FILL.get(key, 0)))
            out[key] = torch.cat([value, mine.to(value.dtype)])
            continue
        fill = {**PROMPT_FILL, **COMPLETION_FILL}[key]
        fill = pad_id if fill == "pad" else fill
        width = widths[part]
        if value.shape[1] == 1 and part == "completion":  # a sequence-level ratio: one per row
            value = value.expand(-1, inputs["completion_ids"].shape[1])
        mine = traces.get(key)
        if mine is None:
            mine = value.new_full((n, traces[f"{part}_ids"].shape[1]), fill)
        left = part == "prompt"
        out[key] = torch.cat([_widen(value, width, fill, left), _widen(mine.to(value.dtype), width, fill, left)])
    return out
