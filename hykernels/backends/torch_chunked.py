"""Token-chunked PyTorch backend: any device, memory bounded by one logits tile.

fused_loss forms, per chunk of whole rows, the logits tile, its statistics, the §5 coefficients and
the gradient in the same pass (6·N·D·V FLOPs); token_stats and its backward recompute the tile
(8·N·D·V), over tiles of TILE_ROWS rows × a vocabulary slice. Beside the three GEMMs per tile, the
time goes where these choices put it (each measured on a 2-core AVX-512 CPU against torch's own
chunked ``F.linear_cross_entropy``; bench/results/*-cpu-torch.json has the run):

- **Vocabulary-major tile.** The tile is zᵀ [V, rows] = W·Hᵀ, and the gradient GEMMs read it as
  dH = (Gᵀ)ᵀ·W and dW += Gᵀ·H. At ~128 rows MKL runs W·Hᵀ ~20% faster than H·Wᵀ (torch's layout),
  but only at a multiple of 8 rows (ROW_ALIGN: ~40% slower at 116 or 124).
- **One tile buffer per call,** reused by every chunk: a fresh tile per chunk costs page faults and
  the kernel's zero-fill on CPU. The elementwise work streams the tile in blocks of about
  BLOCK_ELEMENTS entries, so its temporaries stay in cache.
- **Few elementwise passes.** The max and the first argmax come from block maxima (torch.max with
  indices costs as much as exp); Σ(z − m), Σe^{z−m} and Σ(z − m)·e^{z−m} are gathered in the pass
  that forms the exponentials. Without an entropy term and a softcap (cross-entropy, GRPO) that
  pass leaves e^{z−m} in the tile and the gradient is one scaling; otherwise the gradient pass
  forms the exponentials again. Temperature is folded into the fp32 rows or the coefficients.
- **Tiles that keep the GEMMs near peak.** A chunk of few whole rows makes thin GEMMs and a
  read-modify-write of dW per chunk: token_stats and its backward take 1024 rows by a vocabulary
  slice instead, and fused_loss recomputes (statistics, then the backward: 8·N·D·V) when fewer
  than FUSED_MIN_ROWS whole rows fit, as at V=151936 with N=2048.
- **Half precision.** The logits GEMM runs in fp32 (never rounded to bf16: docs/math.md §1): on
  CUDA as ``torch.mm(out_dtype=fp32)``, elsewhere on an fp32 copy of W made once per call (as
  torch's chunked CE does on CPU). The gradient GEMMs run in bf16 where the device has fast bf16
  dots (CUDA; CPUs with AVX512-BF16 or AMX: ~2.3× fp32 there), else in fp32; fp16 runs them in
  fp16 on CUDA (tiles scaled by a power of two, _grad.fp16_grad_scale) and in fp32 on CPU.

Memory beyond inputs and outputs: the tile within ``workspace_bytes`` = 2·N·D bytes (half the
hidden states in fp32: the workspace torch's chunked linear_cross_entropy takes by default),
clamped to [MIN_TILE_BYTES, TILE_BYTES], at 4 bytes per entry (8 for fp64, 6 when a bf16 copy of
the gradient feeds bf16 GEMMs); TEMP_BLOCKS elementwise temporaries of BLOCK_ELEMENTS entries
(≤ 1.5 MiB); for half inputs off CUDA the fp32 copy of W (V·D·4, as torch's); an fp32 dW
accumulator where the gradient GEMMs are fp32 for half weights or the weights are fp16 (bf16 dW
is accumulated in place, one rounding per chunk, as torch's chunked CE, Liger and the cuda and
triton backends do; ``HYKERNELS_FP32_ACCUMULATE=1`` keeps an fp32 one); with several vocabulary
slices and a half dH, an fp32 dH accumulator of one chunk; fp32 db.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._checks import target_mask
from .._grad import FP32_ACCUMULATE, fp16_grad_scale, loss_by_recompute, loss_coefficients
from .._partials import Partials, combine, finish
from .._types import LogitOptions, LossTerms, RowCoefs, TokenStats
from . import _dense
from ._segments import prg_scores, segment_sum  # noqa: F401  (segment ops: the shared torch implementation)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAME = "torch_chunked"
TILE_BYTES = 64 * 2**20  # the most workspace a call takes by default
MIN_TILE_BYTES = 4 * 2**20  # below this, per-chunk overhead (a few dozen ops) outweighs the GEMMs
TILE_ROWS = 1024  # rows of a tile when whole rows do not fit: GEMMs of 1024 × a few thousand run near peak
SLICE_ALIGN = 64  # vocabulary slices are a multiple of this many entries
FUSED_MIN_ROWS = 64  # fewer whole rows per chunk than this: fused_loss recomputes (see fused_loss)
BLOCK_ELEMENTS = 2**17  # tile entries per elementwise step (512 KiB of fp32 temporaries: in cache)
TEMP_BLOCKS = 3  # such temporaries alive at once, beside the tile: at most 1.5 MiB (fp32)
ROW_ALIGN = 8  # whole-row chunks are a multiple of 8 rows: MKL runs W·Hᵀ ~40% slower at 116 or 124 than at 120 or 128
ARG_BLOCK = 64  # vocabulary rows per block of the blockwise max (argmax = first maximum)
_HALF = (torch.float16, torch.bfloat16)


def availability(device: torch.device) -> Optional[str]:
    return None


def workspace_bytes(n: int, dim: int) -> int:
    """The tile budget of a call with ``n`` rows of ``dim`` features: 2·n·dim bytes (half the
    hidden states in fp32, torch's chunked linear_cross_entropy's default), within
    [MIN_TILE_BYTES, TILE_BYTES]."""
    return max(MIN_TILE_BYTES, min(TILE_BYTES, 2 * n * dim))


def chunk_rows(n: int, vocab: int, dim: int, opts: LogitOptions, entry_bytes: int = 4) -> int:
    """Rows of whole vocabulary rows per chunk: ``opts.chunk_size`` if given, else as many as fit
    ``workspace_bytes`` at ``entry_bytes`` per tile entry, a multiple of ROW_ALIGN when more than
    ROW_ALIGN fit (at least 1, at most n)."""
    if opts.chunk_size is not None:
        return max(1, min(n, opts.chunk_size))
    rows = workspace_bytes(n, dim) // (vocab * entry_bytes)
    if rows >= n:
        return max(1, n)
    return max(1, rows // ROW_ALIGN * ROW_ALIGN if rows >= ROW_ALIGN else rows)


def plan(n: int, vocab: int, dim: int, opts: LogitOptions, entry_bytes: int = 4,
         whole_rows: bool = False) -> tuple[int, int]:
    """(rows per chunk, vocabulary entries per slice) of the tiles. Whole rows (one slice) when
    ``whole_rows`` (fused_loss's 6·N·D·V pass needs each row's lse before its gradient), when
    ``opts.chunk_size`` is given, or when at least min(n, TILE_ROWS) whole rows fit the budget;
    otherwise TILE_ROWS rows by as many vocabulary entries as fit (a multiple of SLICE_ALIGN):
    GEMMs of 1024 × a few thousand run near MKL's peak, where a chunk of ~128 whole rows does not."""
    rows = chunk_rows(n, vocab, dim, opts, entry_bytes)
    if whole_rows or opts.chunk_size is not None or rows >= min(n, TILE_ROWS):
        return rows, vocab
    rows = min(n, TILE_ROWS)
    cols = workspace_bytes(n, dim) // (rows * entry_bytes) // SLICE_ALIGN * SLICE_ALIGN
    return rows, max(SLICE_ALIGN, min(vocab, cols))


