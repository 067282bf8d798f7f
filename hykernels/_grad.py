"""The one backward of hytuning.md §2, as per-row coefficients.

Every loss built from the row statistics differentiates to
    dL/dz_v = p_v·(A + B·log p_v) + C·[v = y] + D,    log p_v = z_v − lse,
with four per-row scalars. This is §2's p_v·(A_§2 + B·z_v) with A = A_§2 + B·lse, written
relative to lse so that large logits do not cancel (entropy's A_§2 = g·(lse − H) and B·z_v are
both ~|z|; here entropy contributes A = −g·H, B = −g). This module turns upstream gradients
(token_stats) or the §5 loss (fused_loss) into those scalars; backends apply them to tiles.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import target_mask
from ._types import LossTerms, RowCoefs


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


def loss_coefficients(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    valid: torch.Tensor,
    terms: LossTerms,
) -> tuple[torch.Tensor, RowCoefs]:
    """Per-token §5 loss and its backward coefficients, closed-form in (logp, entropy).

    Returns (loss per token [n], RowCoefs). Rows without a target contribute nothing.
    Because the coefficients need only this row's statistics, a backend that sees whole
    rows can form the gradient in the same pass as the forward (6·N·D·V FLOPs).
    """
    loss = torch.zeros_like(logp)
    g_logp = torch.zeros_like(logp)  # dL/dlogp
    g_ent = torch.zeros_like(logp)  # dL/dentropy

    def const(t: torch.Tensor) -> torch.Tensor:
        return t.to(logp.dtype)

    if terms.rd_weight is not None:  # a·(−logp)
        a = const(terms.rd_weight)
        loss = loss - a * logp
        g_logp = g_logp - a
    if terms.rlif_weight is not None:  # b·(−min(ρA, clip(ρ)A))
        b, adv = const(terms.rlif_weight), const(terms.advantages)
        if terms.old_logp is None:  # on-policy: ρ ≡ 1 with dρ/dlogp = 1
            ratio = torch.ones_like(logp)
            surrogate = adv
            unclipped_active = torch.ones_like(valid)
        else:
            ratio = torch.exp(logp - const(terms.old_logp))
            clipped = ratio.clamp(1.0 - terms.clip_low, 1.0 + terms.clip_high)
            surrogate = torch.minimum(ratio * adv, clipped * adv)
            # The gradient flows only where the unclipped surrogate is the minimum.
            unclipped_active = ratio * adv <= clipped * adv
        loss = loss - b * surrogate
        g_logp = g_logp - torch.where(unclipped_active, b * ratio * adv, torch.zeros_like(b))
    if terms.kl_weight is not None:  # c·(exp(ref − logp) − (ref − logp) − 1)
        c = const(terms.kl_weight)
        delta = const(terms.ref_logp) - logp
        e_delta = torch.exp(delta)
        loss = loss + c * (e_delta - delta - 1.0)
        g_logp = g_logp + c * (1.0 - e_delta)
    if terms.entropy_weight is not None:  # −e·entropy
        e = const(terms.entropy_weight)
        loss = loss - e * entropy
        g_ent = g_ent - e

    zero = torch.zeros_like(logp)
    loss = torch.where(valid, loss, zero)
    g_logp = torch.where(valid, g_logp, zero)
    g_ent = torch.where(valid, g_ent, zero)
    coefs = RowCoefs(A=-g_logp - g_ent * entropy, B=-g_ent, C=g_logp, D=zero)
    return loss, coefs


def loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms: LossTerms,
                      needs, vocab: int):
    """fused_loss for a path that keeps no logits between passes (a backend's interface, given its
    token_stats and token_stats_backward): the statistics pass, the §5 coefficients above, then
    the §2 backward recomputing the logits, all in the forward call (8·N·D·V FLOPs). ``vocab``:
    the vocabulary the targets index (the whole one when weight is a vocab-parallel slice)."""
    stats, lse_lo = token_stats(hidden, weight, bias, targets, opts)
    valid, _ = target_mask(targets, vocab, opts.ignore_index)
    loss, coefs = loss_coefficients(stats.logp, stats.entropy, valid, terms)
    grads = (None, None, None)
    if any(needs):
        grads = token_stats_backward(hidden, weight, bias, targets, opts, stats.lse, lse_lo, coefs, needs)
    return loss.sum(), stats, *grads


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
