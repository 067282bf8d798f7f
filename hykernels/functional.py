"""Public functions: validate once, dispatch to a backend, wire autograd.

token_stats recomputes logits tiles in its backward (the §2 formula through _grad);
fused_loss forms its gradients in the forward pass and its backward only scales them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._checks import check_logit_inputs, check_loss_terms, target_mask
from ._grad import stats_coefficients
from ._types import LogitOptions, LossTerms, TokenStats


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions, backend):
        stats, lse_lo = backend.token_stats(hidden, weight, bias, targets, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, stats.lse, lse_lo, stats.entropy)
        ctx.opts, ctx.backend = opts, backend
        ctx.mark_non_differentiable(stats.confidence, stats.argmax)
        ctx.set_materialize_grads(False)
        return tuple(stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, g_sc, _g_conf, _g_argmax, g_lse):
        hidden, weight, bias, targets, lse, lse_lo, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or all(g is None for g in (g_logp, g_entropy, g_sc, g_lse)):
            return None, None, None, None, None, None
        valid, _ = target_mask(targets, weight.shape[0], ctx.opts.ignore_index)
        coefs = stats_coefficients(g_logp, g_lse, g_entropy, g_sc, entropy, valid, weight.shape[0])
        dh, dw, db = ctx.backend.token_stats_backward(hidden, weight, bias, targets, ctx.opts, lse, lse_lo,
                                                      coefs, needs)
        return dh, dw, db, None, None, None


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
        # Gradients were formed in forward; the chain rule only scales them.
        scaled = [None if g is None else g * g_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None)


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
) -> TokenStats:
    """Per-token statistics of the logits z = s((hidden·weightᵀ + bias)/temperature), without
    holding the [N, V] logits (hytuning.md §2).

    hidden [..., D], weight [V, D], targets [...] (ints; ``ignore_index`` or None = no target).
    Returns TokenStats(logp, entropy, self_certainty, confidence, argmax, lse), each shaped like
    targets, fp32 (fp64 for fp64 inputs). logp, entropy, self_certainty and lse are differentiable
    w.r.t. hidden, weight and bias; rows without a target have logp = 0 and no gradient through it.
    """
    h, y, bias, lead, opts = check_logit_inputs(hidden, weight, targets, bias, temperature, softcap,
                                                ignore_index, chunk_size)
    impl = backends.resolve(backend, h.device, h.dtype)
    stats = _TokenStatsFn.apply(h, weight, bias, y, opts, impl)
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
    """
    h, y, bias, lead, opts = check_logit_inputs(hidden, weight, targets, bias, temperature, softcap,
                                                ignore_index, chunk_size)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    terms = check_loss_terms(lead, h.device, dtype, rd_weight=rd_weight, rlif_weight=rlif_weight,
                             advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                             kl_weight=kl_weight, entropy_weight=entropy_weight, clip_eps=clip_eps)
    impl = backends.resolve(backend, h.device, h.dtype)
    loss, *stats = _FusedLossFn.apply(h, weight, bias, y, opts, terms, impl, torch.is_grad_enabled())
    return loss, TokenStats(*stats).reshape(lead)
