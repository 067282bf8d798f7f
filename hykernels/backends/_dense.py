"""Dense tile math shared by the PyTorch backends: one [rows, V] logits tile at a time.

The reference applies it to the whole batch in fp32/fp64; torch_chunked to one token chunk
at a time. Keeping the formulas here means both PyTorch paths are the same math by
construction, and the reference stays a few lines long.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._partials import Partials
from .._types import LogitOptions, RowCoefs, TokenStats


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulators are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    opts: LogitOptions,
    dtype: torch.dtype,
) -> torch.Tensor:
    """z = s((H·Wᵀ + b)/τ) in ``dtype``. The GEMM runs in the operands' dtype (fp32
    accumulation inside, as cuBLAS/oneDNN do); everything after it runs in ``dtype``."""
    z = (hidden @ weight.T).to(dtype)
    if bias is not None:
        z += bias.to(dtype)
    if opts.temperature != 1.0:
        z /= opts.temperature
    if opts.softcap is not None:
        z = torch.tanh(z.div_(opts.softcap)).mul_(opts.softcap)
    return z


def row_stats(z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[TokenStats, torch.Tensor]:
    """§2 statistics of a logits tile (``targets`` already safe to gather), and lse's rounding
    remainder ``lse_lo`` (lse + lse_lo = m + lse_s to twice the precision).

    Sums run on max-shifted logits, as an online-softmax kernel's accumulators do: entropy
    as (lse − m) − Σ p·(z − m) keeps both terms O(log V) instead of O(|z|). The backward
    recomputes log p = (z − lse) − lse_lo: with |z| ~ 300 a plain fp32 lse alone would be off by
    ~2e-5 and bias every p of the row by that much."""
    zmax, argmax = z.max(-1)
    zs = z - zmax[:, None]
    lse_s = torch.logsumexp(zs, dim=-1)
    p = torch.exp(zs - lse_s[:, None])
    entropy = lse_s - _p_times(p, zs).sum(-1)
    self_certainty = lse_s - zs.mean(-1) - math.log(z.shape[-1])
    lse = lse_s + zmax
    lse_lo = lse_s - (lse - zmax)  # Fast2Sum: exact while |zmax| >= lse_s
    confidence = torch.exp(-lse_s)
    z_y = zs.gather(1, targets[:, None]).squeeze(1)
    logp = torch.where(valid, z_y - lse_s, torch.zeros_like(lse))
    return TokenStats(logp, entropy, self_certainty, confidence, argmax, lse), lse_lo


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p·x with p·x = 0 wherever p = 0: a masked logit (z = −inf, e.g. a −inf bias entry) has
    x = z − m = −inf or log p = −inf and must contribute nothing, not −inf·0 = NaN. A NaN input
    still propagates (its p is NaN, not 0)."""
    return (p * x).masked_fill_(p == 0, 0.0)


def row_partials(z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> Partials:
    """The tile's online-softmax partials (hykernels/_partials.py) as one slice: what a rank
    holding these vocabulary columns contributes to a vocab-parallel reduction. A row whose
    slice is all −inf has m = −inf, s = t = 0 (it is shifted by 0, not by its −inf max)."""
    m, argmax = z.max(-1)
    zs = z - torch.where(m == float("-inf"), 0.0, m)[:, None]
    e = torch.exp(zs)
    zy = torch.where(valid, z.gather(1, targets[:, None]).squeeze(1), torch.zeros_like(m))
    count = torch.full((1, 1), z.shape[-1], dtype=z.dtype, device=z.device)
    return Partials(m[None], e.sum(-1)[None], _p_times(e, zs).sum(-1)[None], zs.sum(-1)[None], zy[None],
                    argmax[None], count)


def logits_grad(
    z: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    coefs: RowCoefs,
    targets: torch.Tensor,
    opts: LogitOptions,
) -> torch.Tensor:
    """G = (dL/dz ∘ s′)/τ from the §2 coefficients, overwriting ``z`` to save a tile."""
    A, B, C, D = (c[:, None] for c in coefs)
    cap_slope = None
    if opts.softcap is not None:  # s′ = 1 − (s/c)², needs z before it is overwritten
        cap_slope = 1.0 - (z / opts.softcap).square_()
    logp = z.sub_(lse[:, None]).sub_(lse_lo[:, None])
    p = torch.exp(logp)
    g = logp.mul_(B).add_(A).mul_(p).masked_fill_(p == 0, 0.0).add_(D)  # p = 0: no −inf·0 (see _p_times)
    del p
    g.scatter_add_(1, targets[:, None], C)
    if cap_slope is not None:
        g.mul_(cap_slope)
    if opts.temperature != 1.0:
        g /= opts.temperature
    return g
