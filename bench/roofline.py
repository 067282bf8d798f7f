#!/usr/bin/env python
"""A performance model of the lm_head training step: what each backend and peer should take on a GPU.

    python bench/roofline.py                                   # the lmhead preset's shapes: every model, bf16
    python bench/roofline.py --models 4096:151936 --n 16384    # one shape
    python bench/roofline.py --matmul-tflops 700 --l2-tbs 7    # other rates
    python bench/roofline.py --passes --ops fused_loss         # the triton backend's passes, one table per op
    python bench/roofline.py --json out.json

Everything here is a prediction: nothing in this file was measured on a GPU.

The rates (``Rates``; command-line flags in brackets)
  matmul     790 TFLOP/s bf16/fp16 [--matmul-tflops]: the dense bf16 rate reported for an H200 on an
             8192³ cuBLAS matmul of random data (not measured by this project). NVIDIA's datasheet says
             ~990 (DATASHEET_MATMUL_FLOPS): the earlier version of this model used it for every pass.
  fp32       67 TFLOP/s [--fp32-tflops]: fp32 inputs run IEEE FMA dots (no tensor cores); datasheet.
  vector     67 TFLOP/s [--vector-tflops]: epilogue arithmetic (exp, compares, FMAs); datasheet fp32.
  HBM        4.3 TB/s [--hbm-tbs]: a device-to-device copy reported on an H200 (datasheet 4.8 TB/s).
  L2         9.0 TB/s [--l2-tbs]: an ESTIMATE of the L2 → SM read rate of an H100/H200. NVIDIA gives
             5120 B/clk for the A100's L2 read bandwidth (A100 whitepaper) and publishes no Hopper
             figure; 5120 B/clk at Hopper's ~1.755 GHz is ~9.0 TB/s (the same figure as an H100 table
             of PMC10448217, Table 3: 8986 GB/s). A microbenchmark of an H100 PCIe (chipsandcheese,
             'Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023) saw less, power-limited. It is
             consistent with cuBLAS reaching ~790 TFLOP/s: 128×256 tiles with 2-CTA multicast fetch
             operands at 128 FLOP/B, i.e. ~6.2 TB/s of L2 at 790 TFLOP/s.

Per pass (one kernel, summed over its launches):
  compute  executed FLOPs (padded tiles: every program's every k step) / matmul rate, times the
           wave quantisation ⌈programs/slots⌉·slots/programs of a Triton grid (slots = SMs ×
           ⌊8/num_warps⌋: registers allow one 8-warp program per SM); library GEMMs (cuBLAS, CuTe)
           are assumed to fill the GPU.
  L2       operand traffic: per program and k step an m×k and an n×k operand tile, (m + n)·k·e
           bytes, i.e. 2·m·n/((m + n)·e) FLOP per L2 byte (42.7 for a 128×64 bf16 tile, 85.3 for
           128×256, 128 for 128×256 with the B tile multicast to a 2-CTA cluster), over L2 rate.
  HBM      bytes from the L2 model below, over HBM rate.
  epilogue what the kernel writes (logits, gradient tiles, dH), dW's read-modify-write, and
           standalone elementwise passes: max(bytes/HBM rate, FLOPs/vector rate).
  t = max(compute, HBM main loop, L2) + epilogue  (``roofline_ms``, the prediction: epilogues after
      main loops, as a Triton program runs them); ``overlap_ms`` = everything overlapped, the
      lower end of the range. A model's bound is the term (compute, HBM, L2, epilogue) with the
      most time. Efficiency = 6·N·D·V / t / matmul rate (the useful work of a fused training
      step, whatever a design executes: recomputing logits costs it).

HBM bytes of a GEMM (every model): its row operand (A) once; its column operand (B) once if it fits
in half the L2, else once per group of GROUP_M row blocks (grouped tile order: _tiles._grouped;
cuBLAS/CUTLASS rasterise in groups too, GROUP_M = 8 assumed); its output written once; dW's
read-back where the GEMM accumulates (BETA, addmm_). ``W reads`` and ``dW traffic`` sum, over the
step, the HBM bytes of the weight read by GEMMs and of the weight gradient read and written.

The models (``MODELS``), each from the implementation's code:
  hk_triton           hykernels/backends/triton through its own planning (chunk_rows, split_for,
                      _padded, GRAD_INPLACE, the _configs tables): plan(), below. Tiles: each table's
                      first candidate, or (hk_triton_tuned) the candidate with the least predicted time
                      (an autotuner picks by measured time).
  hk_cuda             hykernels/backends/cuda: cuda.plan()'s chunks, cuBLAS GEMMs at the matmul rate,
                      its epilogue kernels' bytes per logit (cuBLAS writes the fp32 logit 4, logit_stats
                      reads 4 (+4 write-back), logit_grad reads 4 and writes 2), two streams.
  hk_torch_chunked    traced: torch_chunked.fused_loss run on fake CUDA tensors (no memory, no GPU);
  torch_lce(_none)    traced: torch's chunked F.linear_cross_entropy (its own _adjust rules for CUDA,
                      its accumulator and backward). Every aten op is a kernel: GEMMs as cuBLAS, the
                      rest elementwise with their tensors' bytes.
  liger_flce          Liger's fused linear cross-entropy (Triton CE kernel between cuBLAS GEMMs).
  liger_cute_flce     Liger's SM90 CuTe DSL FLCE (unchunked bf16 logits; V % 256 == 0 only).
  liger_cute_scaled   Liger's SM90 CuTe DSL fused scaled CE (per-token NLL; logits never stored in
                      forward; one persistent backward kernel over 1024-token waves).
  cce                 Apple's Cut Cross-Entropy (Triton; backward recomputes logits and adds dE, dC
                      under locks; blocks whose softmax is below eps are skipped: ``kept`` fraction).
Each model lists its assumptions (``assumptions``); ``reported`` carries a peer's own published
measurement where its source gives one.

``plan``/``roofline`` (the triton backend's passes of one op) are what bench/run.py stores for
hk_triton in its JSON (``bench_section``) and sets beside the measured time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from hykernels import _checks  # noqa: E402
from hykernels._grad import FP32_ACCUMULATE  # noqa: E402
from hykernels._types import LogitOptions  # noqa: E402
from hykernels.backends import triton as tb  # noqa: E402  (no Triton import: kernels load lazily)

OPS = ("fused_loss", "token_stats", "token_stats_bwd")

# --------------------------------------------------------------------------------------------
# rates
# --------------------------------------------------------------------------------------------

# Dense matmul rate per input dtype: bf16/fp16 as reported for an H200 (cuBLAS, 8192³, random
# data; not measured here), fp32 the datasheet's IEEE FMA rate (Triton's fp32 dots are IEEE).
MATMUL_FLOPS = {"bfloat16": 790e12, "float16": 790e12, "float32": 67e12}
PEAK_FLOPS = MATMUL_FLOPS  # the name earlier callers used
DATASHEET_MATMUL_FLOPS = 990e12  # H200/H100 SXM dense bf16, NVIDIA datasheet
DATASHEET_HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, NVIDIA datasheet
VECTOR_FLOPS = 67e12  # fp32 non-tensor rate, datasheet
HBM_BYTES_PER_S = 4.3e12  # device-to-device copy reported on an H200 (not measured here)
L2_BYTES_PER_S = 9.0e12  # ESTIMATE: 5120 B/clk (A100 whitepaper's L2 read rate) × ~1.755 GHz
DEVICE_SMS = 132
L2_BYTES = 60 * 10**6
RATE_SOURCES = {
    "matmul": "790 TFLOP/s bf16/fp16: reported for an H200 (cuBLAS 8192³ bf16 on random data), not measured by "
              "this project; NVIDIA's datasheet dense rate is ~990",
    "fp32": "67 TFLOP/s: datasheet fp32 (IEEE FMA dots, no tensor cores)",
    "vector": "67 TFLOP/s: datasheet fp32, for epilogue arithmetic",
    "hbm": "4.3 TB/s: device-to-device copy reported on an H200 (datasheet 4.8 TB/s)",
    "l2": "9.0 TB/s: an estimate (5120 B/clk, the A100 whitepaper's L2 read rate, at ~1.755 GHz; NVIDIA "
          "publishes no Hopper figure)",
}


@dataclass(frozen=True)
class Rates:
    """The machine the model predicts for (defaults: an H200 SXM as above)."""

    matmul: float = MATMUL_FLOPS["bfloat16"]
    fp32_matmul: float = MATMUL_FLOPS["float32"]
    vector: float = VECTOR_FLOPS
    hbm: float = HBM_BYTES_PER_S
    l2: float = L2_BYTES_PER_S
    sms: int = DEVICE_SMS
    l2_bytes: int = L2_BYTES

    def matmul_for(self, dtype) -> float:
        return self.fp32_matmul if _dtype_name(dtype) == "float32" else self.matmul


# Epilogue FLOPs per element of an output tile (estimates; exp/tanh/compare = 1 each):
#   logits_fwd   z = acc/τ (1), online softmax fold: max, z − m, exp, (z−m)·e and three sums, z_y (9)
#   grad_inplace log p = z − lse − lse_lo (2), exp, p·(A + B·log p) + D (4), [v = y]·C (1), ·s′/τ (2),
#                load/narrow bookkeeping (2)
#   logits_grad  z = acc/τ (1) and grad_inplace's 12
#   dh_gemm, dw_gemm  α·acc (1); dw_gemm with BETA adds dW (+1)
EPILOGUE_FLOPS = {"logits_fwd": 10, "grad_inplace": 12, "logits_grad": 13, "dh_gemm": 1, "dw_gemm": 1}
KERNELS = ("logits_fwd", "logits_grad", "dh_gemm", "dw_gemm")
ROW_INPUT_BYTES = 8 + 6 * 4  # targets (int64), lse, lse_lo, the four §2 coefficients (fp32)
PARTIAL_BYTES = 5 * 4 + 4  # m, s, t, u, z_y (fp32) and argmax (int32) per row and split
TARGET_BYTES = 8

BlocksLike = Union[tb.Blocks, Mapping[str, int]]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype


def _esize(dtype) -> int:
    return torch.empty((), dtype=getattr(torch, _dtype_name(dtype))).element_size()


def _waves(programs: int, sms: int, num_warps: int = 8) -> float:
    """Wave quantisation of a grid of ``programs`` equal programs: ⌈P/slots⌉·slots/P, with
    ⌊8/num_warps⌋ resident programs per SM (these kernels are register-bound: _configs)."""
    if programs <= 0:
        return 1.0
    slots = sms * max(1, 8 // max(1, num_warps))
    return _cdiv(programs, slots) * slots / programs


# --------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------

_SUMMED = ("launches", "programs", "dot_flops", "wave_dot_flops", "epilogue_flops", "useful_flops", "l2_bytes",
           "wave_l2_bytes", "hbm_bytes_read", "hbm_bytes_written", "epilogue_bytes", "w_read_bytes", "dw_bytes",
           "atomics")


class _Pass:
    """One pass (one kernel, or one kind of aten op) summed over its launches.

    ``kind`` 'gemm' (a main loop with an epilogue) or 'memory' (a standalone elementwise kernel:
    all its bytes are epilogue bytes). ``epilogue_bytes`` is the part of the HBM bytes that the
    epilogue moves (outputs, dW read-back, elementwise passes); ``wave_*`` are the compute and L2
    work scaled by the grid's wave quantisation."""

    def __init__(self, name: str, kernel: str, blocks: Optional[dict] = None, kind: str = "gemm"):
        self.row = dict(name=name, kernel=kernel, kind=kind, blocks=blocks or {}, **dict.fromkeys(_SUMMED, 0))
        self.notes: list[str] = []

    def add(self, programs=0, dot=0, epilogue=0, useful=0, read=0, written=0, note=None, *, l2=0, epi_bytes=0,
            w_read=0, dw=0, waves=1.0, launches=1):
        r = self.row
        r["launches"] += launches
        r["programs"] += programs
        r["dot_flops"] += dot
        r["wave_dot_flops"] += dot * waves
        r["epilogue_flops"] += epilogue
        r["useful_flops"] += useful
        r["l2_bytes"] += l2
        r["wave_l2_bytes"] += l2 * waves
        r["hbm_bytes_read"] += read
        r["hbm_bytes_written"] += written
        r["epilogue_bytes"] += epi_bytes
        r["w_read_bytes"] += w_read
        r["dw_bytes"] += dw
        if note and note not in self.notes:
            self.notes.append(note)

    def memory(self, read: int, written: int, flops: int = 0, dw: bool = False, note=None, launches=1):
        """A standalone elementwise kernel: every byte is an epilogue byte."""
        self.add(epilogue=flops, read=read, written=written, epi_bytes=read + written,
                 dw=(read + written) if dw else 0, note=note, launches=launches)

    def result(self) -> dict:
        r = dict(self.row, notes="; ".join(self.notes))
        r["pass"] = r.pop("name")
        r["flops"] = r["dot_flops"] + r["epilogue_flops"]
        return r

    def gemm(self, rows: int, cols: int, depth: int, row_op: int, col_op: int, written: int, l2: int,
             useful: bool = True, extra_read: int = 0, epilogue: Optional[int] = None, col_name: str = "", *,
             a_bytes: int = 2, b_bytes: int = 2, sms: int = DEVICE_SMS, epi_read: int = 0, dw: bool = False) -> None:
        """One launch of a grouped-order Triton GEMM over a rows × cols output, reduction ``depth``:
        ``row_op``/``col_op`` the bytes of its row/column operand, ``a_bytes``/``b_bytes`` their
        element sizes (L2 tiles), ``epi_read`` what the epilogue reads back (dW with BETA)."""
        t = self.row["blocks"]
        num_m, num_n = _cdiv(rows, t["BLOCK_M"]), _cdiv(cols, t["BLOCK_N"])
        steps = _cdiv(depth, t["BLOCK_K"])
        col_bytes, times = _column_reads(col_op, num_m, t["GROUP_M"], l2)
        tiles = num_m * num_n
        per_elem = EPILOGUE_FLOPS[self.row["kernel"]] if epilogue is None else epilogue
        self.add(programs=tiles, dot=tiles * steps * 2 * t["BLOCK_M"] * t["BLOCK_N"] * t["BLOCK_K"],
                 epilogue=per_elem * tiles * t["BLOCK_M"] * t["BLOCK_N"],
                 useful=2 * rows * cols * depth if useful else 0, read=row_op + col_bytes + extra_read + epi_read,
                 written=written, note=f"{col_name} read {times}x per launch",
                 l2=tiles * steps * t["BLOCK_K"] * (t["BLOCK_M"] * a_bytes + t["BLOCK_N"] * b_bytes),
                 epi_bytes=written + epi_read, w_read=col_bytes if col_name == "W" else 0,
                 dw=(written + epi_read) if dw else 0, waves=_waves(tiles, sms, t.get("num_warps", 8)))


