"""PRG probes (docs/math.md §3): step splitting and the packed one-forward-pass probe batch.

For a trace (prompt x, reasoning s split into steps s_1..s_K, answer a) probe k is
x, s_≤k, cue, a with the answer teacher-forced. All K+1 probes share their prefixes, so one
packed sequence holds them: x, s_1..s_K, then K+1 copies of (cue, a), where copy k attends to
x, s_1..s_k and, causally, to itself, with position ids continuing from the end of step k.
Tokens processed: |x| + |s| + (K+1)(|cue| + |a|) instead of Σ_k (|x| + |s_≤k| + |cue| + |a|).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

DEFAULT_MAX_STEPS = 16


class ProbeTrace(NamedTuple):
    """Token ids of one trace: prompt x, reasoning s and answer a (docs/math.md §3).

    Attributes:
        prompt: Token ids of the prompt (question).
        reasoning: Token ids of the reasoning, split into steps.
        answer: Token ids of the answer (gold for RD, the rollout's own for RLIF); not empty.
        step_ends: Optional exclusive step ends into ``reasoning`` (strictly increasing, the
            last one len(reasoning)); given, they replace delimiter splitting for this trace.
        cue: Optional answer-cue token ids of this trace, replacing build_probes' ``cue``: the
            cue as the tokenizer spells it before this very answer (encode_answer), where a
            tokenizer merges the cue's end into the answer's first token.
    """

    prompt: Sequence[int]
    reasoning: Sequence[int]
    answer: Sequence[int]
    step_ends: Optional[Sequence[int]] = None
    cue: Optional[Sequence[int]] = None


def _ids(name: str, value) -> list[int]:
    ids = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{name}: expected a sequence of int token ids")
    return ids


def majority_answers(answers: Sequence, group_size: int) -> list:
    """The label-free PRG target "majority" (docs/math.md §3): per rollout, the answer given most
    often in its group of ``group_size`` consecutive rollouts (ties to the one seen first; None
    does not vote), or None for a group where no rollout answered.

    Args:
        answers: one per rollout (strings, token tuples or any hashable; None: no answer), the
            rollouts of a group consecutive, as GRPO samplers lay them out.
        group_size: rollouts per prompt; ``len(answers)`` must be a multiple of it.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if len(answers) % group_size:
        raise ValueError(f"answers: expected a multiple of group_size = {group_size} rollouts, got {len(answers)}")
    out = []
    for g in range(0, len(answers), group_size):
        votes = Counter(a for a in answers[g:g + group_size] if a is not None)
        out += [votes.most_common(1)[0][0] if votes else None] * group_size
    return out


def step_delimiters(tokenizer, text: str = "\n\n") -> list[list[int]]:
    """Every token sequence that spells ``text`` for this tokenizer, longest first: its own
    encoding, how it encodes between words (BPE often splits "\n\n" into two "\n" tokens in
    context), and each single vocabulary token whose text contains it ("\n\n\n", ".\n\n")."""

    def enc(t):
        return list(tokenizer.encode(t, add_special_tokens=False))

    found = {tuple(enc(text))}
    for left, right in (("a.", "B"), ("21.", "12"), ("x", " y")):
        ids, lhs, rhs = enc(left + text + right), enc(left), enc(right)
        if ids[:len(lhs)] == lhs and ids[len(ids) - len(rhs):] == rhs and len(ids) > len(lhs) + len(rhs):
            found.add(tuple(ids[len(lhs):len(ids) - len(rhs)]))
    found |= {(i,) for i in range(len(tokenizer)) if text in tokenizer.decode([i])}
    return [list(d) for d in sorted(found, key=lambda d: (-len(d), d))]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_answer(tokenizer, reasoning: str, cue: str, answer: str) -> tuple[list[int], list[int], list[int]]:
    """(reasoning, cue, answer) token ids of the text ``reasoning + cue + answer`` encoded as ONE
    text, so every part holds the tokens the tokenizer gives it in context.

    Encoded apart, the parts are a split the model never sees: a byte-level BPE spells
    "\\nAnswer: 16" Ċ Answer : Ġ16, but "\\nAnswer: " + "16" Ċ Answer : Ġ 1 6; a SentencePiece
    tokenizer merges the cue's space into "▁Paris" and puts a spurious "▁" before a cue encoded
    on its own. Here the answer is every token from the first one that differs between the
    encodings of ``reasoning + cue + answer`` and ``reasoning + cue`` (so a token shared by the
    cue's end and the answer's start belongs to the answer), the reasoning the longest prefix
    that equals the reasoning's own encoding, and the cue what lies between.

    Args:
        tokenizer: A transformers tokenizer (``encode``; no special tokens are added).
        reasoning: The text before the cue ("" for none).
        cue: The answer cue, e.g. "\\nAnswer: ".
        answer: The answer text, not empty.

    Returns:
        (reasoning ids, cue ids, answer ids); their concatenation is the encoding of the whole text.

    Raises:
        ValueError: An empty answer, or a cue left with no token of its own (the probes need one
            before each answer copy), naming the cue and the answer.
    """
    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

    if not answer:
        raise ValueError("answer: expected a non-empty answer text")
    full = enc(reasoning + cue + answer)
    starts = _common_prefix(full, enc(reasoning + cue))
    ends = _common_prefix(full[:starts], enc(reasoning))
    if starts >= len(full) or starts == ends:
        raise ValueError(f"cue: {cue!r} keeps no token of its own before the answer {answer!r} "
                         f"(the tokenizer spells {reasoning[-20:] + cue + answer!r} as {full[-8:]}); "
                         "use a cue that ends with a token of its own, e.g. one ending in ':'")
    return full[:ends], full[ends:starts], full[starts:]


def find_step_ends(reasoning: Sequence[int], delimiters: Sequence[Sequence[int]]) -> list[int]:
    """Exclusive step ends: a step ends right after each occurrence of any delimiter token
    sequence (the first listed that matches: list longer ones first; the delimiter belongs to
    the step it closes); the last step ends at the end.
    A reasoning without delimiters is one step; an empty one has none."""
    reasoning = _ids("reasoning", reasoning)
    ends, i = [], 0
    while i < len(reasoning):
        hit = next((len(d) for d in delimiters if d and reasoning[i:i + len(d)] == list(d)), 0)
        i += hit or 1
        if hit:
            ends.append(i)
    if reasoning and (not ends or ends[-1] != len(reasoning)):
        ends.append(len(reasoning))
    return ends


def merge_steps(ends: Sequence[int], max_steps: int) -> list[int]:
    """Cap the step count at ``max_steps`` by merging consecutive steps into groups of
    (nearly) equal count: group i ends where original step ceil((i+1)·K/max_steps) ends."""
    k = len(ends)
    if k <= max_steps:
        return list(ends)
    return [ends[math.ceil((i + 1) * k / max_steps) - 1] for i in range(max_steps)]


def _check_step_ends(ends: list[int], length: int) -> None:
    if any(b <= a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] != length):
        raise ValueError(f"step_ends: expected strictly increasing ends in (0, {length}] ending at "
                         f"{length} (the reasoning length), got {ends}")


