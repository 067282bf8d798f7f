"""Public functions: validate once, pick the backend, call the custom ops (hykernels/_ops.py).

token_stats recomputes logits tiles in its backward (the one backward of docs/math.md §2,
through _grad); fused_loss (§5) forms its gradients in the forward pass and its backward only
scales them. answer_span_logprobs is token_stats' logp summed per span (the support of §3);
prg_gains turns the supports into PRG scores (§3), detached.

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
    """Per-token statistics of the logits, without holding the [N, V] logits (docs/math.md §2).

    The logits are z = s(hidden·weightᵀ + bias)/temperature, the softcap
    s(x) = softcap·tanh(x/softcap) first, then the temperature (docs/math.md §1). The backward
    recomputes the logits tile by tile (8·N·D·V FLOPs with the forward).

    Args:
        hidden: [..., D] floating tensor (fp16, bf16, fp32, fp64), e.g. a model's last hidden
            states. Inside ``torch.autocast`` hidden, weight and bias are cast to the autocast
            dtype, as ``F.linear`` would cast them.
        weight: [V, D] lm_head weight, hidden's dtype and device.
        targets: [...] integer next-token ids in [0, V), hidden's leading shape;
            ``ignore_index`` marks a row without a target, None means no row has one.
        bias: Optional [V] lm_head bias, hidden's dtype.
        temperature: τ > 0, the sampler's temperature (applied after the softcap).
        softcap: c > 0, the model's final-logit softcap, or None for none.
        ignore_index: The target id meaning "no target".
        backend: "auto", "reference", "torch_chunked", "triton" or "cuda".
        chunk_size: Rows per chunk for the chunked backends (None: from their workspace budget).
        process_group: Vocabulary-parallel: the ``torch.distributed`` group across which weight
            (and bias) are slices of the vocabulary, hidden and targets (global ids) the same on
            every rank. A weight given as a DTensor sharded on dim 0 needs none.

    Returns:
        TokenStats(logp, entropy, self_certainty, confidence, argmax, lse), each shaped like
        targets: fp32 (fp64 for fp64 inputs), argmax int64. logp, entropy, self_certainty and
        lse are differentiable w.r.t. hidden, weight and bias; a row without a target has
        logp = 0 and no gradient through it. Vocabulary-parallel: the statistics of the whole
        vocabulary on every rank; the hidden gradient is summed across the group and each rank
        gets its own slice's weight gradient.

    Raises:
        TypeError: An input is not a tensor, hidden is not floating, weight or bias has another
            dtype than hidden, targets is not an integer tensor, or the backend does not take
            the dtype (triton and cuda refuse fp64).
        ValueError: Shapes or devices do not match, temperature or softcap is not a finite
            number > 0, the backend is unknown, or (value checks on) a target id is outside
            [0, V) and not ignore_index, or hidden, weight or bias holds NaN/Inf.
        BackendUnavailableError: The named backend cannot run on this device.
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
    """The weighted RD + RLIF loss of docs/math.md §5, its gradients formed in the forward pass.

    L = Σ_t ℓ_t with

        ℓ_t = a_t·((1−ε)·(−logp_t) + ε·mean_v(−log p_tv) + z·lse_t²)
              + b_t·(−min(ρ_t·A_t, clip(ρ_t, 1−ε_lo, 1+ε_hi)·A_t))
              + c_t·k3_t·(ρ_t if use_bias_correction_kl else 1) − e_t·entropy_t,
        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1,

    a = rd_weight, b = rlif_weight, A = advantages, c = kl_weight, e = entropy_weight. Each is None
    (term off), a number, or a tensor shaped like targets; they are constants (detached). Rows
    without a target contribute nothing. The weights carry the normalisation: rd_weight = 1/T,
    T the tokens with a target, is torch's mean cross-entropy; class weights cw are the per-token
    weights cw[targets] / cw[targets of rows with a target].sum() (F.cross_entropy(weight=cw),
    without label smoothing, whose vocabulary mean torch also weighs by cw). TRL's GRPO
    normalisations are per-token weights too: hykernels.hytuning.grpo_token_weights.

    Cost: token-level terms form the gradients in the forward pass (6·N·D·V FLOPs on every
    backend while a chunk of rows fits its workspace) and hold dH, dW, db until backward, which
    only scales them. Sequence-level ratios and vocabulary-parallel calls need every row's
    log-prob (or global lse) before any coefficient: a statistics pass, then a recompute pass
    forming the gradients, both in forward (8·N·D·V; 8·N·D·V/P per rank). reduction="none"
    runs the statistics pass in forward and recomputes the logits in backward (8·N·D·V).

    Args:
        hidden: [..., D] floating tensor, e.g. a model's last hidden states (as for token_stats).
        weight: [V, D] lm_head weight, hidden's dtype and device.
        targets: [...] integer next-token ids, hidden's leading shape; ignore_index = no target.
        rd_weight: a_t, the cross-entropy (RD) weight: None, a number, or a float tensor shaped
            like targets.
        rlif_weight: b_t, the PPO-clip (RLIF) weight; needs advantages.
        advantages: A_t: a number, a tensor shaped like targets, or one value per sequence,
            [S] or [S, 1], broadcast over the sequence's tokens (sequences are the rows of
            targets [..., T], or given by seq_ids; a token of no sequence gets 0).
        old_logp: Log-probs of the sampling policy, shaped like targets, for the importance ratio
            ρ_t = exp(logp_t − old_t). None: on-policy, ρ ≡ 1 with gradient.
        ref_logp: Log-probs of the reference policy, shaped like targets; needs kl_weight.
        kl_weight: c_t, the weight of the k3 KL term to the reference; needs ref_logp.
        entropy_weight: e_t, the weight of the entropy bonus −e_t·entropy_t.
        clip_eps: (ε_lo, ε_hi) of the PPO clip, 0 ≤ ε_lo < 1, ε_hi ≥ 0; one number means both.
        label_smoothing: ε ∈ [0, 1], torch's F.cross_entropy(label_smoothing=ε) on the a_t term
            (rows without a target excluded from both parts); needs rd_weight.
        z_loss: z ≥ 0: adds z·lse² per token, weighted like the cross-entropy (Liger's
            lse_square_scale, PaLM's z-loss); needs rd_weight.
        reduction: None (default) or "sum": Σ_t ℓ_t; "mean": Σ_t ℓ_t / T (0 when T = 0, where
            torch gives NaN); "none": ℓ_t per token, shaped like targets (0 on rows without a
            target), differentiable with any upstream gradient. With a reduction and no term
            given, rd_weight = 1: plain cross-entropy, F.cross_entropy(logits, targets, reduction=...).
        seq_ids: Integer tensor shaped like targets: each token's sequence in [0, S), −1 = none.
            Needed for per-sequence advantages or sequence-level ratios of packed (1-D) targets.
        importance_sampling_level: "token" (default) or "sequence" (GSPO; TRL's option of that
            name): one ratio per sequence, ρ_s = exp(mean of logp − old over the sequence's
            tokens with a target), in the PPO term and the bias-corrected KL. A token of no
            sequence is a sequence of its own.
        use_bias_correction_kl: TRL's option: the k3 term times the importance ratio, which
            carries gradient.
        temperature: τ > 0, as for token_stats.
        softcap: c > 0 or None, as for token_stats.
        bias: Optional [V] lm_head bias, hidden's dtype.
        ignore_index: The target id meaning "no target".
        backend: "auto", "reference", "torch_chunked", "triton" or "cuda".
        chunk_size: Rows per chunk for the chunked backends (None: from their workspace budget).
        process_group: Vocabulary-parallel, as for token_stats: the loss is the same on every
            rank; gradients by a statistics pass and a recompute pass (8·N·D·V/P per rank).

    Returns:
        A tuple (loss, stats). loss is a 0-dim tensor (shaped like targets with reduction="none"), fp32
        (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and bias. stats is a
        LossStats of detached per-token read-outs shaped like targets: TokenStats' six fields
        and z_loss, each token's z-loss term as it enters the returned loss (``z_loss.sum()`` is
        the z-loss part of a reduced loss: Liger's ``return_z_loss``).

    Raises:
        TypeError: As token_stats, or a term that is not a number or a float tensor, or
            use_bias_correction_kl that is not a bool.
        ValueError: As token_stats; no term given (and no reduction); a term without its partner
            (rlif_weight and advantages, kl_weight and ref_logp); old_logp without a term that
            uses it; label_smoothing or z_loss without rd_weight or out of range; a term of the
            wrong shape; clip_eps out of range; an unknown reduction or importance_sampling_level;
            reduction="none" with sequence-level ratios; seq_ids missing where 1-D targets need
            it; (value checks on) seq_ids out of range or a term holding NaN/Inf.
        BackendUnavailableError: The named backend cannot run on this device.
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
    """Answer log-probability per span: the support c_k of docs/math.md §3.

    The lm_head runs on the given rows only, e.g. the answer rows of a packed probe batch
    (hykernels.hytuning.build_probes). Differentiable w.r.t. hidden, weight and bias; the backward
    gathers each span's gradient to its rows (recomputing the logits: 8·R·D·V FLOPs in all).

    Args:
        hidden: [R, D] (or [..., D]) hidden states of the rows that predict answer tokens.
        weight: [V, D] lm_head weight, hidden's dtype and device.
        targets: [R] the answer tokens those rows predict; rows with ignore_index add nothing.
        span_ids: [R] integer, the span (e.g. probe) each row belongs to, in [0, num_spans).
        num_spans: The number of spans S (an int ≥ 1).
        reduce: "mean" (default): Σ logp over the span's rows divided by the number of its rows
            with a target (each span needs one); "sum": the plain sum.
        bias: Optional [V] lm_head bias, hidden's dtype.
        temperature: τ > 0, as for token_stats.
        softcap: c > 0 or None, as for token_stats.
        ignore_index: The target id meaning "no target".
        backend: "auto", "reference", "torch_chunked", "triton" or "cuda".
        chunk_size: Rows per chunk for the chunked backends (None: from their workspace budget).
        process_group: Vocabulary-parallel, as for token_stats.

    Returns:
        [num_spans] supports, fp32 (fp64 for fp64 inputs). With value checks off, an empty
        span's mean is NaN and rows with an out-of-range span id count towards no span.

    Raises:
        TypeError: As token_stats, or span_ids not an integer tensor.
        ValueError: As token_stats; an unknown reduce, num_spans not a positive int, span_ids
            not shaped like targets; (value checks on) a span id outside [0, num_spans), or
            with reduce="mean" a span without a row with a target.
        BackendUnavailableError: The named backend cannot run on this device.
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
    """Progressive Reasoning Gain per trace (docs/math.md §3) from its probes' supports.

    With the gains Δ_k = c_k − c_{k−1} of a trace with probes c_0..c_K, the variants are
    progressive: ρ·σ((c_K − c_0)/tau_g) with ρ = Σ max(Δ, 0)/(Σ |Δ| + eps); monotone: the
    fraction of Δ_k > 0; net: c_K − c_0; mean_gain: mean Δ_k; min_gain: min Δ_k. A trace with
    K = 0 has ρ = monotone = 1/2 (so progressive = 1/4) and net = mean_gain = min_gain = 0.

    Args:
        support: [S] floating, c_0..c_K of every trace, trace by trace (e.g.
            answer_span_logprobs with one span per probe).
        probe_offsets: [T + 1] integer: trace t's probes are
            support[probe_offsets[t]:probe_offsets[t + 1]]; from 0 to S, strictly increasing
            (every trace has at least c_0). Always checked, value checks on or off.
        variant: "progressive" (default), "monotone", "net", "mean_gain" or "min_gain".
        eps: ε > 0 of progressive's ρ.
        tau_g: τ_g > 0, the temperature of progressive's net-gain sigmoid.
        backend: Which backend's segment kernels run ("auto": as for token_stats).

    Returns:
        PRGResult(gains [S − T], gain_offsets [T + 1] int64, scores [T]), fp32 (fp64 for fp64
        support), all detached: PRG is a weighting signal, not a loss to differentiate. Trace
        t's gains are gains[gain_offsets[t]:gain_offsets[t + 1]].

    Raises:
        TypeError: support is not a floating tensor or probe_offsets not an integer tensor.
        ValueError: Shapes or devices do not match; offsets that do not start at 0, increase
            strictly and end at S; an unknown variant; eps or tau_g not a finite number > 0;
            (value checks on) support holding NaN/Inf.
        BackendUnavailableError: The named backend cannot run on this device.
    """
    support, offsets, eps, tau_g = check_prg_inputs(support, probe_offsets, variant, eps, tau_g)
    impl = backends.resolve(backend, support.device, support.dtype, arg="support")
    gains, scores = impl.prg_scores(support.detach(), offsets, variant, eps, tau_g)
    gain_offsets = offsets - torch.arange(offsets.numel(), device=offsets.device)
    return PRGResult(gains, gain_offsets, scores)