@functools.lru_cache(maxsize=None)
def _cpu_bf16_dots() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX): oneDNN's bf16 GEMMs
    are then ~2.3× fp32's; without them they are emulated, several times slower than fp32."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _fast_half_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GEMMs in ``dtype`` (bf16/fp16) are fast on ``device``: CUDA, or bf16 on a CPU with
    native bf16 dots."""
    return device.type == "cuda" or (dtype == torch.bfloat16 and device.type == "cpu" and _cpu_bf16_dots())


class _Call:
    """Per-call constants and buffers: the operands in the dtypes the GEMMs take, the targets,
    the tile plan (rows × vocabulary slice) and the one tile buffer every tile reuses."""

    def __init__(self, hidden, weight, bias, targets, opts: LogitOptions, grad_gemms: bool = False,
                 whole_rows: bool = False):
        self.opts, self.dtype, self.device = opts, hidden.dtype, hidden.device
        self.n, self.dim = hidden.shape
        self.vocab = weight.shape[0]
        self.acc = _dense.stat_dtype(hidden.dtype)  # fp32, fp64 for fp64
        self.h, self.w = hidden, weight
        self.valid, self.safe = target_mask(targets, self.vocab, opts.ignore_index)
        half = hidden.dtype in _HALF
        # The logits GEMM: fp32 output from half operands (CUDA), else on fp32 (fp64) operands.
        self.out_dtype_gemm = half and hidden.is_cuda and _dense.fp32_output_gemm_error(hidden.device) is None
        self.w_logits = weight if (self.out_dtype_gemm or weight.dtype == self.acc) else weight.to(self.acc)
        # The gradient GEMMs: in the half dtype where the device has fast half dots, else in acc.
        self.grad_dtype = hidden.dtype if (half and _fast_half_gemms(hidden.device, hidden.dtype)) else self.acc
        self.w_grad = weight if self.grad_dtype == weight.dtype else self.w_logits
        self.bias = None if bias is None else bias.to(self.acc)
        self.bias_dtype = None if bias is None else bias.dtype
        self.inv_temp = 1.0 / opts.temperature
        narrow = grad_gemms and self.grad_dtype != self.acc  # a half copy of each gradient tile
        entry = torch.finfo(self.acc).bits // 8 + (torch.finfo(self.grad_dtype).bits // 8 if narrow else 0)
        self.rows, self.cols = plan(self.n, self.vocab, self.dim, opts, entry, whole_rows)
        tile = min(self.rows, self.n) * self.cols
        self.buf = torch.empty(tile, dtype=self.acc, device=self.device)
        self.gbuf = torch.empty(tile, dtype=self.grad_dtype, device=self.device) if narrow else None

    def chunks(self):
        return [slice(r, min(r + self.rows, self.n)) for r in range(0, self.n, self.rows)]

    def slices(self):
        return [slice(v, min(v + self.cols, self.vocab)) for v in range(0, self.vocab, self.cols)]

    def logits(self, sl: slice, vs: slice) -> torch.Tensor:
        """The tile zᵀ [|vs|, |sl|] = s(W[vs]·H[sl]ᵀ + b[vs])/τ in the accumulation dtype."""
        c, width = sl.stop - sl.start, vs.stop - vs.start
        zt = self.buf[: width * c].view(width, c)
        h = self.h[sl]
        softcap = self.opts.softcap
        # Without a softcap the temperature scales the chunk's fp32 rows, (H/τ)·Wᵀ + b/τ: rows·D
        # multiplies instead of V·rows. Half rows that the GEMM takes as they are (CUDA) would be
        # rounded by it: there the tile is scaled.
        fold = softcap is None and self.inv_temp != 1.0 and not self.out_dtype_gemm
        if self.out_dtype_gemm:
            torch.mm(self.w_logits[vs], h.T, out_dtype=self.acc, out=zt)
        else:
            h = h.to(self.acc)
            torch.mm(self.w_logits[vs], (h * self.inv_temp if fold else h).T, out=zt)
        if self.bias is not None:
            zt += (self.bias[vs] * self.inv_temp if fold else self.bias[vs])[:, None]
        if softcap is not None:  # c·tanh(x/c)/τ, the two scalings folded into one multiply
            zt.div_(softcap).tanh_().mul_(softcap * self.inv_temp)
        elif self.inv_temp != 1.0 and not fold:
            zt *= self.inv_temp
        return zt

    def targets(self, sl: slice, vs: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, rows] safe to index the slice's tile with, rows whose target is in the slice)."""
        y = self.safe[sl]
        here = self.valid[sl] & (y >= vs.start) & (y < vs.stop)
        return torch.where(here, y - vs.start, torch.zeros_like(y))[None, :], here


