"""The one backward of docs/math.md §2, as per-row coefficients.

Every loss built from the row statistics differentiates to
    dL/dz_v = p_v·(A + B·log p_v) + C·[v = y] + D,    log p_v = z_v − lse,
with four per-row scalars. This is §2's p_v·(A_§2 + B·z_v) with A = A_§2 + B·lse, written
relative to lse so that large logits do not cancel (entropy's A_§2 = g·(lse − H) and B·z_v are
both ~|z|; here entropy contributes A = −g·H, B = −g). This module turns upstream gradients
(token_stats) or the §5 loss (fused_loss) into those scalars; backends apply them to tiles.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ._checks import target_mask
from ._types import LossTerms, RowCoefs, TokenStats


def stats_coefficients(
    g_logp: Optional[torch.Tensor],
    g_lse: Optional[torch.Tensor],
    g_entropy: Optional[torch.Tensor],
    g_self_certainty: Optional[torch.Tensor],
    entropy: torch.Tensor,
    valid: torch.Tensor,
    vocab_size: int,
) -> RowCoefs:
    """Coefficients from upstream gradients of (logp, lse, entropy, self_certainty).

    A None upstream gradient means that output was not used. Rows without a target
    (``valid`` False) take no gradient through logp.
    """
    zero = torch.zeros_like(entropy)
    A, B, C, D = zero, zero, zero, zero
    if g_logp is not None:
        g = torch.where(valid, g_logp, zero)
        A, C = A - g, C + g
    if g_lse is not None:
        A = A + g_lse
    if g_entropy is not None:
        A = A - g_entropy * entropy
        B = B - g_entropy
    if g_self_certainty is not None:
        A = A + g_self_certainty
        D = D - g_self_certainty / vocab_size
    return RowCoefs(A, B, C, D)


def z_loss_tokens(lse: torch.Tensor, valid: torch.Tensor, terms: LossTerms) -> torch.Tensor:
    """Each row's z-loss term a·z_loss·lse² (0 when off or the row has no target)."""
    if not terms.z_loss or terms.rd_weight is None:
        return torch.zeros_like(lse)
    z = terms.rd_weight.to(lse.dtype) * terms.z_loss * lse.square()
    return torch.where(valid, z, torch.zeros_like(z))


def loss_coefficients(
    stats: TokenStats,
    valid: torch.Tensor,
    terms: LossTerms,
) -> tuple[torch.Tensor, RowCoefs]:
    """Per-token §5 loss and its backward coefficients, closed-form in the row statistics.

    ``stats``: the rows' TokenStats (logp, entropy, self_certainty, lse are read). Returns (loss
    per token [n], RowCoefs). Rows without a target contribute nothing. The loss is written as
    upstream gradients of (logp, lse, entropy, self_certainty) and turned into coefficients by
    stats_coefficients, the one §2 backward. Token-level terms need only their own row, so a
    backend that sees whole rows forms the gradient in the forward pass (6·N·D·V FLOPs);
    sequence-level terms (``terms.seq_ids``) need every row of the batch at once.
    """
    logp, entropy, lse = stats.logp, stats.entropy, stats.lse
    zero = torch.zeros_like(logp)
    loss, g_logp, g_lse, g_ent, g_sc = zero, zero, zero, zero, None  # loss and dL/d(statistic)

    def const(t: torch.Tensor) -> torch.Tensor:
        return t.to(logp.dtype)

    if terms.rd_weight is not None:  # a·((1−ε)·(−logp) + ε·mean_v(−log p_v)) + a·z·lse²
        a, eps = const(terms.rd_weight), terms.label_smoothing
        loss = loss - a * (1.0 - eps) * logp
        g_logp = g_logp - a * (1.0 - eps)
        if eps:  # mean_v(−log p_v) = lse − mean_v z = self_certainty + log V
            loss = loss + a * eps * (stats.self_certainty + math.log(terms.vocab_size))
            g_sc = a * eps
        if terms.z_loss:
            loss = loss + z_loss_tokens(lse, valid, terms)
            g_lse = g_lse + 2.0 * terms.z_loss * a * lse

    g_ratio = zero  # dL/dρ of the importance ratio ρ = exp(logp − old) (token) or exp(mean_s(logp − old))
    ratio = None
    if terms.rlif_weight is not None or (terms.kl_ratio and terms.kl_weight is not None):
        # on-policy (old_logp None): old = logp detached, so ρ ≡ 1 with dρ/dlogp = 1 (or 1/n_s)
        log_ratio = zero if terms.old_logp is None else logp - const(terms.old_logp)
        if terms.sequence_level:
            log_ratio = _sequence_mean(log_ratio, valid, terms)[terms.seq_ids]
        ratio = torch.exp(log_ratio)
    if terms.rlif_weight is not None:  # b·(−min(ρA, clip(ρ)A))
        b, adv = const(terms.rlif_weight), const(terms.advantages)
        clipped = ratio.clamp(1.0 - terms.clip_low, 1.0 + terms.clip_high)
        surrogate = torch.minimum(ratio * adv, clipped * adv)
        loss = loss - b * surrogate
        # The gradient flows only where the unclipped surrogate is the minimum.
        g_ratio = g_ratio - torch.where(ratio * adv <= clipped * adv, b * adv, zero)
    if terms.kl_weight is not None:  # c·(exp(ref − logp) − (ref − logp) − 1), times ρ with kl_ratio
        c = const(terms.kl_weight)
        # A token without KL weight adds exactly nothing, even where exp(ref − logp) overflows (a
        # placeholder ref, e.g. 0 on rows that are not rollouts): 0·inf would be NaN.
        delta = torch.where(c != 0, const(terms.ref_logp) - logp, zero)
        e_delta = torch.exp(delta)
        k3 = e_delta - delta - 1.0
        if terms.kl_ratio:
            loss = loss + c * ratio * k3
            g_logp = g_logp + c * ratio * (1.0 - e_delta)
            g_ratio = g_ratio + c * k3
        else:
            loss = loss + c * k3
            g_logp = g_logp + c * (1.0 - e_delta)
    if ratio is not None:  # dρ/dlogp: ρ (token) or ρ_s/n_s for every row of sequence s
        g_ratio = torch.where(valid, g_ratio, zero)
        if terms.sequence_level:
            count = _segment_sum(valid.to(logp.dtype), terms).clamp(min=1.0)
            g_logp = g_logp + ratio * (_segment_sum(g_ratio, terms) / count)[terms.seq_ids]
        else:
            g_logp = g_logp + ratio * g_ratio
    if terms.entropy_weight is not None:  # −e·entropy
        e = const(terms.entropy_weight)
        loss = loss - e * entropy
        g_ent = g_ent - e

    loss = torch.where(valid, loss, zero)
    g_lse, g_ent = torch.where(valid, g_lse, zero), torch.where(valid, g_ent, zero)
    g_sc = None if g_sc is None else torch.where(valid, g_sc, zero)
    return loss, stats_coefficients(g_logp, g_lse, g_ent, g_sc, entropy, valid, terms.vocab_size)


