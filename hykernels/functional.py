"""Public functions: validate once, pick the backend, call the custom ops (hykernels/_ops.py).

token_stats recomputes logits tiles in its backward (the §2 formula through _grad);
fused_loss forms its gradients in the forward pass and its backward only scales them.
answer_span_logprobs is token_stats' logp summed per span (§3 support); prg_gains turns the
supports into PRG scores (§3), detached.

The ops are torch.library custom ops and what runs here is traceable (shape and dtype checks,
tensor arithmetic), so torch.compile(fullgraph=True) traces token_stats and fused_loss without
graph breaks; value checks and the backends run inside the ops. Not traced without breaks:
vocabulary-parallel calls (their shard sizes and replication check are collectives on the host),
sequence-level ratios with ``seq_ids`` (the number of sequences is read from the ids), span and
PRG offset checks (answer_span_logprobs with value checks on, prg_gains).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from . import _ops, backends
from ._checks import check_logit_inputs, check_loss_terms, check_prg_inputs, check_span_counts, check_spans, target_mask
from ._distributed import check_replicated, shard_of
from ._grad import z_loss_tokens
from ._ops import BackendSpec, flat
from ._types import LossStats, PRGResult, TokenStats


def _autocast_inputs(hidden, weight, bias):
    """In an autocast region the lm_head's GEMMs run in the autocast dtype, as F.linear's would:
    each input that autocast would cast for F.linear (floating, not fp64, on the autocast device)
    is cast here, once per call. The casts are differentiable, so each gradient comes back in its
    input's own dtype (an fp32 master weight gets an fp32 gradient), and uncached: a copy lives
    only as long as the op needs it (a token_stats backward; fused_loss keeps none)."""
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if (device_type is None or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(x):
        if (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                and x.device.type == device_type):
            return x.to(dtype)
        return x

    return cast(hidden), cast(weight), cast(bias)


def _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index, chunk_size, backend,
             process_group):
    """Validate once (shapes and dtypes; the ops check values) and pick the backend: (hidden
    [N, D], weight, targets [N], bias, leading shape, the op arguments of LogitOptions and
    BackendSpec, the BackendSpec). With a vocabulary-sharded weight (``process_group`` or a Shard(0) DTensor)
    weight and bias are this rank's slice, V the whole vocabulary, and the ops combine the ranks
    (hykernels/_distributed.py). In an autocast region the inputs are cast to the autocast dtype;
    the backend always runs with autocast off. With no rows it is not called (_ops._NoRows)."""
    hidden, weight, bias, shard = shard_of(hidden, weight, bias, process_group)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    h, y, bias, lead, opts = check_logit_inputs(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                                                chunk_size)
    spec = BackendSpec(_backend_name(backend, h.device, h.dtype), weight.shape[0])
    if shard is not None:
        check_replicated(h, y, shard)
        spec = BackendSpec(spec.name, shard.vocab, shard.group.group_name, shard.offset)
    return h, weight, y, bias, lead, (*flat(opts), *flat(spec)), spec


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The resolved backend's name; torch.compile runs this at trace time (it imports modules)
    and keeps the name as a constant of the graph."""
    return backends.resolve(backend, device, dtype).NAME