def _column_reads(size: int, num_m: int, group_m: int, l2_bytes: int) -> tuple[int, int]:
    """(bytes, times) a grouped GEMM's column operand of ``size`` bytes is read from HBM."""
    times = 1 if size <= l2_bytes // 2 else _cdiv(num_m, group_m)
    return times * size, times


@dataclass(frozen=True)
class LibTile:
    """A library GEMM's tile (cuBLAS, CUTLASS, CuTe DSL): m×n outputs per CTA, the B tile multicast
    to ``cluster`` CTAs along M (TMA multicast), grouped rasterisation over ``group`` row blocks."""

    m: int = 128
    n: int = 256
    cluster: int = 1
    group: int = 8

    def flop_per_l2_byte(self, a_bytes: int, b_bytes: int) -> float:
        return 2 * self.cluster * self.m * self.n / (self.cluster * self.m * a_bytes + self.n * b_bytes)


# cuBLAS on sm_90 for large bf16 GEMMs: 128×256 tiles, 2-CTA clusters (an assumption: cuBLAS's
# kernel choice is not visible from here); 128 FLOP per L2 byte in bf16.
CUBLAS_TILE = LibTile(128, 256, cluster=2)


def lib_gemm(p: _Pass, m: int, n: int, k: int, a_bytes: int, b_bytes: int, out_bytes: int, rates: Rates, *,
             tile: LibTile = CUBLAS_TILE, c_read: bool = False, c_bytes: Optional[int] = None, w: str = "",
             dw_out: bool = False, useful: bool = True, note: Optional[str] = None) -> None:
    """One library GEMM C[m, n] (+)= A[m, k]·B[k, n]: padded tile FLOPs, L2 operand bytes at the
    tile's FLOP/byte, HBM as in the module docstring, the grid assumed to fill the GPU. ``w`` names
    the operand ('a' or 'b') that is the lm_head weight; ``dw_out``: C is the weight gradient."""
    # a skinny dimension gets a narrower tile (cuBLAS has them): padded to a multiple of 64 at most
    tile = replace(tile, m=min(tile.m, _cdiv(m, 64) * 64), n=min(tile.n, _cdiv(n, 64) * 64))
    num_m, num_n = _cdiv(m, tile.m), _cdiv(n, tile.n)
    dot = 2 * num_m * tile.m * num_n * tile.n * k
    a_size, b_size = m * k * a_bytes, k * n * b_bytes
    b_hbm, times = _column_reads(b_size, num_m, tile.group, rates.l2_bytes)
    out = m * n * out_bytes
    back = m * n * (out_bytes if c_bytes is None else c_bytes) if c_read else 0
    w_read = a_size if w == "a" else b_hbm if w == "b" else 0
    p.add(programs=num_m * num_n, dot=dot, useful=2 * m * n * k if useful else 0, read=a_size + b_hbm + back,
          written=out, l2=dot / tile.flop_per_l2_byte(a_bytes, b_bytes), epi_bytes=out + back, w_read=w_read,
          dw=(out + back) if dw_out else 0, note=note or (f"B read {times}x" if times > 1 else None))


# --------------------------------------------------------------------------------------------
# the triton backend (hykernels/backends/triton), through its own planning functions
# --------------------------------------------------------------------------------------------

def default_blocks(dtype, capability: int = 90) -> dict:
    """Each kernel's first candidate for ``dtype`` on sm_``capability``, and GRAD_INPLACE."""
    dt = getattr(torch, _dtype_name(dtype))
    return {**{k: tb._configs.candidates(k, dt, capability)[0] for k in KERNELS}, "grad_inplace": tb.GRAD_INPLACE}


def _tile(kernel: str, b: BlocksLike) -> dict:
    """The constexprs of a tuned launch (as _configs._meta gives them off OVERRIDE; grad_inplace:
    BLOCK_R = m, BLOCK_V = n, as fused_loss launches it): from a Blocks, or a dict of them (what
    _configs.launch returns)."""
    if not isinstance(b, tb.Blocks):
        return dict(b)
    if kernel == "grad_inplace":
        return dict(BLOCK_R=b.m, BLOCK_V=b.n, num_warps=b.num_warps)
    return dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m, num_warps=b.num_warps,
                num_stages=b.num_stages)