def _trace_cue(t: int, trace: ProbeTrace, cue: list[int]) -> list[int]:
    """The cue before trace ``t``'s answer copies: its own when it has one, else the batch's."""
    if trace.cue is None:
        return cue
    own = _ids("cue", trace.cue)
    if not own:
        raise ValueError(f"cue: trace {t} has an empty cue (the answer cue precedes each answer copy)")
    return own


def _split_trace(t: int, trace: ProbeTrace, delimiters: list[list[int]], max_steps: int):
    """(prompt, reasoning, answer, step ends after merging) of trace ``t``: the one step split
    that the packed batch and the separate-probe baseline share."""
    prompt, reasoning, answer = (_ids(n, v) for n, v in zip(("prompt", "reasoning", "answer"), trace[:3]))
    if not answer:
        raise ValueError(f"answer: trace {t} has an empty answer; its support would be undefined")
    if trace.step_ends is not None:
        ends = _ids("step_ends", trace.step_ends)
        _check_step_ends(ends, len(reasoning))
    else:
        ends = find_step_ends(reasoning, delimiters)
    return prompt, reasoning, answer, merge_steps(ends, max_steps)


@dataclass
class ProbeBatch:
    """One packed sequence per trace, ready for a model call and for the fused lm_head.

    input_ids, position_ids: [B, T]. attention_mask: [B, 1, T, T] additive float mask (0 where
    attention is allowed, the dtype's min elsewhere), as transformers' eager and sdpa attention
    take it. rows: flat indices into [B·T] of the hidden states that predict answer tokens;
    targets: those answer tokens; span_ids: the probe each belongs to (trace t's probes are
    probe_offsets[t] .. probe_offsets[t+1]-1, probe k of a trace being k steps in).
    copy_id (-1 context, k for answer copy k, -2 padding) and visible (context length a token
    sees) describe the mask compactly, for FlexAttention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    span_ids: torch.Tensor
    probe_offsets: torch.Tensor
    num_steps: list[int]
    copy_id: torch.Tensor
    visible: torch.Tensor

    @property
    def num_spans(self) -> int:
        """The number of probes in the batch, Σ_t (K_t + 1): answer_span_logprobs' num_spans."""
        return int(self.probe_offsets[-1])

    def tokens(self) -> int:
        """Tokens a model call processes (padding excluded)."""
        return int((self.copy_id != -2).sum())

    def block_mask(self):
        """The same mask as a FlexAttention BlockMask, or None where FlexAttention is missing."""
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError:
            return None
        copy_id, visible = self.copy_id, self.visible

        def mask_mod(b, h, q, kv):
            return allowed_pairs(copy_id[b, q], visible[b, q], copy_id[b, kv], q, kv)

        b, t = self.input_ids.shape
        return create_block_mask(mask_mod, b, None, t, t, device=self.input_ids.device)


