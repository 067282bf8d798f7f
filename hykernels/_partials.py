"""Online-softmax partials of a vocabulary slice, and how slices combine into §2's statistics.

A kernel that streams only part of a row's vocabulary (a Triton split, a cuda workspace slice,
one rank's shard of a vocab-parallel lm_head) keeps per row

    m = max z,  s = Σ e^{z−m},  t = Σ (z−m)·e^{z−m},  u = Σ (z−m),  z_y (0 if y is elsewhere),
    argmax (a global vocabulary index),  count = entries in the slice.

Slices combine exactly by rebasing to the common max M (shift = m − M ≤ 0):
    s ← e^{shift}·s,  t ← e^{shift}·(t + shift·s),  u ← u + count·shift,
and sums add. This one module does that for every backend and for torch.distributed, so the
statistics are the same formulas wherever the vocabulary was split.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._types import TokenStats


class Partials(NamedTuple):
    """Per-row partials of k vocabulary slices: each field [k, N] (count [k, 1]), fp32/fp64
    except argmax (int64, global index)."""

    m: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor
    zy: torch.Tensor
    argmax: torch.Tensor
    count: torch.Tensor


def slice_counts(vocab: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[k, 1] entries of the slices [j·width, min(vocab, (j+1)·width)) covering the vocabulary."""
    k = math.ceil(vocab / width)
    return torch.tensor([[min(vocab, (j + 1) * width) - j * width] for j in range(k)],
                        dtype=like.dtype, device=like.device)


def _rebase(p: Partials, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shift = p.m - mx  # ≤ 0; −inf for a slice whose entries are all −inf (masked): s = t = 0
    w = torch.exp(shift)
    t = torch.where(p.s == 0, 0.0, w * (p.t + shift * p.s))  # never −inf·0
    return w * p.s, t, p.u + p.count * shift


def combine(p: Partials) -> Partials:
    """The k slices of ``p`` as one slice ([1, N] fields) covering all of them."""
    if p.m.shape[0] == 1:
        return p
    mx, best = p.m.max(0, keepdim=True)  # the first slice holding the max: lowest index on ties
    s, t, u = _rebase(p, mx)
    return Partials(mx, s.sum(0, keepdim=True), t.sum(0, keepdim=True), u.sum(0, keepdim=True),
                    p.zy.sum(0, keepdim=True), p.argmax.gather(0, best), p.count.sum(0, keepdim=True))


def all_reduce(p: Partials, vocab: int, group) -> Partials:
    """Combine partials across the ranks of ``group``, each holding a shard of the ``vocab``
    entries: three all-reduces of O(N) data (max, the four sums, argmax), never logits."""
    import torch.distributed as dist

    p = combine(p)
    mx = p.m.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    s, t, u = _rebase(p, mx)
    sums = torch.cat([s, t, u, p.zy])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    # ties across shards go to the lowest global index, as torch.argmax does
    cand = torch.where(p.m == mx, p.argmax, torch.full_like(p.argmax, vocab))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    s, t, u, zy = sums.split(1)
    return Partials(mx, s, t, u, zy, cand, torch.full_like(p.count, vocab))


def finish(p: Partials, valid: torch.Tensor, dtype: torch.dtype) -> tuple[TokenStats, torch.Tensor]:
    """§2 statistics (and lse's rounding remainder lse_lo, see backends/_dense.row_stats) from
    partials covering the whole vocabulary. ``valid`` marks rows with a target."""
    p = combine(p)
    m, s, t, u, zy = (x[0] for x in p[:5])
    vocab = p.count[0, 0]
    lse_s = torch.log(s)
    lse = m + lse_s
    lse_lo = lse_s - (lse - m)  # Fast2Sum: exact while |m| >= lse_s
    entropy = lse_s - t / s
    self_certainty = lse_s - u / vocab - torch.log(vocab)
    confidence = torch.exp(-lse_s)
    logp = torch.where(valid, (zy - m) - lse_s, torch.zeros_like(lse))
    stats = TokenStats(logp, entropy, self_certainty, confidence, p.argmax[0], lse)
    return TokenStats(*(x.to(dtype) if x.is_floating_point() else x for x in stats)), lse_lo.to(dtype)