def plan(op: str, n: int, d: int, v: int, dtype, blocks_by_kernel: Optional[Mapping[str, BlocksLike]] = None,
         workspace_bytes: Optional[int] = None, device_sms: int = DEVICE_SMS, chunk_size: Optional[int] = None,
         needs: tuple[bool, bool] = (True, True), fp32_accumulate: Optional[bool] = None,
         l2_bytes: int = L2_BYTES) -> dict:
    """The passes of ``op`` (fused_loss: the training step's forward, which forms the gradients;
    token_stats: the statistics forward; token_stats_bwd: its backward) at N=n, D=d, V=v.

    ``blocks_by_kernel``: kernel -> Blocks (or constexpr dict) overriding default_blocks;
    ``workspace_bytes``: the chunk budget (default the backend's WORKSPACE_BYTES); ``chunk_size``:
    LogitOptions.chunk_size; ``needs``: (dH, dW) wanted; ``fp32_accumulate``: default _grad's.
    Returns {op, N, D, V, dtype, chunk_rows, chunks, workspace_bytes, splits, blocks, passes}."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    name = _dtype_name(dtype)
    e = _esize(name)
    blocks = {**default_blocks(name), **(blocks_by_kernel or {})}
    tiles = {k: _tile(k, b) for k, b in blocks.items()}
    opts = LogitOptions(chunk_size=chunk_size)
    acc32 = FP32_ACCUMULATE if fp32_accumulate is None else fp32_accumulate
    dw_bytes = 4 if name != "float32" and (acc32 or name == "float16") else e
    out = dict(op=op, N=n, D=d, V=v, dtype=name, device_sms=device_sms, l2_bytes=l2_bytes,
               workspace_budget=tb.WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes,
               blocks={k: tiles[k] for k in (*KERNELS, "grad_inplace")})
    passes: list[_Pass] = []

    def stats(rows_list, store_z):
        p = _Pass("statistics", "logits_fwd", tiles["logits_fwd"])
        t = p.row["blocks"]
        splits = []
        for c in rows_list:
            width, s = tb.split_for(c, v, device_sms)
            splits.append(s)
            col_tiles = sum(_cdiv(min(width, v - i * width), t["BLOCK_N"]) for i in range(s))
            num_m = _cdiv(c, t["BLOCK_M"])
            steps = _cdiv(d, t["BLOCK_K"])
            w_bytes, times = _column_reads(v * d * e, num_m, t["GROUP_M"], l2_bytes)
            tile = t["BLOCK_M"] * t["BLOCK_N"]
            written = (4 * c * v if store_z else 0) + PARTIAL_BYTES * s * c
            p.add(programs=num_m * s, dot=num_m * col_tiles * steps * 2 * tile * t["BLOCK_K"],
                  epilogue=EPILOGUE_FLOPS["logits_fwd"] * num_m * col_tiles * tile, useful=2 * c * d * v,
                  read=c * d * e + w_bytes + TARGET_BYTES * c, written=written,
                  note=f"{s} vocabulary splits of {width}; W read {times}x per launch",
                  l2=num_m * col_tiles * steps * t["BLOCK_K"] * (t["BLOCK_M"] + t["BLOCK_N"]) * e,
                  epi_bytes=written, w_read=w_bytes, waves=_waves(num_m * s, device_sms, t.get("num_warps", 8)))
        out["splits"] = splits[0] if len(set(splits)) == 1 else splits
        passes.append(p)

    def grad_gemms(rows_list, g_bytes):
        """dH = G·W and dW (+)= Gᵀ·H per chunk; G has ``g_bytes`` per entry."""
        dh = _Pass("dH = G·W", "dh_gemm", tiles["dh_gemm"])
        dw = _Pass("dW += Gᵀ·H", "dw_gemm", tiles["dw_gemm"])
        for i, c in enumerate(rows_list):
            if needs[0]:
                dh.gemm(c, d, v, row_op=c * v * g_bytes, col_op=v * d * e, written=c * d * e, l2=l2_bytes,
                        col_name="W", a_bytes=g_bytes, b_bytes=e, sms=device_sms)
            if needs[1]:
                beta = i > 0
                dw.gemm(v, d, c, row_op=c * v * g_bytes, col_op=c * d * e, written=v * d * dw_bytes, l2=l2_bytes,
                        epi_read=v * d * dw_bytes if beta else 0, epilogue=EPILOGUE_FLOPS["dw_gemm"] + beta,
                        col_name="H chunk", a_bytes=g_bytes, b_bytes=e, sms=device_sms, dw=True)
        passes.extend(p for p, need in ((dh, needs[0]), (dw, needs[1])) if need)
        if needs[1] and dw_bytes != e:
            cast = _Pass("dW fp32 → dtype", "torch cast", kind="memory")
            cast.memory(read=4 * v * d, written=e * v * d, flops=v * d, dw=True,
                        note="fp32 dW accumulator cast once at the end")
            passes.append(cast)

    def chunked(rows):
        return [min(rows, n - r) for r in range(0, n, max(rows, 1))]

    def backward():
        rows = opts.chunk_size or max(1, tb.chunk_rows(n, v, opts, e, workspace_bytes))
        out.update(chunk_rows=rows, workspace_bytes=min(rows, n) * tb._padded(v) * e)
        rows_list = chunked(rows)
        out["chunks"] = len(rows_list)
        p = _Pass("gradient tile (recomputed)", "logits_grad", tiles["logits_grad"])
        for c in rows_list:
            p.gemm(c, v, d, row_op=c * d * e, col_op=v * d * e, written=c * v * e, l2=l2_bytes,
                   extra_read=ROW_INPUT_BYTES * c, col_name="W", a_bytes=e, b_bytes=e, sms=device_sms)
        passes.append(p)
        grad_gemms(rows_list, e)

    if op == "token_stats":
        stats([n], store_z=False)
        out.update(chunk_rows=n, chunks=1, workspace_bytes=0)
    elif op == "token_stats_bwd":
        backward()
    else:
        rows = tb.chunk_rows(n, v, opts, 4, workspace_bytes)
        if rows == 0:  # fused_loss's recompute path: statistics of all rows, then the backward
            stats([n], store_z=False)
            if any(needs):
                backward()
            out["path"] = "recompute (not one row of fp32 logits fits the workspace): 8·N·D·V"
        else:
            rows_list = chunked(rows)
            out.update(path="logits kept per chunk: 6·N·D·V", chunk_rows=rows, chunks=len(rows_list),
                       workspace_bytes=min(rows, n) * tb._padded(v) * 4)
            stats(rows_list, store_z=True)
            if any(needs):
                g_bytes = 4 if name == "float32" else 2
                p = _Pass("gradient tile (in place)", "grad_inplace", tiles["grad_inplace"], kind="memory")
                br, bv = p.row["blocks"]["BLOCK_R"], p.row["blocks"]["BLOCK_V"]
                for c in rows_list:
                    progs = _cdiv(c, br)
                    p.add(programs=progs, epilogue=EPILOGUE_FLOPS["grad_inplace"] * progs * br * _cdiv(v, bv) * bv,
                          read=4 * c * v + ROW_INPUT_BYTES * c, written=g_bytes * c * v,
                          epi_bytes=4 * c * v + ROW_INPUT_BYTES * c + g_bytes * c * v)
                passes.append(p)
                grad_gemms(rows_list, g_bytes)
    out["passes"] = [p.result() for p in passes]
    return out


def triton_passes(op: str, n: int, d: int, v: int, dtype, **kwargs) -> list[dict]:
    """The passes of plan(): {pass, kernel, kind, blocks, launches, programs, flops (= dot_flops +
    epilogue_flops), useful_flops, l2_bytes, hbm_bytes_read, hbm_bytes_written, epilogue_bytes,
    w_read_bytes, dw_bytes, atomics: 0, notes} each."""
    return plan(op, n, d, v, dtype, **kwargs)["passes"]


# --------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------

BOUNDS = ("compute", "HBM", "L2", "epilogue")


def time_pass(r: dict, rates: Rates, dtype) -> dict:
    """Add a pass's times (ms) and bound: compute_ms, l2_ms, hbm_ms (main loop bytes), memory_ms
    (all its bytes), epilogue_ms, roofline_ms (the prediction: main + epilogue), overlap_ms."""
    mm = rates.matmul_for(dtype)
    total_bytes = r["hbm_bytes_read"] + r["hbm_bytes_written"]
    compute = r["wave_dot_flops"] / mm
    l2 = r["wave_l2_bytes"] / rates.l2
    hbm_main = (total_bytes - r["epilogue_bytes"]) / rates.hbm
    epilogue = max(r["epilogue_flops"] / rates.vector, r["epilogue_bytes"] / rates.hbm)
    main = {"compute": compute, "HBM": hbm_main, "L2": l2}
    main_bound = max(main, key=main.get)
    r.update(compute_ms=1e3 * compute, l2_ms=1e3 * l2, hbm_ms=1e3 * hbm_main, memory_ms=1e3 * total_bytes / rates.hbm,
             epilogue_ms=1e3 * epilogue, roofline_ms=1e3 * (main[main_bound] + epilogue),
             overlap_ms=1e3 * max(compute, l2, total_bytes / rates.hbm, r["epilogue_flops"] / rates.vector),
             bound="epilogue" if epilogue > main[main_bound] else main_bound,
             by_bound={main_bound: 1e3 * main[main_bound], "epilogue": 1e3 * epilogue})
    return r


_TOTALS = ("flops", "dot_flops", "epilogue_flops", "useful_flops", "l2_bytes", "hbm_bytes_read", "hbm_bytes_written",
           "epilogue_bytes", "w_read_bytes", "dw_bytes", "roofline_ms", "overlap_ms", "launches")


def _totals(passes: list[dict], lanes: int = 1) -> dict:
    t = {k: sum(r.get(k, 0) for r in passes) for k in _TOTALS}
    by = dict.fromkeys(BOUNDS, 0.0)
    for r in passes:
        for k, ms in r["by_bound"].items():
            by[k] += ms
    t["by_bound"] = by
    t["bound"] = max(by, key=by.get)
    if lanes > 1:  # streams: elementwise kernels beside the GEMMs of the next chunk
        gemm = sum(r["overlap_ms"] for r in passes if r["kind"] == "gemm")
        mem = sum(r["roofline_ms"] for r in passes if r["kind"] == "memory")
        hbm = sum(r["memory_ms"] for r in passes)
        t["overlap_ms"] = max(gemm, mem, hbm)
    return t


def roofline(op: str, n: int, d: int, v: int, dtype, peak_flops: Optional[float] = None,
             vector_flops: float = VECTOR_FLOPS, hbm_bytes_per_s: float = HBM_BYTES_PER_S,
             l2_bytes_per_s: float = L2_BYTES_PER_S, **kwargs) -> dict:
    """plan() with each pass's times (time_pass), the totals, the ideal time (useful FLOPs at the
    matmul rate) and the rates used. ``peak_flops``: the matmul rate (default MATMUL_FLOPS[dtype])."""
    p = plan(op, n, d, v, dtype, **kwargs)
    peak = MATMUL_FLOPS[p["dtype"]] if peak_flops is None else peak_flops
    rates = Rates(matmul=peak, fp32_matmul=peak, vector=vector_flops, hbm=hbm_bytes_per_s, l2=l2_bytes_per_s,
                  sms=p["device_sms"], l2_bytes=p["l2_bytes"])
    for r in p["passes"]:
        time_pass(r, rates, p["dtype"])
    p["total"] = _totals(p["passes"])
    p["ideal_ms"] = 1e3 * p["total"]["useful_flops"] / peak
    p["peaks"] = dict(flops=peak, vector_flops=vector_flops, hbm_bytes_per_s=hbm_bytes_per_s,
                      l2_bytes_per_s=l2_bytes_per_s)
    return p


def tuned_blocks(op: str, n: int, d: int, v: int, dtype, rates: Optional[Rates] = None, capability: int = 90,
                 **kwargs) -> dict:
    """Per kernel, the _configs candidate with the least predicted time for this op and shape (what
    an autotuner would pick if this model were right): kernel -> Blocks."""
    rates = rates or Rates()
    name = _dtype_name(dtype)
    best = {}
    for kernel in KERNELS:
        times = []
        for cand in tb._configs.candidates(kernel, getattr(torch, name), capability):
            p = plan(op, n, d, v, name, blocks_by_kernel={kernel: cand}, device_sms=rates.sms, l2_bytes=rates.l2_bytes,
                     **kwargs)
            ms = sum(time_pass(r, rates, name)["roofline_ms"] for r in p["passes"] if r["kernel"] == kernel)
            times.append((ms, cand))
        if times:
            best[kernel] = min(times, key=lambda x: x[0])[1]
    return best


# --------------------------------------------------------------------------------------------
# models of a training step (forward + backward of the CE loss), every backend and peer
# --------------------------------------------------------------------------------------------

def _step(name: str, passes: list, rates: Rates, dtype, *, lanes: int = 1, assumptions=(), **extra) -> dict:
    rows = [p.result() if isinstance(p, _Pass) else p for p in passes]
    for r in rows:
        time_pass(r, rates, dtype)
    return dict(name=name, available=True, passes=rows, lanes=lanes, total=_totals(rows, lanes),
                assumptions=list(assumptions), **extra)


def _unavailable(name: str, reason: str, **extra) -> dict:
    return dict(name=name, available=False, reason=reason, passes=[], assumptions=[], **extra)


def _hk_op_passes(n: int, d: int, v: int, e: int) -> list[_Pass]:
    """What hykernels' fused_loss op adds around any backend: value checks (a sum over H and W,
    with HYKERNELS_CHECKS on, as by default) and the backward's in-place scaling of dH and dW."""
    out = []
    if _checks.checks_enabled():
        p = _Pass("value checks (finite sums of H, W)", "torch", kind="memory")
        p.memory(read=(n * d + v * d) * e + 8 * n, written=0, flops=n * d + v * d, launches=3)
        out.append(p)
    p = _Pass("backward: dH, dW ·= g (in place)", "torch", kind="memory")
    p.memory(read=(n * d + v * d) * e, written=(n * d + v * d) * e, flops=n * d + v * d, launches=2)
    p.row["dw_bytes"] += 2 * v * d * e
    out.append(p)
    return out


