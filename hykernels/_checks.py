"""Input validation for every public entry point: one place, clear errors naming the argument.

Shape, dtype and device checks are always on, and so are PRG's probe offsets (a bad one would
index out of bounds). Value checks (target and span id range, empty spans, finiteness) cost a
device→host sync on a GPU; they are on by default and can be switched off for production loops
with ``HYKERNELS_CHECKS=0`` or ``hykernels.set_checks(False)``. With them off the kernels still
never read out of bounds: out-of-range targets are treated as ignored, out-of-range span ids
count towards no span, NaN propagates.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import NamedTuple, Optional, Sequence

import torch

from ._types import PRG_VARIANTS, LogitOptions, LossTerms

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)

_value_checks = os.environ.get("HYKERNELS_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


def set_checks(enabled: bool) -> None:
    """Turn the value checks on or off, process-wide (docs/math.md §1).

    The value checks (target, span and sequence id range, empty spans, non-finite inputs) cost a
    device→host sync each call; they are on by default (``HYKERNELS_CHECKS=0`` starts with them
    off). With them off the kernels still never read out of bounds: out-of-range targets count
    as ignored, out-of-range span ids towards no span, an empty span's mean is NaN and NaN
    propagates. Shape, dtype and device checks, and PRG's probe offsets, are always on.

    Args:
        enabled: True to check values, False to skip those checks.
    """
    global _value_checks
    _value_checks = bool(enabled)


def checks_enabled() -> bool:
    return _value_checks


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _float_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def _int_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype (int64 or int32), got {x.dtype}")


def _same_device(name: str, x: torch.Tensor, device: torch.device, of: str = "hidden") -> None:
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {of}), got {x.device}")


def _positive(name: str, value, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_logit_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index, chunk_size):
    """Validate the inputs every op shares, shapes and dtypes only (their values are checked by
    check_logit_values inside the ops: a sync that torch.compile could not trace). Returns
    (hidden [N, D], targets [N] int64, bias, leading shape, LogitOptions). ``targets`` may be
    None (no targets: all rows ignored)."""
    hidden, weight = _tensor("hidden", hidden), _tensor("weight", weight)
    _float_dtype("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape [..., D] with at least 2 dims, got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [V, D], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    device = hidden.device
    _same_device("weight", weight, device)
    lead, dim = tuple(hidden.shape[:-1]), hidden.shape[-1]
    if weight.shape[1] != dim:
        raise ValueError(f"weight: expected shape [V, {dim}] (D from hidden), got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0 or dim == 0:
        raise ValueError(f"weight: expected V > 0 and D > 0, got shape {tuple(weight.shape)}")
    if bias is not None:
        bias = _tensor("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias: expected shape [{vocab}] (V from weight), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (the dtype of hidden), got {bias.dtype}")
        _same_device("bias", bias, device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if targets is None:
        targets = torch.full(lead, ignore_index, dtype=torch.int64, device=device)
    targets = _tensor("targets", targets)
    _int_dtype("targets", targets)
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {list(lead)} (hidden's leading dims), got {list(targets.shape)}")
    _same_device("targets", targets, device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    opts = LogitOptions(
        temperature=_positive("temperature", temperature),
        softcap=_positive("softcap", softcap, allow_none=True),
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    return hidden.reshape(-1, dim), targets.reshape(-1).long(), bias, lead, opts


def target_mask(targets: torch.Tensor, vocab_size: int, ignore_index: int):
    """(rows with a target, targets safe to index with). Out-of-range ids, possible only with
    value checks off, are masked like ignore_index so no kernel reads out of bounds."""
    valid = (targets != ignore_index) & (targets >= 0) & (targets < vocab_size)
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def _nonfinite_flag(x: torch.Tensor) -> torch.Tensor:
    # A sum in the tensor's own dtype is O(1) extra memory and is non-finite if any element is;
    # a sum that overflows from finite values only sends it to the exact test in
    # _raise_nonfinite. (sum(dtype=float64) would first copy the whole tensor to fp64 on CPU:
    # 1.8 GB for a 151936×1536 fp32 lm_head, on every call.)
    return ~torch.isfinite(x.detach().sum())  # detached: no autograd node for a check


def _raise_nonfinite(named: Sequence[tuple[str, torch.Tensor]], flags: Sequence[bool]) -> None:
    for (name, x), flag in zip(named, flags):
        if flag and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains non-finite values (NaN or Inf)")


def check_logit_values(hidden, weight, bias, targets, vocab, ignore_index) -> None:
    """With value checks on: finite hidden, weight and bias, targets in [0, vocab) or
    ignore_index (hidden [N, D], targets [N]; ``vocab`` is what target ids index). One sync."""
    if not _value_checks:
        return
    named = [("hidden", hidden), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    flags = torch.stack([_nonfinite_flag(x) for _, x in named] + [bad_target.any()]).tolist()  # one sync
    _raise_nonfinite(named, flags[:-1])
    if flags[-1]:
        row = int(bad_target.nonzero()[0, 0])
        raise ValueError(
            f"targets: expected ids in [0, {vocab}) or ignore_index={ignore_index}, "
            f"got {int(targets[row])} at row {row}"
        )


def _per_token(name: str, value, n: int, lead: tuple, device, dtype) -> Optional[torch.Tensor]:
    """A per-token constant: None, a number (broadcast) or a tensor shaped like targets."""
    if value is None:
        return None
    if isinstance(value, Real) and not isinstance(value, bool):
        return torch.full((n,), float(value), dtype=dtype, device=device)
    value = _tensor(name, value)
    _float_dtype(name, value)
    _same_device(name, value, device)
    if value.dim() == 0:
        return value.detach().to(dtype).expand(n)
    if tuple(value.shape) != lead:
        raise ValueError(f"{name}: expected shape {list(lead)} (one value per token, like targets), got {list(value.shape)}")
    return value.detach().reshape(n).to(dtype)


REDUCTIONS = (None, "sum", "mean", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def check_loss_terms(lead, device, dtype, *, rd_weight, rlif_weight, advantages, old_logp, ref_logp,
                     kl_weight, entropy_weight, clip_eps, label_smoothing=0.0, z_loss=0.0, reduction=None,
                     seq_ids=None, importance_sampling_level="token", use_bias_correction_kl=False,
                     vocab_size=0) -> LossTerms:
    """Validate fused_loss's per-token terms and options. Weights, advantages and log-probs are
    constants: no gradient flows into them (they are detached). ``advantages`` may also be given
    per sequence ([S] or [S, 1]: sequences are the rows of targets [B, T], or ``seq_ids``) and is
    then broadcast over each sequence's tokens. With reduction set and no term given, rd_weight is
    1 (plain cross-entropy)."""
    n = math.prod(lead)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level: expected one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl: expected a bool, got {use_bias_correction_kl!r}")
    label_smoothing = _in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _in_range("z_loss", z_loss, 0.0, math.inf)
    if reduction is not None and all(v is None for v in (rd_weight, rlif_weight, kl_weight, entropy_weight)):
        rd_weight = 1.0
    sequence_level = importance_sampling_level == "sequence"
    seqs = None  # (per-token sequence id [N], −1 for none; number of sequences)
    if seq_ids is not None or sequence_level or _per_sequence(advantages, lead):
        seqs = _sequences(seq_ids, lead, device, advantages, sequence_level)
    if _per_sequence(advantages, lead):
        advantages = _broadcast_per_sequence("advantages", advantages, *seqs, device).reshape(lead)
    values = dict(rd_weight=rd_weight, rlif_weight=rlif_weight, advantages=advantages, old_logp=old_logp,
                  ref_logp=ref_logp, kl_weight=kl_weight, entropy_weight=entropy_weight)
    t = {k: _per_token(k, v, n, lead, device, dtype) for k, v in values.items()}
    for need, given in (("advantages", "rlif_weight"), ("ref_logp", "kl_weight")):
        if (t[need] is None) != (t[given] is None):
            have, missing = (given, need) if t[need] is None else (need, given)
            raise ValueError(f"{missing}: required when {have} is given (the term uses both)")
    kl_uses_old = use_bias_correction_kl and t["kl_weight"] is not None
    if t["old_logp"] is not None and t["rlif_weight"] is None and not kl_uses_old:
        raise ValueError("old_logp: given without rlif_weight/advantages; it only enters the PPO term "
                         "(and the KL term with use_bias_correction_kl)")
    if all(t[k] is None for k in ("rd_weight", "rlif_weight", "kl_weight", "entropy_weight")):
        raise ValueError("fused_loss: no loss term; pass rd_weight, rlif_weight (+advantages), "
                         "kl_weight (+ref_logp) or entropy_weight (or a reduction for plain cross-entropy)")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if value and t["rd_weight"] is None:
            raise ValueError(f"{name}: modifies the cross-entropy term, but rd_weight is not given")
    if sequence_level and reduction == "none":
        raise ValueError("reduction: 'none' (per-token losses) is not defined with importance_sampling_level="
                         "'sequence', whose ratio couples the tokens of a sequence")
    if isinstance(clip_eps, Real):
        clip_eps = (clip_eps, clip_eps)
    if (not isinstance(clip_eps, (tuple, list)) or len(clip_eps) != 2
            or not all(isinstance(e, Real) and math.isfinite(e) and e >= 0 for e in clip_eps) or clip_eps[0] >= 1):
        raise ValueError(f"clip_eps: expected (low, high) with 0 <= low < 1 and high >= 0, got {clip_eps!r}")
    seq_terms = {}
    if sequence_level:  # a token of no sequence is a sequence of its own (its ratio is its token's)
        ids, num = seqs
        own = num + torch.arange(n, device=device)
        seq_terms = dict(seq_ids=torch.where(ids >= 0, ids, own), num_seqs=num + n)
    return LossTerms(**t, clip_low=float(clip_eps[0]), clip_high=float(clip_eps[1]), vocab_size=int(vocab_size),
                     label_smoothing=label_smoothing, z_loss=z_loss, kl_ratio=use_bias_correction_kl, **seq_terms)


_TERM_TENSORS = ("rd_weight", "rlif_weight", "advantages", "old_logp", "ref_logp", "kl_weight", "entropy_weight")


def check_term_values(terms: LossTerms) -> None:
    """With value checks on: fused_loss's per-token terms are finite (one sync; run inside the
    op, after check_loss_terms has checked their shapes)."""
    if not _value_checks:
        return
    given = [(k, getattr(terms, k)) for k in _TERM_TENSORS if getattr(terms, k) is not None]
    if not given:
        return
    flags = torch.stack([~torch.isfinite(v).all() for _, v in given]).tolist()
    for (k, _), bad in zip(given, flags):
        if bad:
            raise ValueError(f"{k}: contains non-finite values (NaN or Inf)")


def _in_range(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def _per_sequence(value, lead: tuple) -> bool:
    """A tensor that is not shaped like targets (nor a scalar): one value per sequence."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(lead)