def _segment_sum(values: torch.Tensor, terms: LossTerms) -> torch.Tensor:
    out = torch.zeros(terms.num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add_(0, terms.seq_ids, values)


def _sequence_mean(values: torch.Tensor, valid: torch.Tensor, terms: LossTerms) -> torch.Tensor:
    """[num_seqs] mean of ``values`` over each sequence's rows with a target (0 for none), as TRL's
    (x·mask).sum(-1) / mask.sum(-1).clamp(min=1)."""
    zero = torch.zeros_like(values)
    total = _segment_sum(torch.where(valid, values, zero), terms)
    return total / _segment_sum(valid.to(values.dtype), terms).clamp(min=1.0)


def loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms: LossTerms,
                      needs, vocab: int):
    """fused_loss for a path that keeps no logits between passes (a backend's interface, given its
    token_stats and token_stats_backward): the statistics pass, the §5 coefficients above, then
    the §2 backward recomputing the logits, all in the forward call (8·N·D·V FLOPs). ``vocab``:
    the vocabulary the targets index (the whole one when weight is a vocab-parallel slice)."""
    stats, lse_lo = token_stats(hidden, weight, bias, targets, opts)
    valid, _ = target_mask(targets, vocab, opts.ignore_index)
    loss, coefs = loss_coefficients(stats, valid, terms)
    grads = (None, None, None)
    if any(needs):
        grads = token_stats_backward(hidden, weight, bias, targets, opts, stats.lse, lse_lo, coefs, needs)
    return loss.sum(), stats, *grads


# dW accumulation of the chunked backends (cuda, triton) for bf16 weights: False sums the chunks
# straight into the bf16 gradient (fp32 inside each chunk's GEMM, one rounding per chunk, as
# Liger's fused linear cross-entropy); HYKERNELS_FP32_ACCUMULATE=1 keeps an fp32 accumulator
# (V·D·4 bytes more, one rounding at the end). fp16 weights always accumulate in fp32 (range).
FP32_ACCUMULATE = os.environ.get("HYKERNELS_FP32_ACCUMULATE", "0") == "1"

# Scaled fp16 gradient tiles stay below this: full fp16 precision down to 2^-24 of it, and room
# for a product with the weight (|S·dH| ≲ FP16_GRAD_BOUND·(2 + log V)·max|W|) below fp16's 65504.
FP16_GRAD_BOUND = 2.0**10


def grad_bound(coefs: RowCoefs, inv_temp: float) -> torch.Tensor:
    """A bound on |G| over the rows of ``coefs``: |G_v| ≤ (|A| + |B|/e + |C| + |D|)/τ, since
    p_v ≤ 1, p_v·|log p_v| ≤ 1/e and the softcap slope s′ ≤ 1."""
    A, B, C, D = coefs
    return (A.abs() + B.abs() / math.e + C.abs() + D.abs()).max() * inv_temp


def fp16_grad_scale(bound: torch.Tensor) -> float:
    """A power of two S for gradient tiles that are narrowed to fp16 before their GEMMs, so that
    S·|G| ≤ ``bound``·S ≤ FP16_GRAD_BOUND. Unscaled, p·coefficient products under fp16's 6e-8 flush
    to zero: with 1/T weights of a 16k-token batch that is every p below ~1e-3, and dH/dW lose the
    softmax part of the gradient. Backends multiply the tile (or the coefficients: G is linear in
    them) by S and divide the fp32 results by S. One host sync; bf16 has fp32's range, skips it."""
    b = float(bound.max().item()) if bound.numel() else 0.0
    if not (b > 0.0 and math.isfinite(b)):
        return 1.0
    return 2.0 ** max(-64, min(64, math.floor(math.log2(FP16_GRAD_BOUND / b))))
