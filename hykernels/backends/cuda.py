"""cuda backend: cuBLAS GEMMs (through ATen) into a bounded fp32 workspace + CUDA epilogues.

Per token chunk, ``torch.mm`` writes the chunk's logits (fp32 output, input-dtype operands) into
a workspace tile; csrc/kernels/logit_epilogues.cu then reads the tile once for the row
statistics and once for the §2 gradient, which overwrites the tile in place (bf16/fp16 for
half-precision inputs) and feeds the next two GEMMs: dH = G·W and dW += Gᵀ·H.

- fused_loss, when a whole row's vocabulary fits the workspace: GEMM → statistics → §5
  coefficients (hykernels/_grad.py on [chunk] rows) → gradient in place → two GEMMs.
  6·N·D·V FLOPs, gradients formed in the forward pass.
- Otherwise (huge vocabularies or a small workspace) each chunk walks vocabulary slices:
  statistics merge across slices (hykernels/_partials.py) and the gradient pass recomputes each
  slice's logits, 8·N·D·V FLOPs, as token_stats + its backward always do.
- Chunks alternate between two CUDA streams (created once per device: each holds its own cuBLAS
  workspace) with half of one workspace each, so one chunk's epilogues overlap the next chunk's
  GEMM; updates of the shared dW/db are chained with events so they stay ordered.

Tile traffic. The epilogues move the tile in 16-byte vectors, so every row of a tile starts
16-byte aligned: the workspace's leading dimension is the slice width rounded up to a multiple of
4 (``_ld``; cuBLAS writes into that padded view in place, ldc = ld), and vocabulary slices start
at multiples of 4 columns, so the fp32 bias slice is aligned too. The transformed logits
z = s(x + b)/τ are stored back into the tile only when a gradient pass will read them
(fused_loss's single pass) and forming them again costs more than 8 bytes of traffic per logit:
with a softcap (a tanh and a division). With the identity transform the GEMM output already is z;
with a bias or τ ≠ 1 alone logit_grad applies them again to the raw tile (an add and a multiply).
Decided in ``_Inputs`` (``transforms``) and fused_loss, passed as logit_stats' ``write_back`` and
logit_grad's ``transformed`` ("the tile holds z").

HBM bytes per logit for the GEMM's fp32 output and the epilogues (``tile_bytes_per_logit``;
g = 2 for bf16/fp16 gradients, 4 for fp32; the operands H, W and the gradient GEMMs' reads of G
are not counted; the bias slice, read from L2 by every row, adds about 4/rows):

    case                                          before (scalar)   now
    fused_loss, identity transform, bf16          18                14   (4 + 4 + 4 + 2)
    fused_loss, identity transform, fp32          20                16
    fused_loss, bias and/or τ ≠ 1, bf16           18                14   (the transform applied twice)
    fused_loss, softcap, bf16                     18                18   (4 + 4 + 4 + 4 + 2)
    fused_loss, softcap, fp32                     20                20
    fused_loss, no gradient needed                12                8    (4 + 4)
    token_stats (statistics only)                 8                 8    (4 + 4)
    token_stats backward (recomputed tile), bf16  10                10   (4 + 4 + 2)
    fused_loss when a row does not fit, bf16      18                18   (two tiles: 8 + 10)

The vectorised epilogues do not change these counts (only how the bytes move: 16-byte loads,
several in flight per thread); the cut is the write-back skipped for the identity transform and
whenever no gradient pass follows. The kernels are compile-checked (tests/test_cuda.py: nvcc for
sm_80/sm_90a, 128-bit loads in their SASS, no local memory) and emulator-checked
(tests/cuda_emulator.py) only; nothing here has been run or timed on a GPU.

Memory beyond the returned gradients: the workspace (WORKSPACE_BYTES in all, default 768 MiB,
``HYKERNELS_CUDA_WORKSPACE_MB``), O(N) statistics, fp32 db, and nothing else for bf16/fp32 inputs:
dW accumulates straight into the gradient in the weight's dtype (cuBLAS accumulates each chunk's
GEMM in fp32 and rounds once per chunk, as Liger's fused linear CE does by default).
``HYKERNELS_FP32_ACCUMULATE=1`` accumulates dW in fp32 across chunks instead (V·D·4 bytes more,
one rounding at the end). fp16 always accumulates dH/dW in fp32 and scales its gradient tiles by a
power of two per chunk so small p·coefficient products do not flush to zero in fp16 (one host
sync per chunk; bf16 has fp32's exponent range and needs neither).
At N=16384, D=4096, V=151936 bf16 a chunk is 640 rows: every GEMM is 640×151936×4096 or its
transposes, 0.8 TFLOP each, large enough for cuBLAS to run at its peak rate.

The kernels are compiled on first use with ninja (torch.utils.cpp_extension.load, cached under
TORCH_EXTENSIONS_DIR), or ahead of time with ``HYKERNELS_BUILD_CUDA=1 pip install .``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch

from .._checks import target_mask
from .._grad import FP32_ACCUMULATE, fp16_grad_scale, grad_bound, loss_by_recompute, loss_coefficients
from .._partials import Partials, finish
from .._types import PRG_VARIANTS, LogitOptions, LossTerms, RowCoefs, TokenStats
from . import _dense

NAME = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 statistics: fp64 is refused
WORKSPACE_BYTES = int(os.environ.get("HYKERNELS_CUDA_WORKSPACE_MB", "768")) * 2**20
LANES = 2  # streams (and workspaces) in flight
ROW_ALIGN = 64  # token chunks are a multiple of this many rows: GEMM-friendly M
VEC = 4  # fp32 columns per 16-byte vector: the unit of the tile's leading dimension and slices
_GRAD_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc GradOut

_state: dict = {}  # "ext": the loaded module, or "error": why it could not be loaded


def _sources() -> Optional[Path]:
    """csrc/ of a source checkout, or the copy setup.py puts inside an installed package."""
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "csrc", here.parents[1] / "_csrc"):
        if (root / "hykernels_cuda.cpp").is_file():
            return root
    return None


def _build():
    try:  # built ahead of time by HYKERNELS_BUILD_CUDA=1 pip install .
        from hykernels import _cuda_ext

        return _cuda_ext
    except ImportError:
        pass
    src = _sources()
    if src is None:
        raise RuntimeError("the csrc/ sources are not part of this installation")
    from torch.utils.cpp_extension import load

    return load(name="hykernels_cuda", sources=[str(src / "hykernels_cuda.cpp"), *map(str, sorted(src.glob("kernels/*.cu")))],
                extra_include_paths=[str(src)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                verbose=os.environ.get("HYKERNELS_BUILD_VERBOSE") == "1")


def _ext():
    if "ext" not in _state and "error" not in _state:
        try:
            _state["ext"] = _build()
        except Exception as exc:  # a failed build makes the backend unavailable, with the reason
            _state["error"] = f"building the CUDA extension failed: {str(exc).strip()[-2000:]}"
    if "error" in _state:
        raise RuntimeError(_state["error"])
    return _state["ext"]


def availability(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend needs a CUDA device; got {device.type}"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "this torch build has no usable CUDA"
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    reason = _dense.fp32_output_gemm_error(device)
    if reason is not None:  # auto dispatch then falls back to the triton backend
        return f"the cuda backend needs {reason}"
    try:
        _ext()
    except RuntimeError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- chunk planning


def _ld(cols: int) -> int:
    """Leading dimension of a workspace tile ``cols`` wide: a multiple of VEC, so each row is 16-byte aligned."""
    return -(-cols // VEC) * VEC


def plan(n: int, vocab: int, opts: LogitOptions) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per slice) for one workspace of WORKSPACE_BYTES/LANES.

    rows·_ld(cols) fp32 fit the lane's workspace (at least VEC columns per row, however small it
    is); a slice narrower than the vocabulary is a multiple of VEC columns, so every slice starts
    16-byte aligned in the bias."""
    per_lane = WORKSPACE_BYTES // LANES // 4  # fp32 elements
    if opts.chunk_size is not None:
        rows = min(n, opts.chunk_size)
    else:
        rows = min(n, max(ROW_ALIGN, per_lane // _ld(vocab) // ROW_ALIGN * ROW_ALIGN))
    rows = max(rows, 1)
    fit = per_lane // rows
    cols = vocab if fit >= _ld(vocab) else min(vocab, max(VEC, fit // VEC * VEC))
    return rows, cols


def tile_bytes_per_logit(stats: bool, grad_bytes: int = 0, write_back: bool = False) -> int:
    """HBM bytes per logit of one workspace tile: cuBLAS writes it in fp32 (4), logit_stats reads
    it (4, when ``stats``) and stores the transformed logits back (4, when ``write_back``),
    logit_grad reads it (4) and writes the gradient (``grad_bytes``: 2 bf16/fp16, 4 fp32; 0 = no
    gradient pass). A call costs the sum over the tiles it materialises: fused_loss's single pass
    one tile (stats, gradient, write_back = a non-identity transform and a gradient follows);
    token_stats one (stats only); token_stats_backward one (gradient only); fused_loss when a row
    does not fit the workspace both of the latter. Not counted: H, W, the gradient GEMMs' reads of
    G, and the bias slice (read from L2 by each row, about 4/rows bytes per logit from HBM)."""
    return 4 + (4 + 4 * write_back if stats else 0) + (4 + grad_bytes if grad_bytes else 0)


_STREAMS: dict = {}  # device index -> the side streams, created once: each new stream would
#                     get a cuBLAS handle and workspace of its own


def _side_streams(device: torch.device) -> list:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = [torch.cuda.Stream(index) for _ in range(LANES)]
    return _STREAMS[index]


class _Lanes:
    """Round-robin CUDA streams, each with its share of one workspace; ``shared_begin``/``shared_end``
    bracket the updates of accumulators every lane adds into (dW, db), chaining them in chunk order."""

    def __init__(self, device: torch.device, elements: int, chunks: int):
        self.main = torch.cuda.current_stream(device)
        self.streams = _side_streams(device)[: min(LANES, chunks)]
        for s in self.streams:
            s.wait_stream(self.main)  # inputs were produced on the caller's stream
        workspace = torch.empty(elements * len(self.streams), dtype=torch.float32, device=device)
        self.work = list(workspace.split(elements))
        self.last: Optional[torch.cuda.Event] = None
        self.i = 0

    def next(self):
        lane = self.i % len(self.streams)
        self.i += 1
        return self.streams[lane], self.work[lane]

    def shared_begin(self, stream):
        if self.last is not None:
            stream.wait_event(self.last)

    def shared_end(self, stream):
        self.last = torch.cuda.Event()
        self.last.record(stream)

    def close(self):
        for s in self.streams:
            self.main.wait_stream(s)
        for w in self.work:  # the workspaces were used on side streams
            for s in self.streams:
                w.record_stream(s)


def _stream_id() -> int:
    return torch.cuda.current_stream().cuda_stream


def _tile(work: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] of the workspace with leading dimension _ld(cols): every row 16-byte aligned
    (the lane's workspace is). ATen hands such a row-major ``out`` to cuBLAS as it is (ldc = ld)."""
    ld = _ld(cols)
    return work[: rows * ld].view(rows, ld)[:, :cols]


def _narrow_view(tile: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient logit_grad packed at the start of each fp32 row: [rows, cols] of ``dtype``."""
    if dtype == torch.float32:
        return tile
    return tile.view(dtype)[:, : tile.shape[1]]  # leading dimension 2·ld


def _gemm_logits(tile, h, w):
    if h.dtype == torch.float32:
        torch.mm(h, w.T, out=tile)
    else:
        torch.mm(h, w.T, out_dtype=torch.float32, out=tile)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha·a·b into an fp32 ``acc`` (half-precision operands: fp32 output from cuBLAS)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, alpha=alpha)
    else:
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)


class _Inputs:
    """Per-call constants: contiguous operands, fp32 bias, targets with −1 for 'none'."""

    def __init__(self, hidden, weight, bias, targets, opts: LogitOptions):
        self.h, self.w = hidden.contiguous(), weight.contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        if self.bias is not None and self.bias.data_ptr() % 16:  # a view at an odd offset: the
            self.bias = self.bias.clone()  # vector epilogues want its slices 16-byte aligned
        self.valid, _ = target_mask(targets, weight.shape[0], opts.ignore_index)
        self.y = torch.where(self.valid, targets, torch.full_like(targets, -1)).contiguous()
        self.inv_temp, self.softcap = 1.0 / opts.temperature, float(opts.softcap or 0.0)
        # z = s(x + b)/τ differs from the GEMM output x: only then is it worth storing it back
        self.transforms = self.bias is not None or self.softcap > 0 or self.inv_temp != 1.0
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.rows, self.cols = plan(self.n, self.vocab, opts)
        self.ld = _ld(self.cols)  # a lane's workspace holds rows × ld fp32

    def chunks(self):
        return [slice(r, min(r + self.rows, self.n)) for r in range(0, self.n, self.rows)]

    def slices(self):
        return [slice(c, min(c + self.cols, self.vocab)) for c in range(0, self.vocab, self.cols)]

    def bias_slice(self, vs: slice):
        return None if self.bias is None else self.bias[vs]

    def stats(self, tile, sl, vs, write_back, out: Partials, j: int):
        """Statistics of rows ``sl`` into slice ``j`` of ``out``; ``write_back`` stores z into the tile."""
        _ext().logit_stats(tile, vs.start, self.bias_slice(vs), self.inv_temp, self.softcap, write_back,
                           self.y[sl], out.m[j, sl], out.s[j, sl], out.t[j, sl], out.u[j, sl], out.zy[j, sl],
                           out.argmax[j, sl], _stream_id())

    def grad(self, tile, sl, vs, transformed, lse, lse_lo, coefs: RowCoefs) -> tuple[torch.Tensor, float]:
        """(S·G, S): the gradient tile of rows ``sl`` (``lse``, ``lse_lo``, ``coefs``: those rows
        only) scaled by S, 1 except for fp16 (_grad.fp16_grad_scale). G is linear in the coefficients,
        so scaling them scales the tile. ``transformed``: the tile holds z (written back, or the
        GEMM output under the identity transform), else logit_grad applies the transform."""
        scale = fp16_grad_scale(grad_bound(coefs, self.inv_temp)) if self.h.dtype == torch.float16 else 1.0
        A, B, C, D = (c.float().mul(scale).contiguous() for c in coefs)
        _ext().logit_grad(tile, vs.start, self.bias_slice(vs), self.inv_temp, self.softcap, transformed, self.y[sl],
                          lse.float().contiguous(), lse_lo.float().contiguous(), A, B, C, D, _GRAD_OUT[self.h.dtype],
                          _stream_id())
        return _narrow_view(tile, self.h.dtype), scale


def _empty_partials(k: int, n: int, counts: list[int], device) -> Partials:
    f32 = dict(dtype=torch.float32, device=device)
    m, s, t, u, zy = (torch.empty(k, n, **f32) for _ in range(5))
    count = torch.tensor(counts, **f32)[:, None]
    return Partials(m, s, t, u, zy, torch.empty(k, n, dtype=torch.int64, device=device), count)


# --------------------------------------------------------------------------- the interface


def _on_device(fn):
    """Run ``fn`` with its first tensor's device current: kernels launch on the current device.
    (Off CUDA, only tests/cuda_emulator.py calls in, with the kernels emulated on the CPU.)"""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.device.type != "cuda":
            return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)

    return wrapper


@_on_device
def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    x = _Inputs(hidden, weight, bias, targets, opts)
    slices = x.slices()
    out = _empty_partials(len(slices), x.n, [vs.stop - vs.start for vs in slices], hidden.device)
    lanes = _Lanes(hidden.device, x.rows * x.ld, len(x.chunks()))
    for sl in x.chunks():
        stream, work = lanes.next()
        with torch.cuda.stream(stream):
            for j, vs in enumerate(slices):
                tile = _tile(work, sl.stop - sl.start, vs.stop - vs.start)
                _gemm_logits(tile, x.h[sl], x.w[vs])
                x.stats(tile, sl, vs, False, out, j)  # statistics only: z is never needed again
    lanes.close()
    return out


@_on_device
def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    valid, _ = target_mask(targets, weight.shape[0], opts.ignore_index)
    return finish(token_partials(hidden, weight, bias, targets, opts), valid, torch.float32)


class _Grads:
    """dH (per chunk rows: no sharing) and dW/db shared by every chunk.

    By default dH and dW are written straight into the gradients returned, in the inputs' dtype
    (for bf16 dW: fp32 accumulation inside each cuBLAS GEMM, one rounding per chunk); fp32
    accumulators (and one copy at the end) only where needed: dH when a row spans several
    vocabulary slices, dH and dW for fp16 (range), dW with FP32_ACCUMULATE; db is always fp32."""

    def __init__(self, x: _Inputs, weight, bias, needs):
        f32 = dict(dtype=torch.float32, device=x.h.device)
        fp16 = x.h.dtype == torch.float16
        self.x, self.weight, self.bias = x, weight, bias
        self.dh_fp32 = len(x.slices()) > 1 or fp16
        self.dw_fp32 = weight.dtype != torch.float32 and (FP32_ACCUMULATE or fp16)
        self.dh = self.dw = None
        if needs[0]:
            self.dh = torch.zeros(x.h.shape, **f32) if self.dh_fp32 else torch.empty_like(x.h)
        if needs[1]:
            self.dw = torch.zeros(weight.shape, dtype=torch.float32 if self.dw_fp32 else weight.dtype,
                                  device=weight.device)
        self.db = torch.zeros(weight.shape[0], **f32) if (bias is not None and needs[2]) else None

    def add(self, lanes: _Lanes, stream, g, scale: float, sl, vs):
        """Add the gradient tile S·G (``scale`` = S) of rows ``sl`` × columns ``vs``."""
        h, w, inv = self.x.h, self.x.w, 1.0 / scale
        if self.dh is not None:
            if self.dh_fp32:
                _addmm_fp32(self.dh[sl], g, w[vs], inv)
            else:  # S = 1 here
                torch.mm(g, w[vs], out=self.dh[sl])
        if self.dw is None and self.db is None:
            return
        lanes.shared_begin(stream)
        if self.dw is not None:
            if self.dw_fp32:
                _addmm_fp32(self.dw[vs], g.T, h[sl], inv)
            else:
                self.dw[vs].addmm_(g.T, h[sl])
        if self.db is not None:
            self.db[vs].add_(g.sum(0, dtype=torch.float32), alpha=inv)
        lanes.shared_end(stream)

    def result(self):
        dh = None if self.dh is None else self.dh.to(self.x.h.dtype)
        dw = None if self.dw is None else self.dw.to(self.weight.dtype)
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return dh, dw, db


@_on_device
def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    x = _Inputs(hidden, weight, bias, targets, opts)
    grads = _Grads(x, weight, bias, needs)
    lanes = _Lanes(hidden.device, x.rows * x.ld, len(x.chunks()))
    for sl in x.chunks():
        stream, work = lanes.next()
        with torch.cuda.stream(stream):
            for vs in x.slices():
                tile = _tile(work, sl.stop - sl.start, vs.stop - vs.start)
                _gemm_logits(tile, x.h[sl], x.w[vs])
                # a recomputed tile holds the GEMM output: z itself under the identity transform
                g, scale = x.grad(tile, sl, vs, not x.transforms, lse[sl], lse_lo[sl], coefs.rows(sl))
                grads.add(lanes, stream, g, scale, sl, vs)
    lanes.close()
    return grads.result()


@_on_device
def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    x = _Inputs(hidden, weight, bias, targets, opts)
    if len(x.slices()) > 1:  # a row does not fit the workspace: statistics, then recompute
        return loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms,
                                 needs, x.vocab)

    vs = slice(0, x.vocab)
    grads = _Grads(x, weight, bias, needs)
    part = _empty_partials(1, x.n, [x.vocab], hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    out = TokenStats(*(torch.empty(x.n, **f32) for _ in range(4)), torch.empty(x.n, dtype=torch.int64,
                                                                            device=hidden.device),
                     torch.empty(x.n, **f32))
    chunks = x.chunks()
    losses = torch.empty(len(chunks), **f32)
    # z goes back into the tile only when the gradient reads it and it costs more to form again:
    # a softcap (a tanh and a division per logit). A bias or τ ≠ 1 alone, logit_grad applies again
    # to the raw tile (an add and a multiply) instead of 4 more bytes per logit each way.
    write_back = x.softcap > 0 and any(needs)
    holds_z = write_back or not x.transforms  # what logit_grad finds in the tile
    lanes = _Lanes(hidden.device, x.rows * x.ld, len(x.chunks()))
    for i, sl in enumerate(chunks):
        stream, work = lanes.next()
        with torch.cuda.stream(stream):
            tile = _tile(work, sl.stop - sl.start, x.vocab)
            _gemm_logits(tile, x.h[sl], x.w)
            x.stats(tile, sl, vs, write_back, part, 0)
            rows = Partials(*(f[:, sl] for f in part[:6]), part.count)
            stats, lse_lo = finish(rows, x.valid[sl], torch.float32)
            tok_loss, coefs = loss_coefficients(stats, x.valid[sl], terms.rows(sl))
            torch.sum(tok_loss, 0, out=losses[i])
            for dst, src in zip(out, stats):
                dst[sl].copy_(src)
            if any(needs):
                g, scale = x.grad(tile, sl, vs, holds_z, stats.lse, lse_lo, coefs)
                grads.add(lanes, stream, g, scale, sl, vs)
    lanes.close()
    return losses.sum(), out, *grads.result()


@_on_device
def segment_sum(values, segment_ids, num_segments):
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    _ext().segment_sum(values.float().contiguous(), segment_ids.contiguous(), out, _stream_id())
    return out


@_on_device
def prg_scores(support, probe_offsets, variant, eps, tau_g):
    traces = probe_offsets.numel() - 1
    f32 = dict(dtype=torch.float32, device=support.device)
    gains, scores = torch.empty(support.numel() - traces, **f32), torch.empty(traces, **f32)
    _ext().prg_scores(support.float().contiguous(), probe_offsets.contiguous(), PRG_VARIANTS.index(variant), eps, tau_g,
                      gains, scores, _stream_id())
    return gains, scores