def _sequences(seq_ids, lead: tuple, device, advantages, sequence_level: bool) -> tuple[torch.Tensor, int]:
    """(sequence id per token [N], −1 for none; number of sequences S). Without seq_ids the
    sequences are the rows of targets [..., T]; with per-sequence advantages S is their length,
    else 1 + the largest id."""
    per_seq = advantages.shape[0] if _per_sequence(advantages, lead) else None
    if seq_ids is None:
        if len(lead) < 2 and not sequence_level:
            raise ValueError(f"advantages: expected shape {list(lead)} (one value per token, like targets), or one "
                             f"per sequence with seq_ids; got {list(advantages.shape)}")
        if len(lead) < 2:
            raise ValueError("seq_ids: required with importance_sampling_level='sequence' when targets is 1-D "
                             f"(shape {list(lead)}, packed); or pass targets as [B, T] (one sequence per row)")
        rows = math.prod(lead[:-1])
        return torch.arange(rows, device=device).repeat_interleave(lead[-1]), rows
    seq_ids = _tensor("seq_ids", seq_ids)
    _int_dtype("seq_ids", seq_ids)
    num = per_seq if per_seq is not None else int(seq_ids.max()) + 1 if seq_ids.numel() else 0  # one sync
    ids = check_seq_ids(seq_ids, num, lead, device)
    # with value checks off, an id out of range counts towards no sequence (never indexed)
    return torch.where((ids < -1) | (ids >= num), torch.full_like(ids, -1), ids), max(num, 0)