def model_hk_triton(n: int, d: int, v: int, dtype, rates: Rates, tuned: bool = False,
                    workspace_bytes: Optional[int] = None) -> dict:
    name = _dtype_name(dtype)
    blocks = tuned_blocks("fused_loss", n, d, v, name, rates, workspace_bytes=workspace_bytes) if tuned else None
    p = plan("fused_loss", n, d, v, name, blocks_by_kernel=blocks, workspace_bytes=workspace_bytes,
             device_sms=rates.sms, l2_bytes=rates.l2_bytes)
    tiles = ", ".join(f"{k} {b['BLOCK_M']}×{b['BLOCK_N']}×{b['BLOCK_K']}" for k, b in p["blocks"].items()
                      if "BLOCK_K" in b and any(r["kernel"] == k for r in p["passes"]))
    return _step("hk_triton_tuned" if tuned else "hk_triton", [*p["passes"], *_hk_op_passes(n, d, v, _esize(name))],
                 rates, name, chunk_rows=p["chunk_rows"], chunks=p["chunks"], path=p.get("path"),
                 assumptions=[f"fused_loss: {p['chunks']} chunk(s) of {p['chunk_rows']} rows ({p.get('path')})",
                              f"tiles: {tiles} ("
                              + ("the candidate with the least predicted time per kernel" if tuned else
                                 "each _configs table's first candidate on sm_90") + ")",
                              "one 8-warp program per SM (register-bound kernels); no overlap of a program's epilogue "
                              "with its main loop",
                              "the op's value checks and the backward's in-place scaling of dH and dW included"])


def _cuda_epilogue(opts: LogitOptions, dtype, has_bias: bool, write_back: Optional[bool]) -> tuple[int, int, str]:
    """(bytes per logit of logit_stats, of logit_grad, where the numbers come from) in fused_loss's
    single pass. logit_stats reads the fp32 logit (4) and stores the transformed logit back (4) only
    with a softcap (cuda.fused_loss's rule: a bias or temperature alone, logit_grad applies them to
    the raw tile again; ``write_back`` overrides); logit_grad reads it (4) and writes the gradient (2 for half, 4
    for fp32). When the cuda backend has ``tile_bytes_per_logit(stats, grad_bytes, write_back)``
    its total (which includes cuBLAS's 4-byte fp32 write) is used."""
    from hykernels.backends import cuda as cb

    g = 4 if _dtype_name(dtype) == "float32" else 2
    given = write_back is not None
    if not given:
        write_back = opts.softcap is not None  # cuda.fused_loss: only a softcap is stored back
    how = "given" if given else "with a softcap only"
    fn = getattr(cb, "tile_bytes_per_logit", None)
    if callable(fn):
        total = int(fn(True, g, write_back))
        return total - 4 - (4 + g), 4 + g, f"cuda.tile_bytes_per_logit(write_back={write_back}: {how}) = {total}"
    return 4 + 4 * write_back, 4 + g, f"write-back {write_back} ({how}), counted here (cuda.py has no " \
                                      "tile_bytes_per_logit)"


def model_hk_cuda(n: int, d: int, v: int, dtype, rates: Rates, opts: Optional[LogitOptions] = None,
                  write_back: Optional[bool] = None, has_bias: bool = False, label: Optional[str] = None) -> dict:
    """hykernels' cuda backend (hykernels/backends/cuda.py) from its chunk plan (cuda.plan, read
    without building the extension) and its epilogue kernels' bytes per logit."""
    from hykernels.backends import cuda as cb

    name = _dtype_name(dtype)
    e = _esize(name)
    opts = opts or LogitOptions()
    rows, cols = cb.plan(n, v, opts)
    fp16, fp32 = name == "float16", name == "float32"
    g_bytes = 4 if fp32 else 2
    dw_fp32 = not fp32 and (FP32_ACCUMULATE or fp16)
    dw_b = 4 if dw_fp32 else e
    fused = cols >= v
    dh_fp32 = not fused or fp16
    stats_b, grad_b, source = _cuda_epilogue(opts, name, has_bias, write_back)
    chunks = [min(rows, n - r) for r in range(0, n, rows)]
    slices = [min(cols, v - c) for c in range(0, v, cols)]
    logits = _Pass("logits GEMM (cuBLAS, fp32 out)", "cublas")
    stats = _Pass("logit_stats (row statistics)", "csrc", kind="memory")
    grad = _Pass("logit_grad (gradient in place)", "csrc", kind="memory")
    dh = _Pass("dH = G·W (cuBLAS)", "cublas")
    dw = _Pass("dW += Gᵀ·H (cuBLAS addmm_)", "cublas")
    init = _Pass("zero dW (and fp32 dH)", "torch", kind="memory")
    init.memory(read=0, written=v * d * dw_b + (n * d * 4 if dh_fp32 else 0), dw=False)
    init.row["dw_bytes"] += v * d * dw_b
    for c in chunks:
        for s in slices:
            if not fused:  # token_partials: GEMM + statistics, no write-back
                lib_gemm(logits, c, s, d, e, e, 4, rates, w="b")
                stats.memory(read=4 * c * s, written=24 * c, flops=8 * c * s)
    for c in chunks:
        for s in slices:
            lib_gemm(logits, c, s, d, e, e, 4, rates, w="b")
            if fused:
                stats.memory(read=4 * c * s + 8 * c, written=(stats_b - 4) * c * s + 48 * c, flops=8 * c * s)
            grad.memory(read=4 * c * s + 32 * c, written=g_bytes * c * s, flops=12 * c * s)
            lib_gemm(dh, c, d, s, g_bytes, e, 4 if dh_fp32 else e, rates, c_read=dh_fp32, w="b")
            lib_gemm(dw, s, d, c, g_bytes, e, dw_b, rates, c_read=True, dw_out=True)
    passes = [init, logits, stats, grad, dh, dw]
    if dw_fp32 or dh_fp32:
        cast = _Pass("fp32 accumulators → dtype", "torch", kind="memory")
        if dw_fp32:
            cast.memory(read=4 * v * d, written=e * v * d, dw=True)
        if dh_fp32:
            cast.memory(read=4 * n * d, written=e * n * d)
        passes.append(cast)
    per_logit = 4 + stats_b + grad_b if fused else None
    return _step(label or "hk_cuda", [*passes, *_hk_op_passes(n, d, v, e)], rates, name, lanes=cb.LANES,
                 chunk_rows=rows, chunks=len(chunks), epilogue_bytes_per_logit=per_logit,
                 assumptions=[f"cuda.plan: {len(chunks)} chunk(s) of {rows} rows × {len(slices)} vocabulary slice(s) "
                              f"({'fused: 6·N·D·V' if fused else 'recompute: 8·N·D·V'})",
                              f"epilogue bytes per logit {per_logit} (GEMM fp32 write 4, logit_stats {stats_b}, "
                              f"logit_grad {grad_b}): {source}",
                              "cuBLAS GEMMs at the matmul rate with 128×256 tiles, 2-CTA multicast, filling the GPU; "
                              "dW addmm_ reads and writes dW every chunk (zero-filled first)",
                              f"{cb.LANES} streams: overlap_ms lets epilogue kernels run beside the next chunk's GEMM",
                              "the op's value checks and the backward's in-place scaling of dH and dW included"])


# ---- traced models: run the implementation's Python on fake CUDA tensors ------------------------

_GEMMS = ("aten.mm.", "aten.addmm.", "aten.addmm_.", "aten.bmm.", "aten.baddbmm.")
_GATHERS = ("aten.gather.", "aten.index_select.", "aten.take.", "aten.index.Tensor")
_SCATTERS = ("aten.scatter_add_.", "aten.scatter_.", "aten.index_add_.", "aten.index_put_.", "aten.index_copy_.",
             "aten.scatter_add.", "aten.index_add.")
_FACTORIES = ("aten.zeros", "aten.ones", "aten.full", "aten.new_zeros", "aten.new_ones", "aten.new_full",
              "aten.zero_.", "aten.fill_.")
_EMPTY = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided")
# Composite ops whose CUDA implementation runs several kernels over its input: (reads, writes) in
# units of the input's bytes. logsumexp (ATen ReduceOps.cpp logsumexp_out_impl): amax, self − max
# (new tensor), exp_, sum.
_COMPOSITE = {"aten.logsumexp.default": (4, 2)}


class _Stop(Exception):
    """Raised by a recorder told to stop at the first logits GEMM: ``rows`` is its chunk size."""

    def __init__(self, rows: int):
        super().__init__(rows)
        self.rows = rows


class _Recorder:
    """A TorchDispatchMode that keeps (op name, tensor args, kwargs, tensor outputs) of every op;
    with ``stop_at`` = (V, D) it raises _Stop at the first GEMM with a V-sized output dimension
    (a logits tile, [rows, V] or [V, rows]). Data-dependent host reads (.item(), bool() of a tensor)
    are answered with the common case: False, 0 or 1.0 (``syncs`` counts them)."""

    def __init__(self, stop_at: Optional[tuple] = None):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._local_scalar_dense.default:  # .item()/bool(): a host sync
                    outer.syncs += 1  # fake tensors hold no values: answer with the common case
                    t = args[0]
                    return False if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 0
                result = func(*args, **kwargs)
                rets = func._schema.returns
                if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
                    return result  # a view: no kernel, no bytes
                outs = [t for t in (result if isinstance(result, (tuple, list)) else (result,))
                        if isinstance(t, torch.Tensor)]
                ins = []
                for a in args:
                    ins.extend(x for x in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(x, torch.Tensor))
                outer.ops.append((str(func), ins, kwargs, outs))
                if stop_at and str(func).startswith(_GEMMS) and outs and outs[0].dim() == 2:
                    v, d = stop_at
                    rows, cols = outs[0].shape
                    if v in (rows, cols) and d not in (rows, cols):
                        raise _Stop(cols if rows == v else rows)
                return result

        self.ops: list = []
        self.syncs = 0
        self.mode = Mode()


