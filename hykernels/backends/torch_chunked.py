"""Token-chunked PyTorch backend: any device, memory O(chunk·V) instead of O(N·V).

Each chunk of rows materialises its [chunk, V] logits tile, forms the statistics and, for
fused_loss, the gradient of the §5 loss in the same pass (6·N·D·V FLOPs). The logits GEMM
gives fp32 for half inputs (_dense.gemm: out_dtype on CUDA, else the weight upcast block by
block); the gradient GEMMs run in the inputs' dtype; statistics, the logits tile and the dW
accumulator are fp32 (fp64 for fp64).

Workspace beyond inputs/outputs: a few [chunk, V] fp32 tiles (the chunk is sized so one tile
is about TILE_BYTES) plus, for fp16/bf16 weights, the fp32 dW accumulator and, off CUDA, the
chunk's hidden rows in fp32 and one ≤ _dense.WEIGHT_BLOCK_BYTES fp32 block of the weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import target_mask
from .._grad import fp16_grad_scale, loss_coefficients
from .._partials import Partials
from .._types import LogitOptions, LossTerms, RowCoefs, TokenStats
from . import _dense
from ._segments import prg_scores, segment_sum  # noqa: F401  (segment ops: the shared torch implementation)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAME = "torch_chunked"
TILE_BYTES = 64 * 2**20


def availability(device: torch.device) -> Optional[str]:
    return None


def chunk_rows(num_rows: int, vocab_size: int, opts: LogitOptions) -> int:
    if opts.chunk_size is not None:
        return opts.chunk_size
    return max(1, min(num_rows, max(16, TILE_BYTES // (4 * vocab_size))))


class _GradAccumulator:
    """Collects dH per chunk and dW, db across chunks (fp32/fp64 accumulation)."""

    def __init__(self, hidden, weight, bias, needs):
        acc = _dense.stat_dtype(weight.dtype)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dh = torch.empty_like(hidden) if needs[0] else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (
            bias is not None and needs[2]) else None

    def add(self, sl: slice, g: torch.Tensor) -> None:
        if self.weight.dtype == torch.float16:
            return self._add_fp16(sl, g)
        g_in = g.to(self.weight.dtype)
        if self.dh is not None:
            torch.matmul(g_in, self.weight, out=self.dh[sl])
        if self.dw is not None:
            if g_in.dtype == self.dw.dtype:
                self.dw.addmm_(g_in.T, self.hidden[sl])
            else:  # bf16 GEMM, accumulated in fp32
                self.dw += g_in.T @ self.hidden[sl]
        if self.db is not None:
            self.db += g.sum(0)

    def _add_fp16(self, sl: slice, g: torch.Tensor) -> None:
        """fp16 has too little range for a gradient tile: p·coefficient products flush to zero
        (_grad.fp16_grad_scale). dW: an fp32 GEMM of the fp32 tile and the chunk's hidden rows.
        dH: the tile scaled by a power of two S, an fp16 GEMM, then divided by S (exact)."""
        if self.dh is not None:
            scale = fp16_grad_scale(g.abs().max())
            torch.matmul((g * scale).to(torch.float16), self.weight, out=self.dh[sl])
            self.dh[sl] /= scale
        if self.dw is not None:
            self.dw.addmm_(g.T, self.hidden[sl].to(g.dtype))
        if self.db is not None:
            self.db += g.sum(0)

    def result(self):
        dw = None if self.dw is None else self.dw.to(self.weight.dtype)
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return self.dh, dw, db


def _chunks(hidden, weight, opts):
    n = hidden.shape[0]
    step = chunk_rows(n, weight.shape[0], opts)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _concat(parts):
    """Join per-chunk (TokenStats, lse_lo) results."""
    stats, lse_lo = zip(*parts)
    return TokenStats(*(torch.cat(cols) for cols in zip(*stats))), torch.cat(lse_lo)


def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    dt = _dense.stat_dtype(hidden.dtype)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    return _concat([
        _dense.row_stats(_dense.logits(hidden[sl], weight, bias, opts, dt), safe[sl], valid[sl])
        for sl in _chunks(hidden, weight, opts)
    ])


def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    dt = _dense.stat_dtype(hidden.dtype)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    parts = [_dense.row_partials(_dense.logits(hidden[sl], weight, bias, opts, dt), safe[sl], valid[sl])
             for sl in _chunks(hidden, weight, opts)]
    *fields, counts = zip(*parts)  # every chunk covers the same columns: one count
    return Partials(*(torch.cat(f, dim=1) for f in fields), counts[0])


def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    dt = _dense.stat_dtype(hidden.dtype)
    _, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    acc = _GradAccumulator(hidden, weight, bias, needs)
    for sl in _chunks(hidden, weight, opts):
        z = _dense.logits(hidden[sl], weight, bias, opts, dt)
        acc.add(sl, _dense.logits_grad(z, lse[sl], lse_lo[sl], coefs.rows(sl), safe[sl], opts))
    return acc.result()


def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    dt = _dense.stat_dtype(hidden.dtype)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    acc = _GradAccumulator(hidden, weight, bias, needs)
    loss = torch.zeros((), dtype=dt, device=hidden.device)
    parts = []
    for sl in _chunks(hidden, weight, opts):
        z = _dense.logits(hidden[sl], weight, bias, opts, dt)
        st, lse_lo = _dense.row_stats(z, safe[sl], valid[sl])
        tok_loss, coefs = loss_coefficients(st, valid[sl], terms.rows(sl))
        loss += tok_loss.sum()
        parts.append((st, lse_lo))
        if any(needs):
            acc.add(sl, _dense.logits_grad(z, st.lse, lse_lo, coefs, safe[sl], opts))
    return loss, _concat(parts)[0], *acc.result()
