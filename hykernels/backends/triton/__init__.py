"""Triton backend: the lm_head as Triton GEMMs with fused epilogues; no [N, V] logits in memory.

Passes (kernels named after them, one module each, CCE-style; tiles and autotuning in
_configs.py, shared pieces in _tiles.py):

- statistics (``_logits_fwd.logits_fwd``): logits GEMM with an online-softmax epilogue, per
  vocabulary split; the host merges the splits (hykernels/_partials.py).
- gradient tile (``_logits_grad``): §2's dL/dz for a chunk of rows, written to a bounded chunk
  workspace in the operands' dtype, either in place over the chunk's kept logits
  (``grad_inplace``) or by recomputing them (``logits_grad``).
- gradient GEMMs (``_grad_gemm``): dH = G·W and dW (+)= Gᵀ·H, each program owning its output tile:
  no atomics, deterministic run to run.

Why this design: the previous backward recomputed each logits tile and added its partial
products into dH and dW with fp32 atomics at every K step (~1.6·10¹¹ atomics, ~640 GB of traffic
at N=16384, D=4096, V=151936), with the token index fastest so that all of dH and H was live.
Writing the gradient tile once and consuming it with two plain GEMMs makes every pass a GEMM
with a cheap epilogue, at the price of a workspace; the workspace is bounded by a budget and
the rows are processed in chunks, as Liger's fused linear cross-entropy and our cuda backend do.

fused_loss when a chunk of rows fits the workspace (WORKSPACE_BYTES, default 300 MiB,
``HYKERNELS_TRITON_WORKSPACE_MB``): per chunk, logits_fwd keeps the fp32 logits (4·rows·V bytes),
the host merges the statistics and forms the §5 coefficients (hykernels/_grad.py, O(rows)),
grad_inplace overwrites the logits with the gradient, then dh_gemm and dw_gemm: 6·N·D·V FLOPs.
Otherwise (a vocabulary so large that not even one row fits) and for token_stats with its
backward: statistics over all rows (no workspace), then per chunk logits_grad and the two GEMMs:
8·N·D·V FLOPs.

At N=16384, D=4096, V=151936 bf16 (the lmhead bench shape): chunks of 512 rows (297 MiB of fp32
logits; the bf16 gradient packed in place); per chunk 3 GEMMs of 0.64 TFLOP. Per pass and chunk,
in bytes from HBM: logits_fwd reads W once per group of row blocks (1.2 GB) and writes 311 MB of
logits; grad_inplace reads 311 MB and writes 156 MB; dh_gemm reads G (156 MB) and W (1.2 GB);
dw_gemm reads G and reads+writes dW (2.5 GB: its read-modify-write bounds it at this chunk
size). bench/roofline.py computes these numbers from the kernels' tiles and loop bounds.

Extra memory beyond the returned gradients: the workspace, O(N·splits) statistics, fp32 db; for
fp16 (and with HYKERNELS_FP32_ACCUMULATE=1 for bf16) an fp32 dW accumulator. fp16 gradient
tiles are scaled by a power of two per chunk (_grad.fp16_grad_scale), undone in the GEMMs' α.

Segment ops (answer-span sums, PRG) run the kernels of _segment_kernels.py, fp32 throughout.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..._checks import target_mask
from ..._grad import FP32_ACCUMULATE, fp16_grad_scale, grad_bound, loss_by_recompute, loss_coefficients
from ..._partials import Partials, finish, slice_counts
from ..._types import PRG_VARIANTS, LogitOptions, LossTerms, RowCoefs, TokenStats
from . import _configs
from ._configs import Blocks, interpreting  # noqa: F401  (Blocks: for _configs.OVERRIDE)

NAME = "triton"
# fp32 accumulation throughout: fp64 inputs would silently lose precision, so they are refused.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WORKSPACE_BYTES = int(os.environ.get("HYKERNELS_TRITON_WORKSPACE_MB", "300")) * 2**20
ROW_ALIGN = 64  # chunks are a multiple of this many rows when the budget allows: whole row blocks
PAD = 8  # workspace rows are padded to a multiple of this many entries: 16-byte aligned rows (TMA)
# grad_inplace is memory-bound: a row per program (many programs in flight), wide column blocks
GRAD_INPLACE = Blocks(m=1, n=4096, k=0, num_warps=8)


def grad_inplace_blocks(explicit: Optional[Blocks]) -> Blocks:
    """The Blocks grad_inplace runs at: GRAD_INPLACE, or an explicit Blocks' m rows × n columns
    with at most GRAD_INPLACE's warps (an elementwise pass; at 16 warps, a 16×256 block spilled
    4 B at triton 3.4). tests/compile_triton.py compiles what this returns."""
    if explicit is None:
        return GRAD_INPLACE
    return Blocks(m=explicit.m, n=explicit.n, k=0, num_warps=min(explicit.num_warps, GRAD_INPLACE.num_warps))


def availability(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None  # the Triton interpreter: for tests, ~1000× slower than a GPU
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import, for tests); got {device.type}"


def chunk_rows(n: int, vocab: int, opts: LogitOptions, entry_bytes: int, budget: Optional[int] = None) -> int:
    """Rows per chunk whose workspace of ``entry_bytes`` per padded vocabulary entry fits
    ``budget`` (default WORKSPACE_BYTES; ``opts.chunk_size`` if given); 0 if not even one row fits."""
    budget = WORKSPACE_BYTES if budget is None else budget
    if opts.chunk_size is not None:
        rows = min(n, opts.chunk_size)
        return rows if rows * _padded(vocab) * entry_bytes <= budget else 0
    rows = budget // (_padded(vocab) * entry_bytes)
    return min(n, rows // ROW_ALIGN * ROW_ALIGN if rows >= ROW_ALIGN else rows)


def _padded(vocab: int) -> int:
    return math.ceil(vocab / PAD) * PAD


def split_plan(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(split width, splits) of logits_fwd's vocabulary: enough programs to fill the device
    (assuming 128-row blocks), widths a multiple of every candidate BLOCK_N."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    return split_for(rows, vocab, sms, _configs.explicit(device))


def split_for(rows: int, vocab: int, sms: Optional[int], explicit: Optional[Blocks] = None) -> tuple[int, int]:
    """split_plan on a GPU of ``sms`` multiprocessors (None: not a GPU) launching every kernel
    with ``explicit`` Blocks (None: autotuned); pure, for bench/roofline.py."""
    align = explicit.n if explicit is not None else _configs.SPLIT_ALIGN
    if explicit is not None and explicit.splits is not None:
        want = explicit.splits
    elif sms is not None:
        want = math.ceil(2 * sms / math.ceil(max(rows, 1) / 128))
    else:
        want = 1
    width = math.ceil(math.ceil(vocab / max(want, 1)) / align) * align
    return width, math.ceil(vocab / width)


class _Call:
    """Per-call constants: contiguous operands, targets with −1 for 'none', the kernels' flags."""

    def __init__(self, hidden, weight, bias, targets, opts: LogitOptions):
        self.h, self.w, self.bias, self.opts = hidden.contiguous(), weight.contiguous(), bias, opts
        self.n, self.dim = hidden.shape
        self.vocab = weight.shape[0]
        self.valid, _ = target_mask(targets, self.vocab, opts.ignore_index)
        self.y = torch.where(self.valid, targets, torch.full_like(targets, -1)).contiguous()
        self.dtype, self.device = hidden.dtype, hidden.device
        self.logit_args = dict(inv_temp=1.0 / opts.temperature, softcap=opts.softcap or 1.0)
        self.flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None)
        self.dot = dict(UPCAST=interpreting(), IEEE=self.dtype == torch.float32)

    def chunks(self, rows: int):
        return [slice(r, min(r + rows, self.n)) for r in range(0, self.n, max(rows, 1))]

    def launch(self, kernel: str, fn, *args, **kwargs):
        """Launch a tiled kernel, one program per output tile (_configs.grid)."""
        return _configs.launch(kernel, fn, self.dtype, self.device, *args, **kwargs, **self.dot)

    def partials(self, sl: slice, z: Optional[torch.Tensor] = None) -> Partials:
        """Online-softmax partials of rows ``sl`` per vocabulary split; with ``z`` (a [rows, Vp]
        fp32 workspace) the logits are kept there."""
        from ._logits_fwd import logits_fwd

        rows = sl.stop - sl.start
        width, splits = split_plan(rows, self.vocab, self.device)
        f32 = dict(dtype=torch.float32, device=self.device)
        m, s, t, u, zy = (torch.empty(splits, rows, **f32) for _ in range(5))
        am = torch.empty(splits, rows, dtype=torch.int32, device=self.device)
        h = self.h[sl]
        kept = None if z is None else z[:, :self.vocab]  # with descriptors: a TMA store, clipped at V
        tma = _configs.use_descriptors(h, self.w, *(() if kept is None else (kept,)))
        _configs.launch("logits_fwd", logits_fwd, self.dtype, self.device, _configs.operand(h, tma),
                        _configs.operand(self.w, tma), self.bias, self.y[sl],
                        None if kept is None else _configs.operand(kept, tma), m, s, t, u, zy, am, rows,
                        self.vocab, self.dim, self.dim, self.dim,
                        0 if z is None else z.stride(0), split_width=width, num_splits=splits,
                        STORE_Z=z is not None, TMA=tma, **self.logit_args, **self.flags, **self.dot)
        return Partials(m, s, t, u, zy, am.long(), slice_counts(self.vocab, width, m))

    def grad_scale(self, coefs: RowCoefs) -> float:
        """S of _grad.fp16_grad_scale for fp16 gradient tiles (1 otherwise): one host sync."""
        if self.dtype != torch.float16:
            return 1.0
        return fp16_grad_scale(grad_bound(coefs, self.logit_args["inv_temp"]))

    @staticmethod
    def row_args(lse, lse_lo, coefs: RowCoefs, scale: float):
        return (lse.float().contiguous(), lse_lo.float().contiguous(),
                *(c.to(torch.float32).mul(scale).contiguous() for c in coefs))