def _getitem_no_guard(orig):
    """Tensor.__getitem__ for int/slice/None indices as aten views: the Python indexing path takes a
    CUDA device guard that a CPU-only torch refuses even for fake tensors."""
    def getitem(self, idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or isinstance(i, (slice, int)) for i in items):
            return orig(self, idx)
        t, dim = self, 0
        for i in items:
            if i is None:
                t, dim = t.unsqueeze(dim), dim + 1
            elif isinstance(i, int):
                t = t.select(dim, i)
            else:
                start, stop, step = i.indices(t.shape[dim])
                t, dim = torch.ops.aten.slice.Tensor(t, dim, start, stop, step), dim + 1
        return t
    return getitem


@contextlib.contextmanager
def fake_cuda(stop_at: Optional[tuple] = None):
    """Fake tensors that claim to be on CUDA (no memory is allocated and no GPU is needed), so that
    an implementation takes its CUDA branches; yields a recorder of the aten ops it runs. Two Python
    methods that take a CUDA device guard (refused by a CPU-only torch even for fake tensors) are
    routed to their aten ops: indexing with ints/slices/None, ``~`` and ``copy_``."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    from hykernels.backends import _dense

    rec = _Recorder(stop_at)
    with FakeTensorMode(allow_non_fake_inputs=True), \
            mock.patch.object(torch.Tensor, "__getitem__", _getitem_no_guard(torch.Tensor.__getitem__)), \
            mock.patch.object(torch.Tensor, "__invert__", lambda self: torch.bitwise_not(self)), \
            mock.patch.object(torch.Tensor, "copy_", lambda self, src, non_blocking=False:
                              torch.ops.aten.copy_.default(self, src, non_blocking)), \
            mock.patch.object(_dense, "fp32_output_gemm_error", lambda device: None):
        yield rec


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _role(numel: int, c: int, d: int, v: int) -> str:
    if numel == v * d:
        return "V×D"
    if numel % v == 0 and numel // v <= c:
        return "rows×V"
    if numel % d == 0 and numel >= d:
        return "rows×D"
    if numel <= max(4 * c, 4096):
        return "small"
    return "tile blocks"


def passes_from_trace(ops: list, c: int, d: int, v: int, rates: Rates) -> dict:
    """Aggregate recorded aten ops into passes keyed by op and operand role (rows×V: a logits tile,
    V×D: the weight or its gradient, rows×D, tile blocks: pieces of a tile, small): GEMMs as cuBLAS (lib_gemm), everything else
    one elementwise kernel each, reading its tensor inputs and writing its outputs (gathers and
    scatters: only the touched elements; logsumexp: its ATen kernels, _COMPOSITE)."""
    passes: dict[str, _Pass] = {}

    def get(key, kernel, kind):
        if key not in passes:
            passes[key] = _Pass(key, kernel, kind=kind)
        return passes[key]

    for name, ins, kwargs, outs in ops:
        short = name.replace("aten.", "").replace(".default", "")
        if name.startswith(_GEMMS):
            if name.startswith(("aten.mm.", "aten.bmm.")):
                a, b = ins[0], ins[1]
                cmat = None
            else:
                cmat, a, b = ins[0], ins[1], ins[2]
            m, k, nn = a.shape[-2], a.shape[-1], b.shape[-1]
            out = outs[0] if outs else kwargs.get("out")
            beta = kwargs.get("beta", 1)
            c_read = cmat is not None and beta != 0 and cmat.numel() == m * nn
            w = "a" if a.numel() == v * d else "b" if b.numel() == v * d else ""
            lib_gemm(get(f"{short} [{m}×{nn}×{k}]", "cublas", "gemm"), m, nn, k, a.element_size(), b.element_size(),
                     out.element_size(), rates, c_read=c_read, c_bytes=cmat.element_size() if c_read else None, w=w,
                     dw_out=m * nn == v * d)
            continue
        if not outs:  # no tensor out (device queries, .item()): no kernel worth counting
            continue
        big = max([t.numel() for t in ins + outs] or [0])
        if name.startswith(_EMPTY) or big == 0:
            continue
        role = _role(big, c, d, v)
        p = get(f"{short} [{role}]", "torch", "memory")
        written = sum(_nbytes(t) for t in {id(t): t for t in outs}.values())
        if name.startswith(_GATHERS):
            read = written + sum(_nbytes(t) for t in ins if not t.is_floating_point())
        elif name.startswith(_SCATTERS):
            src = ins[-1] if ins[-1].is_floating_point() else ins[1]
            touched = src.numel() * ins[0].element_size()
            read = _nbytes(src) + touched + sum(_nbytes(t) for t in ins[1:-1])
            written = touched if name.split(".")[1].endswith("_") else written
        elif name.startswith(_FACTORIES):
            read = 0
        elif name.startswith("aten.copy_."):
            read = _nbytes(ins[1])
        elif name in _COMPOSITE:
            r_mult, w_mult = _COMPOSITE[name]
            read, written = r_mult * _nbytes(ins[0]), w_mult * _nbytes(ins[0]) + written
        else:
            read = sum(_nbytes(t) for t in ins)
        p.memory(read=read, written=written, flops=big, dw=role == "V×D")
    return passes


def _affine_trace(run: Callable[[int], list], n: int, c: int, d: int, v: int, rates: Rates) -> list[dict]:
    """The passes of ``run(rows)`` at n rows in chunks of c, from two short traces: one full chunk
    and two (each plus the ragged rest): every summed quantity is affine in the number of full
    chunks, so T(k) = T(1) + (k − 1)·(T(2) − T(1)) is exact."""
    k, rest = divmod(n, c) if n >= c else (1, 0)
    if n < c:
        c = n
    one = {key: p.result() for key, p in passes_from_trace(run(c + rest), c, d, v, rates).items()}
    if k == 1:
        return list(one.values())
    two = {key: p.result() for key, p in passes_from_trace(run(2 * c + rest), c, d, v, rates).items()}
    out = []
    for key in dict.fromkeys([*one, *two]):
        a, b = one.get(key), two.get(key)
        base = dict(b or a)
        for f in _SUMMED + ("flops",):
            fa, fb = (a or {}).get(f, 0), (b or {}).get(f, 0)
            base[f] = fa + (k - 1) * (fb - fa)
        out.append(base)
    return out


def _small_passes(rows: list[dict], keep: float = 0.002) -> list[dict]:
    """Merge the passes that move under ``keep`` of all bytes and do no matmul into one."""
    total = sum(r["hbm_bytes_read"] + r["hbm_bytes_written"] for r in rows) or 1
    big = [r for r in rows if r["kind"] == "gemm" or (r["hbm_bytes_read"] + r["hbm_bytes_written"]) >= keep * total]
    small = [r for r in rows if r not in big]
    if small:
        merged = dict(small[0], notes="", blocks={}, kernel="torch", kind="memory")
        merged["pass"] = f"{len(small)} small ops (per-row math, gathers)"
        for f in _SUMMED + ("flops",):
            merged[f] = sum(r[f] for r in small)
        big.append(merged)
    return big


def model_hk_torch_chunked(n: int, d: int, v: int, dtype, rates: Rates, opts: Optional[LogitOptions] = None) -> dict:
    """hykernels' torch_chunked backend on a GPU, traced (fused_loss with the CE terms). The chunk
    size is the backend's own: its first logits GEMM at the real N (traced until there)."""
    from hykernels._types import LossTerms
    from hykernels.backends import torch_chunked as tc

    name = _dtype_name(dtype)
    dt = getattr(torch, name)
    opts = opts or LogitOptions()

    def run(rows, o, stop_at=None):
        with fake_cuda(stop_at) as rec:
            cu = dict(device="cuda")
            h, w = torch.empty(rows, d, dtype=dt, **cu), torch.empty(v, d, dtype=dt, **cu)
            y = torch.zeros(rows, dtype=torch.long, **cu)
            terms = LossTerms(rd_weight=torch.empty(rows, dtype=torch.float32, **cu), vocab_size=v)
            with rec.mode:
                tc.fused_loss(h, w, None, y, o, terms, (True, True, False))
        return rec.ops

    try:
        run(n, opts, stop_at=(v, d))
        c = n
    except _Stop as stop:
        c = stop.rows
    fixed = replace(opts, chunk_size=c)
    rows = _small_passes(_affine_trace(lambda r: run(r, fixed), n, c, d, v, rates))
    rows += [p.result() for p in _hk_op_passes(n, d, v, _esize(name))]
    return _step("hk_torch_chunked", rows, rates, name, chunk_rows=c, chunks=_cdiv(n, c),
                 assumptions=[f"traced: torch_chunked.fused_loss on fake CUDA tensors; {c} rows per chunk (the "
                              "backend's own choice at this N, read off its first logits GEMM)",
                              "every aten op one kernel (eager): GEMMs as cuBLAS, elementwise ops read their inputs "
                              "and write their outputs once; launch latency not counted",
                              "the op's value checks and the backward's in-place scaling of dH and dW included"])


def _torch_lce_modules():
    """(options module, op module) of torch's chunked linear cross-entropy: this torch's own, or
    the files bench/peers.py loads for an older torch (HYKERNELS_TORCH_LCE_SRC); None if neither."""
    import peers

    src = peers.torch_lce_source()
    if src == "torch":
        from torch.nn.modules import linear_cross_entropy as op_mod
        from torch.nn.modules import linear_cross_entropy_options as opts_mod

        return opts_mod, op_mod
    if src:
        return peers._torch_lce_modules(src[len("file:"):])
    return None