def _broadcast_per_sequence(name: str, value: torch.Tensor, ids: torch.Tensor, num: int, device) -> torch.Tensor:
    """[S] or [S, 1] per sequence → [N] per token (0 on tokens of no sequence)."""
    _float_dtype(name, value)
    _same_device(name, value, device)
    if tuple(value.shape) not in ((num,), (num, 1)):
        raise ValueError(f"{name}: expected shape like targets, or [{num}] / [{num}, 1] (one value per sequence), "
                         f"got {list(value.shape)}")
    per_seq = value.detach().reshape(num)
    return torch.where(ids >= 0, per_seq[ids.clamp(min=0)], torch.zeros((), dtype=per_seq.dtype, device=device))


def check_spans(span_ids, num_spans, reduce, lead, device):
    """Validate answer_span_logprobs' span arguments. Returns (span ids [N] safe to index with,
    rows whose id is in range). Out-of-range ids, possible only with value checks off, count
    towards no span, as out-of-range targets count as ignored."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
    if isinstance(num_spans, bool) or not isinstance(num_spans, Integral) or num_spans < 1:
        raise ValueError(f"num_spans: expected a positive int, got {num_spans!r}")
    span_ids = _tensor("span_ids", span_ids)
    _int_dtype("span_ids", span_ids)
    if tuple(span_ids.shape) != lead:
        raise ValueError(f"span_ids: expected shape {list(lead)} (one span id per row, like targets), "
                         f"got {list(span_ids.shape)}")
    _same_device("span_ids", span_ids, device)
    ids = span_ids.reshape(-1).long()
    in_range = (ids >= 0) & (ids < num_spans)
    if _value_checks and not bool(in_range.all()):
        row = int((~in_range).nonzero()[0, 0])
        raise ValueError(f"span_ids: expected ids in [0, {num_spans}) (num_spans), got {int(ids[row])} at row {row}")
    return torch.where(in_range, ids, torch.zeros_like(ids)), in_range


def check_span_counts(counts: torch.Tensor) -> None:
    """reduce="mean" divides by each span's number of target tokens; with value checks off an
    empty span's mean is 0/0 = NaN."""
    if _value_checks and not bool(counts.all()):
        span = int((counts == 0).nonzero()[0, 0])
        raise ValueError(f"span_ids: span {span} has no row with a target; reduce='mean' needs at least one "
                         f"(or use reduce='sum')")