def allowed_pairs(copy_q, visible_q, copy_kv, q, kv):
    """Whether query q may attend to key kv: a context key below q's visible length
    (for context queries visible = q+1, i.e. causal), or a key of q's own answer copy at or
    before q. Padding (copy −2) sees only itself. Broadcasts over tensors."""
    context = (copy_kv == -1) & (kv < visible_q)
    same_copy = (copy_q >= 0) & (copy_kv == copy_q) & (kv <= q)
    return context | same_copy | ((copy_q == -2) & (q == kv))


def build_probes(
    traces: Sequence[ProbeTrace],
    *,
    cue: Sequence[int],
    delimiters: Sequence[Sequence[int]] = (),
    max_steps: int = DEFAULT_MAX_STEPS,
    pad_id: int = 0,
    mask_dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> ProbeBatch:
    """Pack every trace's K+1 probes into one sequence (docs/math.md §3).

    Sequence t is the prompt, all K steps, then K+1 copies of (cue, answer); answer copy k sees
    the prompt, steps 1..k and, causally, itself, with position ids continuing from the end of
    step k. One model call on it gives every probe's support (probe_support).

    Args:
        traces: The traces (ProbeTrace), at least one.
        cue: Answer-cue token ids (e.g. the tokenizer's ids for "\\nAnswer: "), at least one,
            so the first answer token is predicted inside its own copy; a trace with its own
            ``cue`` (encode_answer's) uses that instead.
        delimiters: Step delimiter token sequences (e.g. step_delimiters(tokenizer)) for traces
            without explicit ``step_ends``; longer ones first. None given: one step per trace.
        max_steps: Steps beyond this many are merged evenly (merge_steps).
        pad_id: Token id that right-pads the shorter sequences.
        mask_dtype: dtype of the additive attention mask.
        device: Device of every tensor of the batch.

    Returns:
        A ProbeBatch.

    Raises:
        ValueError: No traces, an empty cue or answer, max_steps not a positive int, or
            invalid step_ends.
        TypeError: Token ids that are not ints.
    """
    cue = _ids("cue", cue)
    if not cue and any(trace.cue is None for trace in traces):
        raise ValueError("cue: expected at least one token (the answer cue precedes each answer copy)")
    if not traces:
        raise ValueError("traces: expected at least one trace")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")
    delimiters = [_ids("delimiters", d) for d in delimiters]

    seqs, positions, copies, visibles = [], [], [], []
    rows, targets, spans, num_steps = [], [], [], []
    probes_before = 0  # global index of this trace's probe 0
    for t, trace in enumerate(traces):
        prompt, reasoning, answer, ends = _split_trace(t, trace, delimiters, max_steps)
        cue_t = _trace_cue(t, trace, cue)
        num_steps.append(len(ends))
        context = prompt + reasoning
        ids, pos = list(context), list(range(len(context)))
        copy, vis = [-1] * len(context), [i + 1 for i in range(len(context))]
        for k, end in enumerate([0] + ends):
            seen = len(prompt) + end  # copy k sees the prompt and steps 1..k
            start = len(ids)
            ids += cue_t + answer
            pos += list(range(seen, seen + len(cue_t) + len(answer)))
            copy += [k] * (len(cue_t) + len(answer))
            vis += [seen] * (len(cue_t) + len(answer))
            first = start + len(cue_t) - 1  # hidden state that predicts answer[0]
            rows += [(t, first + j) for j in range(len(answer))]
            targets += answer
            spans += [probes_before + k] * len(answer)
        probes_before += len(ends) + 1
        seqs.append(ids), positions.append(pos), copies.append(copy), visibles.append(vis)

    b, width = len(seqs), max(len(s) for s in seqs)

    def padded(lists, fill):
        return torch.tensor([x + [fill] * (width - len(x)) for x in lists], dtype=torch.long, device=device)

    input_ids, position_ids = padded(seqs, pad_id), padded(positions, 0)
    copy_id, visible = padded(copies, -2), padded(visibles, 0)
    q = torch.arange(width, device=device)
    allowed = allowed_pairs(copy_id[:, :, None], visible[:, :, None], copy_id[:, None, :], q[:, None], q[None, :])
    mask = torch.zeros(b, 1, width, width, dtype=mask_dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    counts = torch.tensor([0] + [k + 1 for k in num_steps], device=device)
    return ProbeBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
        rows=torch.tensor([t * width + i for t, i in rows], dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        span_ids=torch.tensor(spans, dtype=torch.long, device=device),
        probe_offsets=torch.cumsum(counts, 0), num_steps=num_steps, copy_id=copy_id, visible=visible,
    )


def separate_probes(trace: ProbeTrace, *, cue: Sequence[int], delimiters: Sequence[Sequence[int]] = (),
                    max_steps: int = DEFAULT_MAX_STEPS) -> list[tuple[list[int], int]]:
    """The K+1 probes of one trace as separate sequences (x, s_≤k, cue, a), each with the index
    of its first answer token: the unpacked baseline the packed batch must reproduce.

    Arguments as for build_probes, for one trace. Returns a list of (token ids, index of the
    first answer token), probe 0 first.
    """
    prompt, reasoning, answer, ends = _split_trace(0, trace, [_ids("delimiters", d) for d in delimiters], max_steps)
    cue = _trace_cue(0, trace, _ids("cue", cue))
    out = []
    for end in [0] + ends:
        seq = prompt + reasoning[:end] + cue
        out.append((seq + answer, len(seq)))
    return out