def model_torch_lce(n: int, d: int, v: int, dtype, rates: Rates, reduction: str = "mean") -> dict:
    """torch's chunked F.linear_cross_entropy(options=LinearCrossEntropyOptions()) on a GPU, traced:
    its CUDA defaults (_AUTO_DEFAULTS[('cuda', dtype)], fp32 acc_dtype on sm_80+ for half inputs),
    its batch_chunk_size rule, the accumulator loop and the backward."""
    label = "torch_lce" if reduction == "mean" else "torch_lce_none"
    mods = _torch_lce_modules()
    if mods is None:
        return _unavailable(label, "torch < 2.13 has no F.linear_cross_entropy options and HYKERNELS_TORCH_LCE_SRC "
                                   "names no folder with its source")
    opts_mod, op_mod = mods
    name = _dtype_name(dtype)
    dt = getattr(torch, name)
    policy, chunking = opts_mod._AUTO_DEFAULTS.get(("cuda", dt), opts_mod._AUTO_FALLBACK)
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt  # _resolve_auto_acc_dtype on sm_80+
    o = opts_mod.LinearCrossEntropyOptions()
    chunk = max(1, o._compute_batch_chunk_size(n, d, v, chunking))

    def run(rows):
        with fake_cuda() as rec:
            cu = dict(device="cuda")
            h, w = torch.empty(rows, d, dtype=dt, **cu), torch.empty(v, d, dtype=dt, **cu)
            y = torch.zeros(rows, dtype=torch.long, **cu)
            with rec.mode:
                if reduction == "mean":
                    out = op_mod._linear_cross_entropy_batch_chunked_accumulator(
                        h, w, y, None, None, "mean", -100, 0.0, chunk, policy, acc, True, True, False)
                    ctx = types.SimpleNamespace()
                    op_mod._linear_cross_entropy_batch_chunked_setup_context(
                        ctx, (h, w, y, None, None, "mean", -100, 0.0, chunk, policy, acc, False, True, True, False), out)
                    op_mod._linear_cross_entropy_batch_chunked_backward(ctx, torch.ones((), **cu), None, None, None)
                else:
                    op_mod._linear_cross_entropy_batch_chunked_accumulator(
                        h, w, y, None, None, "none", -100, 0.0, chunk, policy, acc, False, False, False)
                    ctx = types.SimpleNamespace(needs_input_grad=(True, True, False, False, False, False, False, False,
                                                                  False))
                    ctx.save_for_backward = lambda *ts: setattr(ctx, "saved_tensors", ts)
                    op_mod._linear_cross_entropy_batch_chunked_no_reduction_setup_context(
                        ctx, (h, w, y, None, None, -100, chunk, policy, acc), None)
                    op_mod._linear_cross_entropy_batch_chunked_no_reduction_backward(
                        ctx, torch.ones(rows, dtype=dt, **cu))
        return rec.ops

    rows = _small_passes(_affine_trace(run, n, chunk, d, v, rates))
    return _step(label, rows, rates, name, chunk_rows=min(chunk, n), chunks=_cdiv(n, chunk),
                 assumptions=[f"traced: torch's chunked linear_cross_entropy (reduction={reduction!r}) on fake CUDA "
                              f"tensors; acc_policy {policy!r}, acc_dtype {str(acc).replace('torch.', '')}, "
                              f"chunking {chunking!r}: {min(chunk, n)} rows per chunk",
                              "every aten op one kernel (eager): GEMMs as cuBLAS, elementwise ops read their inputs "
                              "and write their outputs once; launch latency not counted"]
                 + (["reduction='none': forward statistics only, backward recomputes the logits: 8·N·D·V"]
                    if reduction != "mean" else []))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def model_liger_flce(n: int, d: int, v: int, dtype, rates: Rates, ce_reads: int = 2) -> dict:
    """Liger-Kernel's fused linear cross-entropy (ops/fused_linear_cross_entropy.py), mean reduction,
    accum_dtype None: per chunk a cuBLAS logits GEMM in the input dtype, liger_cross_entropy_kernel
    in place (one row per program: an online max/sum pass and a gradient pass over the row:
    ``ce_reads`` reads and one write), dH = G·W into grad_input, dW addmm into the bf16 gradient."""
    name = _dtype_name(dtype)
    e = _esize(name)
    chunk = min(_next_pow2(_cdiv(n, _cdiv(v, d))), n)  # chunk_mem_const = 1
    chunks = [min(chunk, n - r) for r in range(0, n, chunk)]
    init = _Pass("zero grad_input, grad_weight", "torch", kind="memory")
    init.memory(read=0, written=(n * d + v * d) * e)
    init.row["dw_bytes"] += v * d * e
    logits = _Pass("logits GEMM (cuBLAS, input dtype)", "cublas")
    ce = _Pass("liger_cross_entropy_kernel (in place)", "triton", kind="memory")
    dh = _Pass("dH = G·W (cuBLAS)", "cublas")
    dw = _Pass("dW += Gᵀ·H (cuBLAS addmm, dW dtype)", "cublas")
    for c in chunks:
        lib_gemm(logits, c, v, d, e, e, e, rates, w="b")
        ce.memory(read=ce_reads * e * c * v, written=e * c * v, flops=10 * c * v)
        lib_gemm(dh, c, d, v, e, e, e, rates, w="b")
        lib_gemm(dw, v, d, c, e, e, e, rates, c_read=True, dw_out=True)
    return _step("liger_flce", [init, logits, ce, dh, dw], rates, name, chunk_rows=chunk, chunks=len(chunks),
                 epilogue_bytes_per_logit=e + (ce_reads + 1) * e,
                 assumptions=[f"chunk = next_pow2(⌈N/⌈V/D⌉⌉) = {chunk} rows ({len(chunks)} chunks); logits in the input "
                              "dtype (bf16), the CE kernel overwrites them with the gradient",
                              f"CE kernel: {ce_reads} reads + 1 write per logit (Triton kernel; on Hopper with CuTe DSL "
                              "installed Liger may dispatch a CuTe CE instead)",
                              "cuBLAS GEMMs as hk_cuda's; dW (bf16, zero-filled) read and written by every chunk's addmm",
                              "mean CE: grad_output == 1, so the backward's scaling kernels are skipped; the host "
                              "sync (.item()) not counted"])


def model_liger_cute_flce(n: int, d: int, v: int, dtype, rates: Rates) -> dict:
    """Liger's SM90 CuTe DSL fused linear cross-entropy (ops/cutedsl/ops/fused_linear_cross_entropy_sm90.py):
    unchunked. Forward: logits GEMM writes BF16 logits [N, V] once; CE + dZ in place (one read, one
    write); dX = dZ·W. Backward: dW = dZᵀ·X in one GEMM (no read-modify-write), dX scaled."""
    name = _dtype_name(dtype)
    reported = ("its docstring: ~18.06 ms forward+backward at M=4096, H=4096, V=128256 bf16 on an H200 "
                "(6·M·H·V / t = 715 TFLOP/s)")
    if name != "bfloat16":
        return _unavailable("liger_cute_flce", "bf16 only", reported=reported)
    if n % 128 or v % 256:
        return _unavailable("liger_cute_flce", f"needs M % 128 == 0 and V % 256 == 0 (V = {v})", reported=reported)
    e, dp = 2, _cdiv(d, 256) * 256
    tile = LibTile(128, 256, cluster=1)
    logits, ce, dx, dw = (_Pass("logits GEMM (bf16 logits [N, V])", "cute"), _Pass("CE + dZ in place", "cute", kind="memory"),
                          _Pass("dX = dZ·W", "cute"), _Pass("dW = dZᵀ·X (backward)", "cute"))
    lib_gemm(logits, n, v, dp, e, e, e, rates, tile=tile, w="b")
    ce.memory(read=e * n * v, written=e * n * v, flops=10 * n * v)
    lib_gemm(dx, n, dp, v, e, e, e, rates, tile=tile, w="b")
    lib_gemm(dw, v, dp, n, e, e, e, rates, tile=tile, dw_out=True)
    scale = _Pass("backward: dX ·= g", "torch", kind="memory")
    scale.memory(read=n * d * e, written=n * d * e)
    return _step("liger_cute_flce", [logits, ce, dx, dw, scale], rates, name, reported=reported,
                 assumptions=["unchunked: the BF16 logits of all rows are held (2·N·V bytes) and reused as dZ",
                              f"H padded to {dp}; 128×256 WGMMA tiles, no multicast assumed; W read per group of 8 row "
                              "blocks", "CE + dZ: one read and one write per logit (its 8-CTA one-read cluster kernel)"])


def model_liger_cute_scaled(n: int, d: int, v: int, dtype, rates: Rates) -> dict:
    """Liger's SM90 CuTe DSL fused scaled cross-entropy (ops/cutedsl/ops/fused_scaled_cross_entropy_sm90.py):
    per-token NLL (the CE step as nll.sum()/T). Forward: M128×N320 tiles in cluster pairs, W
    multicast, online softmax, logits never stored. Backward: one persistent kernel, 1024-token
    waves: dZ (128×256, BF16 dZ stored), dX (128×256, W multicast to the cluster pair), dW
    (128×256; wave 0 stores, later waves TMA reduce-add into the BF16 dW)."""
    name = _dtype_name(dtype)
    reported = ("its docstring: backward 20.08 ms at M=4096, H=4096, V=131072 bf16 on an H200 (657 TFLOP/s on "
                "6·M·H·V); the forward is an extra 2·M·H·V")
    if name != "bfloat16":
        return _unavailable("liger_cute_scaled", "bf16 only", reported=reported)
    e, dp, wave = 2, _cdiv(d, 64) * 64, 1024
    waves = _cdiv(n, wave)
    fwd = _Pass("forward: logits + online softmax", "cute")
    lib_gemm(fwd, n, v, dp, e, e, 0, rates, tile=LibTile(128, 320, cluster=2), w="b", useful=False)
    fwd.row["hbm_bytes_written"] += 12 * n * _cdiv(v, 320)  # (max, sum, target) per row and vocabulary tile
    fwd.row["epilogue_flops"] += 8 * n * v
    dz, dx, dw = _Pass("backward dZ (recomputed logits)", "cute"), _Pass("backward dX = dZ·W", "cute"), \
        _Pass("backward dW (+)= dZᵀ·X", "cute")
    for i in range(waves):
        lib_gemm(dz, wave, v, dp, e, e, e, rates, tile=LibTile(128, 256, cluster=1), w="b")
        dz.row["epilogue_flops"] += 12 * wave * v
        lib_gemm(dx, wave, dp, v, e, e, e, rates, tile=LibTile(128, 256, cluster=2), w="b")
        lib_gemm(dw, v, dp, wave, e, e, e, rates, tile=LibTile(128, 256, cluster=1), c_read=i > 0, dw_out=True)
    zero = _Pass("zero dW", "torch", kind="memory")
    zero.memory(read=0, written=v * d * e, dw=True)
    return _step("liger_cute_scaled", [fwd, dz, dx, dw, zero], rates, name, reported=reported,
                 assumptions=["per-token NLL: the logits are recomputed in backward (8·N·D·V executed)",
                              f"backward in {waves} full-width waves of {wave} tokens (rows padded to whole waves)",
                              "forward W read per group of 8 row blocks; dW reduce-add reads and writes dW per wave"])