def check_prg_inputs(support, probe_offsets, variant, eps, tau_g):
    """Validate prg_gains' inputs. Returns (support [S], probe_offsets [T + 1] int64, eps, tau_g).

    The offsets' structure is checked even with value checks off: it costs one O(T) sync per
    batch, and a bad offset would make a kernel index out of bounds."""
    support = _tensor("support", support)
    _float_dtype("support", support)
    if support.dim() != 1:
        raise ValueError(f"support: expected a 1-D tensor [S] (the probes' support, trace by trace), "
                         f"got shape {tuple(support.shape)}")
    offsets = _tensor("probe_offsets", probe_offsets)
    _int_dtype("probe_offsets", offsets)
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"probe_offsets: expected a 1-D tensor [T + 1] with T >= 1 traces, "
                         f"got shape {tuple(offsets.shape)}")
    _same_device("probe_offsets", offsets, support.device, of="support")
    if variant not in PRG_VARIANTS:
        raise ValueError(f"variant: expected one of {PRG_VARIANTS}, got {variant!r}")
    eps, tau_g = _positive("eps", eps), _positive("tau_g", tau_g)
    offsets = offsets.long()
    _check_offsets(offsets, support)
    return support, offsets, eps, tau_g


def _check_offsets(offsets: torch.Tensor, support: torch.Tensor) -> None:
    steps = offsets.diff()
    checks = [offsets[0] != 0, (steps <= 0).any(), offsets[-1] != support.numel()]
    if _value_checks:
        checks.append(_nonfinite_flag(support))
    first, flat, last, *nonfinite = torch.stack(checks).tolist()  # one sync
    if first:
        raise ValueError(f"probe_offsets: expected offsets[0] == 0, got {int(offsets[0])}")
    if flat:
        t = int((steps <= 0).nonzero()[0, 0])
        raise ValueError(f"probe_offsets: expected strictly increasing offsets (every trace has at least its "
                         f"probe c_0), got offsets[{t}] = {int(offsets[t])}, offsets[{t + 1}] = {int(offsets[t + 1])}")
    if last:
        raise ValueError(f"probe_offsets: expected offsets[-1] == len(support) = {support.numel()}, "
                         f"got {int(offsets[-1])}")
    _raise_nonfinite([("support", support)], nonfinite)


