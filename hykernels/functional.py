"""Public functions: validate once, dispatch to a backend, wire autograd.

token_stats recomputes logits tiles in its backward (the §2 formula through _grad);
fused_loss forms its gradients in the forward pass and its backward only scales them.
answer_span_logprobs is token_stats' logp summed per span (§3 support); prg_gains turns the
supports into PRG scores (§3), detached.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._checks import (check_logit_inputs, check_loss_terms, check_prg_inputs, check_span_counts, check_spans,
                      target_mask)
from ._distributed import VocabParallel, check_replicated, shard_of
from ._grad import stats_coefficients
from ._types import LogitOptions, LossTerms, PRGResult, TokenStats


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions, backend, vocab: int):
        stats, lse_lo = backend.token_stats(hidden, weight, bias, targets, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, stats.lse, lse_lo, stats.entropy)
        ctx.opts, ctx.backend, ctx.vocab = opts, backend, vocab
        ctx.mark_non_differentiable(stats.confidence, stats.argmax)
        ctx.set_materialize_grads(False)
        return tuple(stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, g_sc, _g_conf, _g_argmax, g_lse):
        hidden, weight, bias, targets, lse, lse_lo, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or all(g is None for g in (g_logp, g_entropy, g_sc, g_lse)):
            return None, None, None, None, None, None, None
        valid, _ = target_mask(targets, ctx.vocab, ctx.opts.ignore_index)
        coefs = stats_coefficients(g_logp, g_lse, g_entropy, g_sc, entropy, valid, ctx.vocab)
        dh, dw, db = ctx.backend.token_stats_backward(hidden, weight, bias, targets, ctx.opts, lse, lse_lo,
                                                      coefs, needs)
        return dh, dw, db, None, None, None, None


class _FusedLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions, terms: LossTerms, backend, grad_enabled):
        # needs_input_grad ignores torch.no_grad(); under it (e.g. scoring old_logp) forming
        # gradients would triple the work for nothing.
        needs = tuple(n and grad_enabled for n in ctx.needs_input_grad[:3])
        loss, stats, dh, dw, db = backend.fused_loss(hidden, weight, bias, targets, opts, terms, needs)
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, *_unused_stats_grads):
        # Gradients were formed in forward; the chain rule only scales them. The first backward
        # scales in place: a copy would add a dW-sized buffer (1.2 GB bf16 at V=151936, D=4096)
        # exactly when memory peaks. It writes through .data, which leaves the saved tensors'
        # version counters alone, so a later backward (retain_graph=True, gradcheck) can still
        # unpack them and rescales out of place from the factor already applied (NaN if that
        # factor was 0: nothing is left). saved_tensors are still freed after a plain backward.
        grads = ctx.saved_tensors
        if getattr(ctx, "applied", None) is None:
            ctx.applied = g_loss.detach().clone()
            scaled = [None if g is None else g.data.mul_(g_loss.to(g.dtype)) for g in grads]
        else:
            factor = g_loss / ctx.applied
            scaled = [None if g is None else g * factor.to(g.dtype) for g in grads]
        return (*scaled, None, None, None, None, None)


class _SegmentSumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, segment_ids, num_segments: int, backend):
        ctx.save_for_backward(segment_ids)
        return backend.segment_sum(values, segment_ids, num_segments)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        (segment_ids,) = ctx.saved_tensors
        return g_out[segment_ids], None, None, None  # each row gets its segment's gradient


def _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index, chunk_size, backend,
             process_group):
    """Validate once and pick the backend: (hidden [N, D], weight, targets [N], bias, leading shape,
    LogitOptions, backend, V). With a vocabulary-sharded weight (``process_group`` or a Shard(0)
    DTensor) weight and bias are this rank's slice, V the whole vocabulary, and the backend is
    wrapped to combine the ranks (hykernels/_distributed.py)."""
    hidden, weight, bias, shard = shard_of(hidden, weight, bias, process_group)
    h, y, bias, lead, opts = check_logit_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                                                chunk_size, vocab=None if shard is None else shard.vocab)
    impl = backends.resolve(backend, h.device, h.dtype)
    if shard is None:
        return h, weight, y, bias, lead, opts, impl, weight.shape[0]
    check_replicated(h, y, shard)
    return h, weight, y, bias, lead, opts, VocabParallel(impl, shard), shard.vocab


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> TokenStats:
    """Per-token statistics of the logits z = s((hidden·weightᵀ + bias)/temperature), without
    holding the [N, V] logits (hytuning.md §2).

    hidden [..., D], weight [V, D], targets [...] (ints; ``ignore_index`` or None = no target).
    Returns TokenStats(logp, entropy, self_certainty, confidence, argmax, lse), each shaped like
    targets, fp32 (fp64 for fp64 inputs). logp, entropy, self_certainty and lse are differentiable
    w.r.t. hidden, weight and bias; rows without a target have logp = 0 and no gradient through it.

    Vocabulary-parallel: with ``process_group`` (or a weight given as a DTensor sharded on dim 0)
    weight and bias are this rank's slice of the vocabulary, hidden and targets (global ids) the
    same on every rank; the statistics are those of the whole vocabulary on every rank, the
    hidden gradient is summed across the group and each rank gets its own slice's weight gradient.
    """
    h, w, y, bias, lead, opts, impl, vocab = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                      ignore_index, chunk_size, backend, process_group)
    stats = _TokenStatsFn.apply(h, w, bias, y, opts, impl, vocab)
    return TokenStats(*stats).reshape(lead)


def fused_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rd_weight=None,
    rlif_weight=None,
    advantages=None,
    old_logp=None,
    ref_logp=None,
    kl_weight=None,
    entropy_weight=None,
    clip_eps=(0.2, 0.2),
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> tuple[torch.Tensor, TokenStats]:
    """The weighted RD + RLIF loss of hytuning.md §5, L = Σ_t ℓ_t with

        ℓ_t = a_t·(−logp_t) + b_t·(−min(ρ_t·A_t, clip(ρ_t, 1−ε_lo, 1+ε_hi)·A_t))
              + c_t·(exp(ref_t − logp_t) − (ref_t − logp_t) − 1) − e_t·entropy_t,

    a = rd_weight, b = rlif_weight, A = advantages, ρ = exp(logp − old_logp) (≡ 1 with gradient
    when old_logp is None), c = kl_weight, e = entropy_weight. Each is None (term off), a number,
    or a tensor shaped like targets; they are constants (detached). The weights carry the
    normalisation (token mean, sequence mean, ...). Rows without a target contribute nothing.

    Gradients w.r.t. hidden, weight and bias are formed in the forward pass (no logits
    recompute) and held until backward. Returns (loss, TokenStats) with the statistics detached.
    ``process_group``: vocabulary-parallel, as for token_stats (the loss is the same on every rank;
    the gradients are formed in forward by a statistics pass and a recompute pass, 8·N·D·V/P).
    """
    h, w, y, bias, lead, opts, impl, _ = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                  ignore_index, chunk_size, backend, process_group)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    terms = check_loss_terms(lead, h.device, dtype, rd_weight=rd_weight, rlif_weight=rlif_weight,
                             advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                             kl_weight=kl_weight, entropy_weight=entropy_weight, clip_eps=clip_eps)
    loss, *stats = _FusedLossFn.apply(h, w, bias, y, opts, terms, impl, torch.is_grad_enabled())
    return loss, TokenStats(*stats).reshape(lead)


def answer_span_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    *,
    reduce: str = "mean",
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> torch.Tensor:
    """Answer log-probability per span: the support c of hytuning.md §3.

    hidden [R, D] holds the answer rows only (the lm_head runs on nothing else), targets [R] their
    next-token ids, span_ids [R] the span (e.g. probe) each row belongs to, in [0, num_spans).
    Returns [num_spans] fp32 (fp64 for fp64 inputs): reduce="sum" gives Σ logp over the span's
    rows, "mean" divides by the number of its rows with a target (each span needs one; with value
    checks off an empty span's mean is NaN). Rows without a target add nothing. Differentiable
    w.r.t. hidden, weight and bias; the backward gathers each span's gradient to its rows.
    """
    h, w, y, bias, lead, opts, impl, vocab = _prepare(hidden, weight, targets, bias, temperature, softcap,
                                                      ignore_index, chunk_size, backend, process_group)
    ids, in_range = check_spans(span_ids, num_spans, reduce, lead, h.device)
    if reduce == "mean":  # counted before the lm_head runs, so an empty span fails fast
        valid, _ = target_mask(y, vocab, opts.ignore_index)
        counts = impl.segment_sum((valid & in_range).float(), ids, num_spans)
        check_span_counts(counts)
    logp = _TokenStatsFn.apply(h, w, bias, y, opts, impl, vocab)[0]
    span_sum = _SegmentSumFn.apply(torch.where(in_range, logp, 0.0), ids, num_spans, impl)
    return span_sum / counts if reduce == "mean" else span_sum


def prg_gains(
    support: torch.Tensor,
    probe_offsets: torch.Tensor,
    *,
    variant: str = "progressive",
    eps: float = 1e-6,
    tau_g: float = 1.0,
    backend: str = "auto",
) -> PRGResult:
    """Progressive Reasoning Gain per trace (hytuning.md §3) from its probes' supports.

    support [S] is c_0..c_K of every trace, trace by trace (e.g. answer_span_logprobs with one
    span per probe); trace t's probes are support[probe_offsets[t]:probe_offsets[t + 1]]
    (probe_offsets [T + 1], from 0 to S, each trace at least one probe). ``variant`` is one of
    progressive (ρ·σ((c_K − c_0)/tau_g), ρ = Σmax(Δ,0)/(Σ|Δ| + eps)), monotone, net, mean_gain,
    min_gain; a trace with K = 0 has ρ = monotone = 1/2 and net = mean_gain = min_gain = 0.

    Returns PRGResult(gains [S − T], gain_offsets [T + 1], scores [T]), fp32 (fp64 for fp64
    support). All outputs are detached: PRG is a weighting signal, not a loss to differentiate.
    """
    support, offsets, eps, tau_g = check_prg_inputs(support, probe_offsets, variant, eps, tau_g)
    impl = backends.resolve(backend, support.device, support.dtype, arg="support")
    gains, scores = impl.prg_scores(support.detach(), offsets, variant, eps, tau_g)
    gain_offsets = offsets - torch.arange(offsets.numel(), device=offsets.device)
    return PRGResult(gains, gain_offsets, scores)