def cce_kept_fraction_random(v: int, dtype="bfloat16", block: int = 128, valid: float = 0.9) -> float:
    """The fraction of CCE's 128×128 backward blocks not skipped by its gradient filter on the bench's
    inputs (bench/measure.py: H ~ N(0, 1), W ~ N(0, 1/D), so logits ~ N(0, 1); random targets, a
    ``valid`` fraction not ignored): a block is kept when it holds a target or a p ≥ eps, eps =
    finfo(dtype).eps / 32 (cut_cross_entropy.utils._handle_eps('auto')), p = e^{z − lse},
    lse ≈ ln V + 1/2."""
    eps = torch.finfo(getattr(torch, _dtype_name(dtype))).eps / 32
    t = math.log(eps * v) + 0.5
    q = 0.5 * math.erfc(t / math.sqrt(2))
    none_big = (1 - q) ** (block * block)
    no_target = (1 - valid * block / v) ** block
    return 1 - none_big * no_target


def model_cce(n: int, d: int, v: int, dtype, rates: Rates, kept: float = 1.0, label: Optional[str] = None) -> dict:
    """Apple's Cut Cross-Entropy (impl='cce'), default configs (tl_autotune: forward and backward
    128×128×32, GROUP_B 8). Forward: the LSE kernel (logits tile in registers, locked log-add of the
    row LSE, logit averages by atomics) and the target logits. Backward: every tile recomputes its
    logits; a ``kept`` fraction of tiles (the filter skips tiles whose |softmax − onehot| < eps)
    then forms dE += dZ·C and dC += dZᵀ·E in 64-wide D blocks, each a locked read-modify-write."""
    name = _dtype_name(dtype)
    e = _esize(name)
    bb = bv = 128
    bd = 32
    nb, nv = _cdiv(n, bb), _cdiv(v, bv)
    tiles = nb * nv
    dot = 2 * tiles * bb * bv * _cdiv(d, bd) * bd
    w_bytes, times = _column_reads(v * d * e, nb, 8, rates.l2_bytes)
    fwd = _Pass("forward LSE (logits in registers)", "triton")
    fwd.add(programs=tiles, dot=dot, epilogue=6 * tiles * bb * bv, useful=0, read=n * d * e + w_bytes,
            written=4 * n, l2=tiles * _cdiv(d, bd) * bd * (bb + bv) * e, epi_bytes=4 * n,
            w_read=w_bytes, waves=_waves(tiles, rates.sms, 4), note=f"C read {times}x")
    dot_fwd = _Pass("forward target logits (indexed dot)", "triton", kind="memory")
    dot_fwd.memory(read=2 * n * d * e, written=4 * n, flops=2 * n * d)
    rec = _Pass("backward: recompute logits per tile", "triton")
    rec.add(programs=tiles, dot=dot, epilogue=8 * tiles * bb * bv, read=n * d * e + w_bytes, written=0,
            l2=tiles * _cdiv(d, bd) * bd * (bb + bv) * e, w_read=w_bytes, waves=_waves(tiles, rates.sms, 8))
    grads = _Pass(f"backward: dE, dC partial products ({kept:.0%} of tiles)", "triton")
    k_tiles = kept * tiles
    gdot = 2 * 2 * k_tiles * bb * bv * d
    touched = 1 - (1 - kept) ** 8  # a dC block read back from HBM once per group of 8 row blocks if any is kept
    dc_rmw = _cdiv(nb, 8) * touched * 2 * v * d * e
    de_rmw = 2 * n * d * e * min(1.0, kept * nv)
    grads.add(programs=int(k_tiles), dot=gdot, epilogue=2 * k_tiles * bb * bv, read=dc_rmw / 2 + de_rmw / 2,
              written=dc_rmw / 2 + de_rmw / 2, l2=k_tiles * 3 * (bb + bv) * d * e, epi_bytes=dc_rmw + de_rmw,
              w_read=0, dw=dc_rmw, waves=_waves(tiles, rates.sms, 8))
    init = _Pass("zero dE, dC", "torch", kind="memory")
    init.memory(read=0, written=(n * d + v * d) * e)
    init.row["dw_bytes"] += v * d * e
    return _step(label or "cce", [fwd, dot_fwd, init, rec, grads], rates, name, kept=kept,
                 assumptions=["tl_autotune defaults (CCE_AUTOTUNE unset): 128×128×32 tiles, GROUP_B 8",
                              f"backward: every tile recomputes its logits; {kept:.0%} of tiles kept by the gradient "
                              "filter (data-dependent; 100% = no tile skipped)",
                              "dE and dC updated by locked read-modify-writes of 128×64 blocks through L2 (3 operand-"
                              "sized transfers per partial product); lock waiting not modelled",
                              "all N rows valid (CCE skips ignored rows: the bench ignores 10%)"])


def step_models(n: int, d: int, v: int, dtype, rates: Optional[Rates] = None, names: Optional[list] = None) -> list:
    """Every model (or ``names``) of the CE training step at (N, D, V, dtype)."""
    rates = rates or Rates()
    builders: dict[str, Callable[[], dict]] = {
        "hk_triton": lambda: model_hk_triton(n, d, v, dtype, rates),
        "hk_triton_tuned": lambda: model_hk_triton(n, d, v, dtype, rates, tuned=True),
        "hk_cuda": lambda: model_hk_cuda(n, d, v, dtype, rates),
        "hk_cuda_wb": lambda: model_hk_cuda(n, d, v, dtype, rates, write_back=True, label="hk_cuda_wb"),
        "hk_torch_chunked": lambda: model_hk_torch_chunked(n, d, v, dtype, rates),
        "torch_lce": lambda: model_torch_lce(n, d, v, dtype, rates),
        "torch_lce_none": lambda: model_torch_lce(n, d, v, dtype, rates, reduction="none"),
        "liger_flce": lambda: model_liger_flce(n, d, v, dtype, rates),
        "liger_cute_flce": lambda: model_liger_cute_flce(n, d, v, dtype, rates),
        "liger_cute_scaled": lambda: model_liger_cute_scaled(n, d, v, dtype, rates),
        "cce": lambda: model_cce(n, d, v, dtype, rates),
        "cce_bench": lambda: model_cce(n, d, v, dtype, rates, kept=cce_kept_fraction_random(v, dtype),
                                       label="cce_bench"),
    }
    out = []
    for name in names or builders:
        try:
            m = builders[name]()
        except Exception as exc:  # noqa: BLE001 - a model that no longer follows its code must say so, not crash
            m = _unavailable(name, f"model failed: {type(exc).__name__}: {exc}")
        m.update(N=n, D=d, V=v, dtype=_dtype_name(dtype))
        if m["available"]:
            m["summary"] = summarize(m, rates)
        out.append(m)
    return out


MODELS = ("hk_triton", "hk_triton_tuned", "hk_cuda", "hk_cuda_wb", "hk_torch_chunked", "torch_lce", "torch_lce_none",
          "liger_flce", "liger_cute_flce", "liger_cute_scaled", "cce", "cce_bench")
DESCRIPTIONS = {
    "hk_triton": "hykernels triton, first-candidate tiles",
    "hk_triton_tuned": "hykernels triton, best predicted tiles",
    "hk_cuda": "hykernels cuda (no write-back at identity)",
    "hk_cuda_wb": "hykernels cuda, stats write-back always",
    "hk_torch_chunked": "hykernels torch_chunked on a GPU",
    "torch_lce": "torch F.linear_cross_entropy, mean",
    "torch_lce_none": "torch F.linear_cross_entropy, none",
    "liger_flce": "Liger fused linear CE (Triton CE)",
    "liger_cute_flce": "Liger CuTe SM90 FLCE (unchunked)",
    "liger_cute_scaled": "Liger CuTe SM90 fused scaled CE",
    "cce": "Cut Cross-Entropy, no tile filtered",
    "cce_bench": "Cut Cross-Entropy, bench inputs",
}


def summarize(m: dict, rates: Rates) -> dict:
    """The table's numbers of one model: predicted ms (and the overlapped lower end), efficiency =
    6·N·D·V / t / matmul rate, bound, GB moved (HBM), L2 GB, W reads and dW traffic GB, the pass
    that costs most."""
    t = m["total"]
    ndv6 = 6 * m["N"] * m["D"] * m["V"]
    mm = rates.matmul_for(m["dtype"])
    top = max(m["passes"], key=lambda r: r["roofline_ms"])
    return dict(ms=t["roofline_ms"], overlap_ms=t["overlap_ms"], efficiency=ndv6 / (t["roofline_ms"] * 1e-3) / mm,
                efficiency_high=ndv6 / (t["overlap_ms"] * 1e-3) / mm, bound=t["bound"],
                hbm_gb=(t["hbm_bytes_read"] + t["hbm_bytes_written"]) / 1e9, l2_gb=t["l2_bytes"] / 1e9,
                w_read_gb=t["w_read_bytes"] / 1e9, dw_gb=t["dw_bytes"] / 1e9, executed_ndv=t["dot_flops"] / (ndv6 / 6),
                top_pass=top["pass"], top_ms=top["roofline_ms"], top_bound=top["bound"],
                by_bound={k: round(ms, 3) for k, ms in t["by_bound"].items()})


def comparison_table(models: list, rates: Rates) -> str:
    """Markdown: one row per model of the CE step at one shape."""
    m0 = models[0]
    head = (f"CE training step (forward + backward) at N={m0['N']}, D={m0['D']}, V={m0['V']}, {m0['dtype']}; "
            f"matmul {rates.matmul / 1e12:.0f} TFLOP/s, HBM {rates.hbm / 1e12:.2g} TB/s, L2 {rates.l2 / 1e12:.2g} TB/s, "
            f"{rates.sms} SMs. Predictions, not measurements.")
    cols = ["model", "what", "predicted ms", "range ms", "efficiency", "bound", "GB HBM", "GB L2", "W reads GB",
            "dW GB", "×N·D·V run", "costs most"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"]
                                                                     + ["---:"] * 5 + ["---"]) + "|"]
    for m in models:
        if not m["available"]:
            lines.append(f"| {m['name']} | {DESCRIPTIONS.get(m['name'], '')} | n/a | | | | | | | | | {m['reason']} |")
            continue
        s = m["summary"]
        lines.append("| " + " | ".join([
            m["name"], DESCRIPTIONS.get(m["name"], ""), f"{s['ms']:.1f}", f"{s['overlap_ms']:.1f}–{s['ms']:.1f}",
            f"{s['efficiency']:.2f} ({s['efficiency_high']:.2f})", s["bound"], f"{s['hbm_gb']:.0f}", f"{s['l2_gb']:.0f}",
            f"{s['w_read_gb']:.0f}", f"{s['dw_gb']:.0f}", f"{s['executed_ndv']:.1f}",
            f"{s['top_pass']}: {s['top_ms']:.1f} ms ({s['top_bound']})"]) + " |")
    lines += ["", "efficiency = 6·N·D·V / predicted time / matmul rate (in brackets: with every epilogue overlapped); "
                  "range = overlapped … serial epilogues; ×N·D·V run = executed GEMM FLOPs / (N·D·V)"]
    reported = [f"{m['name']}: {m['reported']}" for m in models if m.get("reported")]
    if reported:
        lines += ["", "reported by the peers' sources (not by this project): " + "; ".join(dict.fromkeys(reported))]
    return "\n".join(lines)