# --- HyTuning: per-sequence inputs (docs/math.md §4, §6) ------------------------------------


class SequenceInputs(NamedTuple):
    seq_ids: torch.Tensor
    prg: torch.Tensor
    is_rd: torch.Tensor
    advantages: Optional[torch.Tensor]
    rewards: Optional[torch.Tensor]
    group_ids: Optional[torch.Tensor]


def check_rewards(name: str, x, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 1-D finite float vector per sequence (rewards, PRG, advantages), optionally [len(like)]."""
    x = _tensor(name, x)
    _float_dtype(name, x)
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor (one value per sequence), got shape {list(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name}: expected shape {list(like.shape)} (one value per sequence), got {list(x.shape)}")
    if like is not None:
        _same_device(name, x, like.device)
    if _value_checks and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains non-finite values (NaN or Inf)")
    return x.detach()


def check_group_ids(group_ids, rewards: torch.Tensor):
    """(number of groups, each sequence's group index 0..G-1) for arbitrary integer labels."""
    group_ids = _tensor("group_ids", group_ids)
    _int_dtype("group_ids", group_ids)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids: expected shape {list(rewards.shape)} (one per sequence), got {list(group_ids.shape)}")
    _same_device("group_ids", group_ids, rewards.device)
    labels, inverse = torch.unique(group_ids, return_inverse=True)
    return labels.numel(), inverse


def check_seq_ids(seq_ids, num_seqs: int, lead: tuple, device, require_tokens: bool = False) -> torch.Tensor:
    """Per-token sequence index in [-1, num_seqs) (−1: the token belongs to no sequence)."""
    seq_ids = _tensor("seq_ids", seq_ids)
    _int_dtype("seq_ids", seq_ids)
    if tuple(seq_ids.shape) != tuple(lead):
        raise ValueError(f"seq_ids: expected shape {list(lead)} (like targets), got {list(seq_ids.shape)}")
    _same_device("seq_ids", seq_ids, device)
    seq_ids = seq_ids.reshape(-1).long()
    if _value_checks:
        bad = (seq_ids < -1) | (seq_ids >= num_seqs)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"seq_ids: expected ids in [-1, {num_seqs}), got {int(seq_ids[row])} at token {row}")
        if require_tokens:
            count = torch.bincount(seq_ids[seq_ids >= 0], minlength=num_seqs)
            if bool((count == 0).any()):
                raise ValueError(f"seq_ids: sequence {int((count == 0).nonzero()[0, 0])} has no tokens")
    return seq_ids


def check_sequence_inputs(targets, seq_ids, *, prg, is_rd, advantages, rewards, group_ids) -> SequenceInputs:
    targets = _tensor("targets", targets)
    prg = check_rewards("prg", prg)
    is_rd = _tensor("is_rd", is_rd)
    if is_rd.dtype != torch.bool or is_rd.shape != prg.shape:
        raise ValueError(f"is_rd: expected a bool tensor of shape {list(prg.shape)} (one per sequence), "
                         f"got {is_rd.dtype} {list(is_rd.shape)}")
    _same_device("is_rd", is_rd, prg.device)
    _same_device("prg", prg, targets.device)
    seq_ids = check_seq_ids(seq_ids, prg.numel(), tuple(targets.shape), targets.device)
    if advantages is not None:
        advantages = check_rewards("advantages", advantages, like=prg)
        if rewards is not None:
            raise ValueError("rewards: pass either advantages or rewards (+ group_ids), not both")
    elif not bool(is_rd.all()):
        if rewards is None or group_ids is None:
            raise ValueError("advantages: RLIF sequences need advantages, or rewards and group_ids to compute them")
        rewards = check_rewards("rewards", rewards, like=prg)
        check_group_ids(group_ids, rewards)
    return SequenceInputs(seq_ids, prg, is_rd, advantages, rewards, group_ids)
