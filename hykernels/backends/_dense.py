"""Dense tile math shared by the PyTorch backends: one [rows, V] logits tile at a time.

The reference applies it to the whole batch in fp32/fp64; torch_chunked to one token chunk
at a time. Keeping the formulas here means both PyTorch paths are the same math by
construction, and the reference stays a few lines long.
"""
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


# Half-precision operands are upcast one vocabulary block of the weight at a time: at most
# this many bytes of fp32 weight copy live at once (never the whole V·D·4 bytes).
WEIGHT_BLOCK_BYTES = 32 * 2**20


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


def gemm(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """H·Wᵀ with its output in ``dtype`` (fp32 for half operands), never rounded to bf16/fp16:
    a half GEMM's rounded output costs lse errors of ~1e-3, and the bias and softcap come after it.

    Half operands: on CUDA one ``torch.mm(out_dtype=fp32)`` (fp32 accumulate and output, torch ≥
    2.8); elsewhere (CPU torch has no such kernel) the hidden rows are upcast once and the weight
    one block of rows at a time, each block's fp32 copy at most WEIGHT_BLOCK_BYTES, written into
    its columns of the fp32 output. Memory beyond the [rows, V] output: rows·D·4 + that block."""
    if hidden.dtype == dtype and weight.dtype == dtype:
        return hidden @ weight.T
    if hidden.is_cuda and dtype == torch.float32 and fp32_output_gemm_error(hidden.device) is None:
        return torch.mm(hidden, weight.T, out_dtype=dtype)
    h = hidden.to(dtype)
    vocab, dim = weight.shape
    step = max(1, WEIGHT_BLOCK_BYTES // (dim * torch.finfo(dtype).bits // 8))
    if step >= vocab:
        return h @ weight.to(dtype).T
    out = torch.empty(h.shape[0], vocab, dtype=dtype, device=h.device)
    for v0 in range(0, vocab, step):
        torch.mm(h, weight[v0:v0 + step].to(dtype).T, out=out[:, v0:v0 + step])
    return out


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    opts: LogitOptions,
    dtype: torch.dtype,
) -> torch.Tensor:
    """z = s(H·Wᵀ + b)/τ in ``dtype`` (docs/math.md §1: the model's softcap first, then the
    sampler's temperature). The GEMM's output is already ``dtype`` (``gemm``): the bias, softcap
    and temperature apply to unrounded fp32 (fp64) values."""
    z = gemm(hidden, weight, dtype)
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
