"""The reference backend's dense math on a whole [rows, V] logits tile in fp32/fp64, written
plainly (torch.max, logsumexp, one op per formula) so the oracle stays easy to read; the
torch_chunked backend computes the same formulas its own faster way and is tested against it.
Also fp32_output_gemm_error, the probe of torch's fp32-output GEMM on a device."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .._partials import Partials
from .._types import LogitOptions, RowCoefs, TokenStats


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulators are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def fp32_output_gemm_error(device: torch.device) -> Optional[str]:
    """None if torch.mm and torch.addmm of bf16/fp16 operands with ``out_dtype=torch.float32``
    (cuBLAS with an fp32 output) work on ``device``, else why not: torch < 2.8 lacks the schema,
    CPU torch has no kernel for it, and not every build and GPU runs it. The exact calls gemm()
    and the cuda backend make, probed once per device."""
    try:
        for dtype in (torch.bfloat16, torch.float16):
            a = torch.ones(2, 3, dtype=dtype, device=device)
            out = torch.empty(2, 2, dtype=torch.float32, device=device)
            torch.mm(a, a.T, out_dtype=torch.float32, out=out)
            torch.addmm(out, a, a.T, alpha=0.5, out_dtype=torch.float32, out=out)
            if out[0, 0].item() != 4.5:
                return f"torch.addmm(..., out_dtype=torch.float32) gave a wrong result for {dtype} on {device}"
    except (RuntimeError, TypeError) as exc:
        return (f"torch.mm/addmm(..., out_dtype=torch.float32) (torch >= 2.8), which failed on {device} with "
                f"torch {torch.__version__}: {str(exc).splitlines()[0]}")
    return None


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    opts: LogitOptions,
    dtype: torch.dtype,
) -> torch.Tensor:
    """z = s(H·Wᵀ + b)/τ in ``dtype`` (docs/math.md §1: the model's softcap first, then the
    sampler's temperature), from ``hidden`` and ``weight`` already in ``dtype`` (fp32/fp64), so the
    bias, softcap and temperature apply to unrounded values."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z += bias.to(dtype)
    if opts.softcap is not None:  # c·tanh(x/c)/τ, the two scalings folded into one multiply
        z = torch.tanh(z.div_(opts.softcap)).mul_(opts.softcap / opts.temperature)
    elif opts.temperature != 1.0:
        z /= opts.temperature
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
    """G = (dL/dz ∘ s′(x))/τ from the §2 coefficients, overwriting ``z`` to save a tile.
    ``z`` is the final logit s(x)/τ, so s(x)/c = τ·z/c."""
    A, B, C, D = (c[:, None] for c in coefs)
    cap_slope = None
    if opts.softcap is not None:  # s′ = 1 − (τ·z/c)², needs z before it is overwritten
        cap_slope = 1.0 - (z * (opts.temperature / opts.softcap)).square_()
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