def _needs(*inputs) -> list[bool]:
    """Which inputs get a gradient: requires_grad, and not under torch.no_grad() (scoring
    old_logp there would triple the work for gradients nobody reads)."""
    return [torch.is_grad_enabled() and x is not None and x.requires_grad for x in inputs]


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
    """Per-token statistics of the logits z = s(hidden·weightᵀ + bias)/temperature (the softcap
    s(x) = softcap·tanh(x/softcap) first, then the temperature), without holding the [N, V]
    logits (hytuning.md §2).

    hidden [..., D], weight [V, D], targets [...] (ints; ``ignore_index`` or None = no target).
    Returns TokenStats(logp, entropy, self_certainty, confidence, argmax, lse), each shaped like
    targets, fp32 (fp64 for fp64 inputs). logp, entropy, self_certainty and lse are differentiable
    w.r.t. hidden, weight and bias; rows without a target have logp = 0 and no gradient through it.

    Vocabulary-parallel: with ``process_group`` (or a weight given as a DTensor sharded on dim 0)
    weight and bias are this rank's slice of the vocabulary, hidden and targets (global ids) the
    same on every rank; the statistics are those of the whole vocabulary on every rank, the
    hidden gradient is summed across the group and each rank gets its own slice's weight gradient.
    """
    h, w, y, bias, lead, call, _ = _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                                            chunk_size, backend, process_group)
    *stats, _lse_lo = _ops.token_stats(h, w, bias, y, *call)
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
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Optional[str] = None,
    seq_ids: Optional[torch.Tensor] = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> tuple[torch.Tensor, LossStats]:
    """The weighted RD + RLIF loss of hytuning.md §5, L = Σ_t ℓ_t with

        ℓ_t = a_t·((1−ε)·(−logp_t) + ε·mean_v(−log p_tv) + z·lse_t²)
              + b_t·(−min(ρ_t·A_t, clip(ρ_t, 1−ε_lo, 1+ε_hi)·A_t))
              + c_t·k3_t·(ρ_t if use_bias_correction_kl else 1) − e_t·entropy_t,
        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1,

    a = rd_weight, b = rlif_weight, A = advantages, c = kl_weight, e = entropy_weight. Each is None
    (term off), a number, or a tensor shaped like targets; they are constants (detached).
    ``advantages`` may also be one per sequence, [S] or [S, 1], broadcast over the sequence's
    tokens: sequences are the rows of targets [B, T] (or [..., T]), or given by ``seq_ids``
    (shaped like targets, ids in [0, S), −1 = no sequence: advantage 0). Rows without a target
    contribute nothing.

    Cross-entropy options (on the a_t term, so rd_weight is needed): ``label_smoothing`` ε ∈ [0, 1]
    is torch's F.cross_entropy(label_smoothing=ε) (rows without a target excluded from both
    parts); ``z_loss`` z ≥ 0 adds z·lse² per token, weighted like the cross-entropy (Liger's
    lse_square_scale, PaLM's z-loss). ``stats.z_loss`` holds each token's z-loss term as it enters
    the returned loss, so ``stats.z_loss.sum()`` is the z-loss part of a reduced loss (Liger's
    ``return_z_loss``). Class weights cw are per-token weights: rd_weight = cw[targets] /
    cw[targets of rows with a target].sum() is F.cross_entropy(weight=cw) (cw[targets] alone: its
    reduction="sum"); with label smoothing torch also weighs the mean over the vocabulary by cw,
    which per-token weights cannot express.

    ``reduction``: None (default) returns Σ_t ℓ_t, the weights carrying the normalisation; "sum"
    is the same; "mean" divides it by T, the number of tokens with a target (0 when T = 0, where
    torch gives NaN); "none" returns ℓ_t per token, shaped like targets (0 on rows without a
    target), differentiable with any upstream gradient. With a reduction and no term given,
    rd_weight = 1: plain cross-entropy, F.cross_entropy(logits, targets, reduction=...).

    Importance ratio ρ_t = exp(logp_t − old_t), ≡ 1 with gradient when old_logp is None
    (on-policy). ``importance_sampling_level="sequence"`` (GSPO; TRL's option of that name) uses
    one ratio per sequence, ρ_s = exp(mean of logp − old over the sequence's tokens with a target),
    in the PPO term and in the bias-corrected KL (``use_bias_correction_kl``, TRL's: k3 times the
    ratio, which carries gradient). A token of no sequence is a sequence of its own. TRL's loss
    normalisations (grpo, bnpo, dr_grpo, dapo) are per-token weights:
    hykernels.hytuning.grpo_token_weights builds them.

    Cost: token-level terms form the gradients in the forward pass (6·N·D·V FLOPs on the
    reference, torch_chunked and whole-row cuda paths; 8·N·D·V on triton) and hold them until
    backward, which only scales them. Sequence-level ratios need every row's log-prob before any
    coefficient: a statistics pass, then a recompute pass forming the gradients, both in forward
    (8·N·D·V on every backend). reduction="none" runs the statistics pass in forward and
    recomputes the logits in backward (8·N·D·V). Returns (loss, LossStats), the statistics
    detached. ``process_group``: vocabulary-parallel, as for token_stats (the loss is the same on
    every rank; gradients by a statistics pass and a recompute pass, 8·N·D·V/P).
    """
    h, w, y, bias, lead, call, spec = _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                                               chunk_size, backend, process_group)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    terms = check_loss_terms(lead, h.device, dtype, rd_weight=rd_weight, rlif_weight=rlif_weight,
                             advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                             kl_weight=kl_weight, entropy_weight=entropy_weight, clip_eps=clip_eps,
                             label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, seq_ids=seq_ids,
                             importance_sampling_level=importance_sampling_level,
                             use_bias_correction_kl=use_bias_correction_kl, vocab_size=spec.vocab)
    valid, _ = target_mask(y, spec.vocab, ignore_index)
    if reduction == "mean":  # every weight over T, on the device (no sync)
        inv_t = 1.0 / valid.sum().clamp(min=1).to(dtype)
        weights = ("rd_weight", "rlif_weight", "kl_weight", "entropy_weight")
        terms = replace(terms, **{k: getattr(terms, k) * inv_t for k in weights if getattr(terms, k) is not None})
    if reduction == "none":
        loss, *stats = _ops.per_token_loss(h, w, bias, y, *call, *flat(terms))[:7]
        loss = loss.reshape(lead)
    else:
        loss, *stats = _ops.fused_loss(h, w, bias, y, *call, *flat(terms), _needs(h, w, bias))[:7]
    stats = TokenStats(*stats)
    return loss, LossStats(*stats, z_loss_tokens(stats.lse, valid, terms)).reshape(lead)


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
    h, w, y, bias, lead, call, spec = _prepare(hidden, weight, targets, bias, temperature, softcap, ignore_index,
                                               chunk_size, backend, process_group)
    ids, in_range = check_spans(span_ids, num_spans, reduce, lead, h.device)
    if reduce == "mean":  # counted before the lm_head runs, so an empty span fails fast
        valid, _ = target_mask(y, spec.vocab, ignore_index)
        counts = _ops.segment_sum((valid & in_range).float(), ids, num_spans, spec.name)
        check_span_counts(counts)
    logp = _ops.token_stats(h, w, bias, y, *call)[0]
    span_sum = _ops.segment_sum(torch.where(in_range, logp, 0.0), ids, num_spans, spec.name)
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