def model_passes_table(m: dict) -> str:
    """Markdown: the passes of one model with their times and bounds."""
    cols = ["pass", "launches", "TFLOP run", "GB HBM", "GB L2", "compute ms", "HBM ms", "L2 ms", "epilogue ms",
            "predicted ms", "bound"]
    lines = [f"{m['name']} ({DESCRIPTIONS.get(m['name'], '')}):", "", "| " + " | ".join(cols) + " |",
             "|---|" + "---:|" * 9 + "---|"]
    for r in sorted(m["passes"], key=lambda r: -r["roofline_ms"]):
        lines.append("| " + " | ".join([
            r["pass"], str(int(r["launches"])), _g(r["dot_flops"], 1e12), _g(r["hbm_bytes_read"] + r["hbm_bytes_written"], 1e9),
            _g(r["l2_bytes"], 1e9), _g(r["compute_ms"], 1), _g(r["hbm_ms"], 1), _g(r["l2_ms"], 1), _g(r["epilogue_ms"], 1),
            _g(r["roofline_ms"], 1), r["bound"]]) + " |")
    lines += [""] + [f"- {a}" for a in m["assumptions"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the bench report's section (bench/run.py, bench/report.py)
# --------------------------------------------------------------------------------------------

def case_key(case: dict) -> tuple:
    """What a roofline entry and a bench result are matched on."""
    return case["workload"], case["D"], case["V"], case["N"], case["dtype"]


# What each bench workload runs on the triton backend: (forward ops, backward ops).
WORKLOAD_OPS = {"ce": (("fused_loss",), ()), "rd_rlif": (("fused_loss",), ()),
                "token_stats": (("token_stats",), ("token_stats_bwd",)),
                "prg": (("token_stats",), ("token_stats_bwd",))}


def bench_section(cases: list[dict], device_sms: Optional[int] = None, **kwargs) -> dict:
    """The JSON report's ``roofline`` section: this model for hk_triton at every case (one entry
    per distinct workload/D/V/N/dtype), with fwd/bwd/total predicted times to set beside the
    measured ones."""
    sms = device_sms or DEVICE_SMS
    entries, seen = [], set()
    try:
        for c in cases:
            key = case_key(c)
            if key in seen or c["workload"] not in WORKLOAD_OPS:
                continue
            seen.add(key)
            fwd, bwd = WORKLOAD_OPS[c["workload"]]
            ops = {op: roofline(op, c["N"], c["D"], c["V"], c["dtype"], device_sms=sms, **kwargs) for op in fwd + bwd}
            ms = {part: sum(ops[op]["total"]["roofline_ms"] for op in names) for part, names in (("fwd", fwd),
                                                                                                   ("bwd", bwd))}
            entries.append(dict(workload=c["workload"], model=c["model"], D=c["D"], V=c["V"], N=c["N"],
                                dtype=c["dtype"], fwd_ms=ms["fwd"], bwd_ms=ms["bwd"], total_ms=ms["fwd"] + ms["bwd"],
                                ideal_ms=sum(o["ideal_ms"] for o in ops.values()), ops=ops))
    except Exception as exc:  # noqa: BLE001 - a model that no longer follows the backend must not end a run
        return {"error": f"{type(exc).__name__}: {exc}", "cases": entries}
    return {"model": "bench/roofline.py: hk_triton's passes, FLOPs from tiles and loop bounds, L2 operand bytes per "
                     "tile, HBM bytes from its L2 model; t = max(compute, HBM, L2) + epilogue per pass, summed; "
                     "matmul 790 TFLOP/s (reported), HBM 4.3 TB/s (reported), L2 9 TB/s (estimate); default tiles "
                     "each autotune table's first candidate. A prediction, not a measurement",
            "device_sms": sms, "impl": "hk_triton", "cases": entries}


# --------------------------------------------------------------------------------------------
# the per-op table of the triton backend
# --------------------------------------------------------------------------------------------

def _g(x: float, scale: float) -> str:
    return f"{x / scale:.3g}"


def table(r: dict) -> str:
    pk = r["peaks"]
    head = (f"{r['op']} at N={r['N']}, D={r['D']}, V={r['V']}, {r['dtype']}: {r['chunks']} chunk(s) of "
            f"{r['chunk_rows']} rows, workspace {r['workspace_bytes'] / 2**20:.0f} MiB; matmul {pk['flops'] / 1e12:.0f} "
            f"TFLOP/s, {pk['vector_flops'] / 1e12:.0f} TFLOP/s (epilogues), HBM {pk['hbm_bytes_per_s'] / 1e12:.2g} TB/s, "
            f"L2 {pk['l2_bytes_per_s'] / 1e12:.2g} TB/s, {r['device_sms']} SMs")
    cols = ["pass", "kernel", "tile m×n×k/g", "launches", "programs", "TFLOP exec", "TFLOP useful", "GB L2", "GB read",
            "GB written", "compute ms", "L2 ms", "HBM ms", "epilogue ms", "predicted ms", "bound"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 12 + ["---"]) + "|"]
    for p in r["passes"]:
        b = p["blocks"]
        tile = (f"{b['BLOCK_M']}×{b['BLOCK_N']}×{b['BLOCK_K']}/{b['GROUP_M']}" if "BLOCK_K" in b else
                f"{b['BLOCK_R']}×{b['BLOCK_V']}" if "BLOCK_R" in b else "-")
        lines.append("| " + " | ".join([p["pass"], p["kernel"], tile, str(p["launches"]), str(p["programs"]),
                                         _g(p["flops"], 1e12), _g(p["useful_flops"], 1e12), _g(p["l2_bytes"], 1e9),
                                         _g(p["hbm_bytes_read"], 1e9), _g(p["hbm_bytes_written"], 1e9),
                                         _g(p["compute_ms"], 1), _g(p["l2_ms"], 1), _g(p["hbm_ms"], 1),
                                         _g(p["epilogue_ms"], 1), _g(p["roofline_ms"], 1), p["bound"]]) + " |")
    t = r["total"]
    lines.append("| **total** | | | | | " + " | ".join([
        _g(t["flops"], 1e12), _g(t["useful_flops"], 1e12), _g(t["l2_bytes"], 1e9), _g(t["hbm_bytes_read"], 1e9),
        _g(t["hbm_bytes_written"], 1e9)]) + f" | | | | | **{t['roofline_ms']:.3g}** | {t['bound']} |")
    ndv = r["N"] * r["D"] * r["V"]
    lines += ["", f"useful FLOPs = {t['useful_flops'] / ndv:g}·N·D·V; ideal (useful FLOPs at the matmul rate) "
                  f"{r['ideal_ms']:.3g} ms; predicted / ideal = {t['roofline_ms'] / r['ideal_ms']:.3f}; W reads "
                  f"{t['w_read_bytes'] / 1e9:.3g} GB, dW traffic {t['dw_bytes'] / 1e9:.3g} GB"
              + (f"; {r['path']}" if r.get("path") else "")]
    notes = [f"{p['pass']}: {p['notes']}" for p in r["passes"] if p["notes"]]
    return "\n".join(lines + ([f"notes: {'; '.join(notes)}"] if notes else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lmhead", help="bench preset whose shapes to model (default lmhead)")
    p.add_argument("--models", nargs="+", help="model shapes (presets' names or D:V) instead of the preset's")
    p.add_argument("--n", type=int, nargs="+", help="rows N instead of the preset's")
    p.add_argument("--dtypes", nargs="+", choices=list(MATMUL_FLOPS), help="dtypes instead of the preset's")
    p.add_argument("--impls", nargs="+", choices=MODELS, help="which step models (default all)")
    p.add_argument("--matmul-tflops", type=float, default=MATMUL_FLOPS["bfloat16"] / 1e12,
                   help="bf16/fp16 matmul rate, TFLOP/s (default 790, reported for an H200)")
    p.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)  # the former name
    p.add_argument("--fp32-tflops", type=float, default=MATMUL_FLOPS["float32"] / 1e12, help="fp32 IEEE dot rate")
    p.add_argument("--vector-tflops", type=float, default=VECTOR_FLOPS / 1e12)
    p.add_argument("--hbm-tbs", type=float, default=HBM_BYTES_PER_S / 1e12, help="HBM bandwidth, TB/s (default 4.3)")
    p.add_argument("--l2-tbs", type=float, default=L2_BYTES_PER_S / 1e12, help="L2 read bandwidth, TB/s (default 9.0, "
                                                                                "an estimate)")
    p.add_argument("--sms", type=int, default=DEVICE_SMS, help="multiprocessors (vocabulary splits, waves)")
    p.add_argument("--passes", action="store_true", help="also print each model's passes and the triton per-op tables")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, help="with --passes: the triton ops to tabulate")
    p.add_argument("--workspace-mb", type=int, default=None, help="triton chunk budget (default: the backend's)")
    p.add_argument("--json", default=None, help="also write the models to this JSON file")
    args = p.parse_args(argv)
    import presets  # bench/presets.py: the presets and model shapes

    matmul = (args.peak_tflops or args.matmul_tflops) * 1e12
    rates = Rates(matmul=matmul, fp32_matmul=args.fp32_tflops * 1e12, vector=args.vector_tflops * 1e12,
                  hbm=args.hbm_tbs * 1e12, l2=args.l2_tbs * 1e12, sms=args.sms)
    preset = presets.PRESETS[args.preset]
    print("rates: " + "; ".join(f"{k}: {v}" for k, v in RATE_SOURCES.items()) + "\n")
    out = []
    for model in args.models or preset["models"]:
        d, v = presets.shape_of(model)
        for dtype in args.dtypes or preset["dtypes"]:
            for n in args.n or preset["n"]:
                ms = step_models(n, d, v, dtype, rates, args.impls)
                print(comparison_table(ms, rates) + "\n")
                entry = dict(N=n, D=d, V=v, dtype=dtype, rates=asdict(rates), models=ms)
                if args.passes:
                    for m in ms:
                        if m["available"]:
                            print(model_passes_table(m) + "\n")
                    entry["triton_ops"] = []
                    for op in args.ops or OPS:
                        r = roofline(op, n, d, v, dtype, device_sms=args.sms,
                                     workspace_bytes=None if args.workspace_mb is None else args.workspace_mb * 2**20,
                                     peak_flops=rates.matmul_for(dtype), vector_flops=rates.vector,
                                     hbm_bytes_per_s=rates.hbm, l2_bytes_per_s=rates.l2)
                        entry["triton_ops"].append(r)
                        print(table(r) + "\n")
                out.append(entry)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