class _Grads:
    """dH written per chunk straight into the gradient returned (each chunk's rows are complete
    after one dh_gemm); dW summed over chunks by dw_gemm (the first chunk overwrites, so no
    zero fill), in the weight's dtype for bf16/fp32, in fp32 for fp16 or FP32_ACCUMULATE; db in
    fp32 by a torch column sum of the gradient tile."""

    def __init__(self, x: _Call, weight, bias, needs):
        self.x, self.weight, self.bias = x, weight, bias
        self.dh = torch.empty_like(x.h) if needs[0] else None
        dw_fp32 = weight.dtype != torch.float32 and (FP32_ACCUMULATE or weight.dtype == torch.float16)
        self.dw = torch.empty(weight.shape, dtype=torch.float32 if dw_fp32 else weight.dtype,
                              device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (
            bias is not None and needs[2]) else None
        self.first = True

    def add(self, g: torch.Tensor, sl: slice, scale: float) -> None:
        """Add the gradient tile S·G (``scale`` = S; [rows of sl, V]) of rows ``sl``."""
        from ._grad_gemm import dh_gemm, dw_gemm

        x, alpha, rows = self.x, 1.0 / scale, sl.stop - sl.start
        h = x.h[sl]
        if self.dh is not None:
            dh = self.dh[sl]
            tma = _configs.use_descriptors(g, x.w, dh)
            x.launch("dh_gemm", dh_gemm, *(_configs.operand(t, tma) for t in (g, x.w, dh)),
                     rows, x.vocab, x.dim, g.stride(0), x.w.stride(0), dh.stride(0), alpha, TMA=tma)
        if self.dw is not None:
            tma = _configs.use_descriptors(g, h, self.dw)
            x.launch("dw_gemm", dw_gemm, *(_configs.operand(t, tma) for t in (g, h, self.dw)),
                     rows, x.vocab, x.dim, g.stride(0), h.stride(0), self.dw.stride(0), alpha,
                     BETA=not self.first, TMA=tma)
        if self.db is not None:
            self.db.add_(g.sum(0, dtype=torch.float32), alpha=alpha)
        self.first = False

    def result(self):
        if self.first and self.dw is not None:  # no rows: nothing overwrote dW
            self.dw.zero_()
        dw = None if self.dw is None else self.dw.to(self.weight.dtype)
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return self.dh, dw, db


def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    """Online-softmax partials of each vocabulary split (hykernels/_partials.py), all rows at once."""
    x = _Call(hidden, weight, bias, targets, opts)
    return x.partials(slice(0, x.n))


def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    x = _Call(hidden, weight, bias, targets, opts)
    return finish(x.partials(slice(0, x.n)), x.valid, torch.float32)


def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    """Per chunk: logits_grad writes the gradient tile (operands' dtype), then the two GEMMs."""
    from ._logits_grad import logits_grad

    x = _Call(hidden, weight, bias, targets, opts)
    grads = _Grads(x, weight, bias, needs)
    rows = opts.chunk_size or max(1, chunk_rows(x.n, x.vocab, opts, hidden.element_size()))
    work = torch.empty(min(rows, x.n), _padded(x.vocab), dtype=x.dtype, device=x.device)
    for sl in x.chunks(rows):
        c = sl.stop - sl.start
        g, rows_coefs = work[:c, :x.vocab], coefs.rows(sl)
        scale = x.grad_scale(rows_coefs)
        h = x.h[sl]
        tma = _configs.use_descriptors(h, x.w, g)
        x.launch("logits_grad", logits_grad, _configs.operand(h, tma), _configs.operand(x.w, tma),
                 x.bias, x.y[sl], _configs.operand(g, tma), *x.row_args(lse[sl], lse_lo[sl], rows_coefs, scale),
                 c, x.vocab, x.dim, x.dim, x.dim, g.stride(0), TMA=tma, **x.logit_args, **x.flags)
        grads.add(g, sl, scale)
    return grads.result()


def _gradient_view(work: torch.Tensor, rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient grad_inplace packs at the start of each fp32 workspace row: [rows, vocab]
    of ``dtype`` (row stride 2·Vp for half precision)."""
    if dtype == torch.float32:
        return work[:rows, :vocab]
    return work[:rows].view(dtype)[:, :vocab]


def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    from ._logits_grad import grad_inplace

    x = _Call(hidden, weight, bias, targets, opts)
    rows = chunk_rows(x.n, x.vocab, opts, 4)
    if rows == 0:  # not even one row of fp32 logits fits the workspace: statistics, then recompute
        return loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms,
                                 needs, x.vocab)

    grads = _Grads(x, weight, bias, needs)
    f32 = dict(dtype=torch.float32, device=x.device)
    work = torch.empty(min(rows, x.n), _padded(x.vocab), **f32)
    out = TokenStats(*(torch.empty(x.n, **f32) for _ in range(4)), torch.empty(x.n, dtype=torch.int64,
                                                                            device=x.device),
                     torch.empty(x.n, **f32))
    chunks = x.chunks(rows)
    losses = torch.empty(len(chunks), **f32)
    for i, sl in enumerate(chunks):
        c = sl.stop - sl.start
        z = work[:c]
        stats, lse_lo = finish(x.partials(sl, z), x.valid[sl], torch.float32)
        tok_loss, coefs = loss_coefficients(stats, x.valid[sl], terms.rows(sl))
        torch.sum(tok_loss, 0, out=losses[i])
        for dst, src in zip(out, stats):
            dst[sl].copy_(src)
        if any(needs):
            scale = x.grad_scale(coefs)
            g = _gradient_view(work, c, x.vocab, x.dtype)
            b = grad_inplace_blocks(_configs.explicit(x.device))
            launch = dict(num_warps=b.num_warps) if x.device.type == "cuda" else {}
            grad_inplace[(math.ceil(c / b.m),)](
                z, g, x.y[sl], *x.row_args(stats.lse, lse_lo, coefs, scale), c, x.vocab, z.stride(0), g.stride(0),
                opts.temperature, x.logit_args["inv_temp"], x.logit_args["softcap"],
                HAS_SOFTCAP=x.flags["HAS_SOFTCAP"], BLOCK_R=b.m, BLOCK_V=b.n, UPCAST=x.dot["UPCAST"],
                **launch)
            grads.add(g, sl, scale)
    return losses.sum(), out, *grads.result()


SEGMENT_BLOCK = 1024  # values per segment_sum program
PRG_BLOCK = 16  # gains per step of a PRG program: K ≤ 16 by default (docs/math.md §3), one step
PRG_LAUNCH = dict(num_warps=1)  # a 16-lane block: more warps would idle


def segment_sum(values, segment_ids, num_segments):
    from ._segment_kernels import segment_sum_kernel

    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    rows = values.numel()
    segment_sum_kernel[(math.ceil(rows / SEGMENT_BLOCK),)](values.contiguous(), segment_ids.contiguous(), out,
                                                           rows, BLOCK=SEGMENT_BLOCK)
    return out


def prg_scores(support, probe_offsets, variant, eps, tau_g):
    from ._segment_kernels import prg_kernel

    traces = probe_offsets.numel() - 1
    f32 = dict(dtype=torch.float32, device=support.device)
    gains, scores = torch.empty(support.numel() - traces, **f32), torch.empty(traces, **f32)
    prg_kernel[(traces,)](support.contiguous(), probe_offsets.contiguous(), gains, scores, eps, tau_g,
                          VARIANT=PRG_VARIANTS.index(variant), BLOCK=PRG_BLOCK,
                          **(PRG_LAUNCH if support.device.type == "cuda" else {}))
    return gains, scores