def _blocks(zt: torch.Tensor):
    """Row slices of the tile zt [width, c] of about BLOCK_ELEMENTS entries each."""
    width, c = zt.shape
    step = max(1, BLOCK_ELEMENTS // max(c, 1))
    return [slice(v, min(v + step, width)) for v in range(0, width, step)]


def _column_max(zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, first argmax) of each column of zt [V, c], as torch.max(zt, 0) gives them: from the
    maxima of blocks of ARG_BLOCK rows (one streaming reduction, ~10× cheaper than torch.max with
    indices over the tile), then the first maximum inside the first block that holds it. A NaN is
    the maximum (its index is returned), as in torch.max."""
    vocab, c = zt.shape
    full = vocab // ARG_BLOCK * ARG_BLOCK
    parts = [zt[:full].view(-1, ARG_BLOCK, c).amax(1)] if full else []
    if full < vocab:
        parts.append(zt[full:].amax(0, keepdim=True))
    block_max = torch.cat(parts) if len(parts) > 1 else parts[0]
    m, block = block_max.max(0)  # the first block holding the column's maximum
    rows = (block * ARG_BLOCK)[None, :] + torch.arange(ARG_BLOCK, device=zt.device)[:, None]
    vals = zt.gather(0, rows.clamp_(max=vocab - 1))
    hit = (vals == m[None, :]) | vals.isnan()
    first = hit.to(torch.uint8).argmax(0)  # the first maximum of the block (argmax takes the first)
    return m, block * ARG_BLOCK + first


def _partials(zt: torch.Tensor, ys: torch.Tensor, here: torch.Tensor, v0: int, keep_exp: bool) -> Partials:
    """The online-softmax partials (hykernels/_partials.py) of each column of the tile zt [width, c]
    (column j = row j of the chunk, rows = vocabulary entries v0 ...; ys [1, c] the targets' rows in
    the tile where ``here``). Leaves zt = z − m, or e^{z−m} with ``keep_exp``. A column of −inf
    entries has m = −inf and is shifted by 0 (s = t = 0), as _dense.row_partials; a −inf entry
    contributes exactly nothing to s and t (never −inf·0)."""
    vocab = zt.shape[0]
    m, argmax = _column_max(zt)
    argmax += v0
    zy = torch.where(here, zt.gather(0, ys)[0], torch.zeros_like(m))
    zt -= torch.where(m == float("-inf"), 0.0, m)[None, :]
    u = zt.sum(0)
    s, t = torch.zeros_like(m), torch.zeros_like(m)
    masked = bool(torch.isinf(u).any())  # some entry is −inf: guard its e·(z − m) = 0·(−inf)
    for blk in _blocks(zt):
        x = zt[blk]
        e = torch.exp(x)
        s += e.sum(0)
        xe = x * e
        if masked:
            xe.masked_fill_(e == 0, 0.0)
        t += xe.sum(0)
        if keep_exp:
            x.copy_(e)
    count = torch.full((1, 1), vocab, dtype=zt.dtype, device=zt.device)
    return Partials(m[None], s[None], t[None], u[None], zy[None], argmax[None], count)


def _softcap_slope(z: torch.Tensor, opts: LogitOptions) -> torch.Tensor:
    """s′(x) = 1 − tanh²(x/c) from the final logit z = c·tanh(x/c)/τ: 1 − (τ·z/c)²."""
    return 1.0 - (z * (opts.temperature / opts.softcap)).square_()


def _gradient(zt, ys, here, coefs: RowCoefs, opts: LogitOptions, shift, lo=None, shifted_by=None) -> torch.Tensor:
    """Overwrite the tile with Gᵀ = (dL/dz ∘ s′)/τ (docs/math.md §2): dL/dz_v = p_v·(A + B·log p_v) +
    C·[v = y] + D with log p = (zt − shift) − lo, where zt holds z − ``shifted_by`` (the fused pass)
    or z itself (``shifted_by`` None: recomputed); the C term lands on the columns whose target is
    in this tile (``here``, at rows ``ys``). 1/τ is folded into the coefficients; a coefficient
    that is zero on every row costs no pass."""
    A, B, C, D = _scaled(coefs, opts)
    C = None if C is None else torch.where(here[None, :], C, 0.0)
    target_slope = None
    if opts.softcap is not None and C is not None:  # s′ at the target, before the tile is overwritten
        z_y = zt.gather(0, ys)[0]
        target_slope = _softcap_slope(z_y if shifted_by is None else z_y + shifted_by, opts)
    for blk in _blocks(zt):
        x = zt[blk]
        logp = x - shift[None, :]
        if lo is not None:
            logp -= lo[None, :]
        p = torch.exp(logp)
        if B is not None:  # p·(A + B·log p), 0 where p = 0 (a −inf logit: never −inf·0)
            g = logp.mul_(B)
            if A is not None:
                g += A
            g.mul_(p).masked_fill_(p == 0, 0.0)
        else:
            g = p.mul_(A) if A is not None else p.zero_()
        if D is not None:
            g += D
        if opts.softcap is not None:
            g *= _softcap_slope(x if shifted_by is None else x + shifted_by[None, :], opts)
        x.copy_(g)
    if C is not None:
        zt.scatter_add_(0, ys, C if target_slope is None else C * target_slope[None, :])
    return zt


def _gradient_from_exp(zt, ys, coefs: RowCoefs, opts: LogitOptions, s) -> torch.Tensor:
    """The same gradient when the tile holds e^{z−m} (_partials with keep_exp) and there is no
    entropy term (B = 0) and no softcap: Gᵀ = e·A/(τ·s) + D/τ, + C/τ at the targets. One pass."""
    A, B, C, D = _scaled(coefs, opts)
    assert B is None and opts.softcap is None, "keep_exp is only taken without entropy term and softcap"
    zt *= (A / s[None, :]) if A is not None else 0.0
    if D is not None:
        zt += D
    if C is not None:
        zt.scatter_add_(0, ys, C)
    return zt


def _scaled(coefs: RowCoefs, opts: LogitOptions):
    """The coefficients as [1, c] rows divided by τ, None where zero on every row (one host sync
    each: a skipped pass over the tile is worth far more)."""
    inv_temp = 1.0 / opts.temperature
    return tuple((x * inv_temp)[None, :] if bool((x != 0).any()) else None for x in coefs)


class _Grads:
    """dH summed over a chunk's vocabulary slices (one slice: straight into the gradient
    returned), dW and db over chunks."""

    def __init__(self, x: _Call, needs):
        self.x = x
        self.fp16_scaled = x.grad_dtype == torch.float16  # fp16 GEMMs (CUDA): scale the tile (range)
        self.dh = torch.empty_like(x.h) if needs[0] else None
        sliced = len(x.slices()) > 1
        # dH over several slices: an fp32 (fp64) accumulator of one chunk unless dH is that dtype
        self.dh_acc = (torch.empty(min(x.rows, x.n), x.dim, dtype=x.acc, device=x.device)
                       if needs[0] and sliced and x.dtype != x.acc else None)
        dw_acc = x.grad_dtype != x.w.dtype or x.w.dtype == torch.float16 or (
            x.w.dtype == torch.bfloat16 and FP32_ACCUMULATE)
        self.dw = None
        if needs[1]:
            self.dw = (torch.zeros(x.w.shape, dtype=x.acc, device=x.device) if dw_acc else
                       torch.zeros_like(x.w))
        self.db = torch.zeros(x.vocab, dtype=x.acc, device=x.device) if (
            x.bias is not None and needs[2]) else None

    def add(self, sl: slice, vs: slice, gt: torch.Tensor) -> None:
        """Add the gradient tile Gᵀ [|vs|, |sl|] (accumulation dtype) of rows ``sl`` and
        vocabulary slice ``vs`` (slices of a chunk come in order, the first at 0)."""
        x = self.x
        first, last = vs.start == 0, vs.stop == x.vocab
        if self.db is not None:
            self.db[vs] += gt.sum(1)
        g, scale = gt, 1.0
        if x.gbuf is not None:  # the GEMMs run in the half dtype: narrow the tile once
            if self.fp16_scaled:
                scale = fp16_grad_scale(gt.abs().max())
                if scale != 1.0:
                    gt *= scale
            g = x.gbuf[: gt.numel()].view(gt.shape)
            g.copy_(gt)
        h = x.h[sl]
        if self.dh is not None:
            self._add_dh(sl, g, gt, x.w_grad[vs], scale, first, last)
        if self.dw is not None:
            dw = self.dw[vs]
            if dw.dtype == g.dtype:  # fp32/fp64, or bf16 accumulated in place
                dw.addmm_(g, h if h.dtype == g.dtype else h.to(g.dtype), alpha=1.0 / scale)
            elif x.out_dtype_gemm:  # half operands, fp32 accumulator (CUDA)
                torch.addmm(dw, g, h, alpha=1.0 / scale, out_dtype=dw.dtype, out=dw)
            else:  # an fp32 accumulator off CUDA: the fp32 GEMM of the fp32 tile
                dw.addmm_(gt, h.to(gt.dtype), alpha=1.0 / scale)

    def _add_dh(self, sl, g, gt, w, scale, first, last) -> None:
        dh = self.dh[sl]
        if self.dh_acc is None:  # dH itself accumulates (one slice, or dH in the accumulation dtype)
            if g.dtype != dh.dtype:  # fp32 GEMMs for a half dH (CPU without fast half dots)
                part = torch.mm(gt.T, w)
                dh.copy_(part) if first else dh.add_(part.to(dh.dtype))
            elif first:
                torch.mm(g.T, w, out=dh)
            else:
                dh.addmm_(g.T, w)
            if scale != 1.0:  # only with one slice: fp16 tiles scaled per tile
                dh /= scale
            return
        acc = self.dh_acc[: dh.shape[0]]
        part = torch.mm(g.T, w).to(acc.dtype)  # a half GEMM's output, or the fp32 one
        if scale != 1.0:
            part /= scale
        acc.copy_(part) if first else acc.add_(part)
        if last:
            dh.copy_(acc)

    def result(self):
        dw = None if self.dw is None else self.dw.to(self.x.w.dtype)
        db = None if self.db is None else self.db.to(self.x.bias_dtype)
        return self.dh, dw, db


def _tile_partials(x: _Call, sl: slice, keep_exp: bool = False):
    """The partials of rows ``sl`` over every vocabulary slice ([k, rows] fields), the tile of the
    last slice left as _partials leaves it."""
    parts = []
    for vs in x.slices():
        ys, here = x.targets(sl, vs)
        parts.append(_partials(x.logits(sl, vs), ys, here, vs.start, keep_exp))
    return Partials(*(torch.cat(f) for f in zip(*parts)))


def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    x = _Call(hidden, weight, bias, targets, opts)
    parts = [combine(_tile_partials(x, sl)) for sl in x.chunks()]
    *fields, counts = zip(*parts)
    return Partials(*(torch.cat(f, dim=1) for f in fields), counts[0])


def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    x = _Call(hidden, weight, bias, targets, opts)
    return _concat([finish(_tile_partials(x, sl), x.valid[sl], x.acc) for sl in x.chunks()])


def _concat(parts):
    """Join per-chunk (TokenStats, lse_lo) results."""
    stats, lse_lo = zip(*parts)
    return TokenStats(*(torch.cat(cols) for cols in zip(*stats))), torch.cat(lse_lo)


def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    """Per tile: the logits again, their gradient in place, then the two GEMMs (6·N·D·V)."""
    x = _Call(hidden, weight, bias, targets, opts, grad_gemms=True)
    grads = _Grads(x, needs)
    lse, lse_lo = lse.to(x.acc), lse_lo.to(x.acc)
    for sl in x.chunks():
        rows = coefs.rows(sl)
        for vs in x.slices():
            ys, here = x.targets(sl, vs)
            grads.add(sl, vs, _gradient(x.logits(sl, vs), ys, here, rows, opts, lse[sl], lse_lo[sl]))
    return grads.result()


def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    """Per chunk of whole rows: the tile, its statistics, the §5 coefficients (hykernels/_grad.py),
    the gradient in place and the two GEMMs: 6·N·D·V FLOPs, gradients formed in the forward pass.
    When fewer than FUSED_MIN_ROWS whole rows fit the workspace, GEMMs that thin run far below
    peak and dW's read-modify-write per chunk dominates: then the statistics over 2-D tiles, and
    the backward recomputing them (8·N·D·V, _grad.loss_by_recompute), is faster."""
    grad = any(needs)
    x = _Call(hidden, weight, bias, targets, opts, grad_gemms=grad, whole_rows=True)
    if x.rows < min(x.n, FUSED_MIN_ROWS) and opts.chunk_size is None:
        return loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms,
                                 needs, x.vocab)
    grads = _Grads(x, needs)
    # The tile keeps e^{z−m} through the statistics pass when the gradient needs nothing else
    # (no entropy term: B = 0; no softcap slope): then the gradient is one scaling of it.
    keep_exp = grad and terms.entropy_weight is None and opts.softcap is None
    loss = torch.zeros((), dtype=x.acc, device=x.device)
    parts = []
    whole = slice(0, x.vocab)
    for sl in x.chunks():
        zt = x.logits(sl, whole)
        ys, here = x.targets(sl, whole)
        p = _partials(zt, ys, here, 0, keep_exp)
        st, lse_lo = finish(p, x.valid[sl], x.acc)
        tok_loss, coefs = loss_coefficients(st, x.valid[sl], terms.rows(sl))
        loss += tok_loss.sum()
        parts.append((st, lse_lo))
        if grad:
            if keep_exp:
                gt = _gradient_from_exp(zt, ys, coefs, opts, p.s[0])
            else:  # zt holds z − m: log p = (z − m) − log s
                shift = torch.where(p.m[0] == float("-inf"), 0.0, p.m[0])
                gt = _gradient(zt, ys, here, coefs, opts, torch.log(p.s[0]), shifted_by=shift)
            grads.add(sl, whole, gt)
    return loss, _concat(parts)[0], *grads.result()
