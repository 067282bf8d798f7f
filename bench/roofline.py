#!/usr/bin/env python
"""The triton backend's passes as FLOPs and HBM bytes, and their roofline time on a GPU.

    python bench/roofline.py                                   # the lmhead preset's shapes, bf16
    python bench/roofline.py --models 4096:151936 --n 16384    # one shape
    python bench/roofline.py --ops fused_loss --json out.json

A model of hykernels/backends/triton computed from the kernels' own tile sizes and loop bounds,
through the backend's own planning functions (chunk_rows, split_for, _padded, GRAD_INPLACE, the
_configs tables), so that it follows the code: per chunk and launch, the grid is the number of
tiles and each program's loops run ⌈extent/BLOCK⌉ steps.

FLOPs. A tl.dot of an m×k by a k×n tile is 2·m·n·k FLOPs, counted for every program and k step
the grid runs, padded tiles included (``dot_flops``); ``useful_flops`` is 2·rows·D·V per GEMM pass
(so 6·N·D·V for fused_loss, 2·N·D·V + 6·N·D·V for token_stats and its backward). Epilogues are
EPILOGUE_FLOPS per element of every (padded) output tile the kernel forms: a documented
estimate (exp, tanh and compares count one each; softcap and bias not included).

HBM bytes, from this L2 model (fits H200's 60 MB L2 at the lmhead shapes):
  - A grouped-order GEMM (_tiles._grouped: GROUP_M row blocks sweep the column blocks together)
    reads its row operand from HBM once (a row block's panel stays in L2 while its group sweeps
    the columns) and its column operand once per group of GROUP_M row blocks, ⌈num_m/GROUP_M⌉
    times, unless the whole column operand fits in half the L2 (``l2_bytes``/2): then once.
        logits_fwd, logits_grad  row operand H chunk, column operand W (per split: W's slice)
        dh_gemm                  row operand G (the gradient tile), column operand W
        dw_gemm                  row operand Gᵀ, column operand the H chunk (4 MiB: once)
  - Every output is written once, in its dtype: logits_fwd's partials 24 B per row and split
    (m, s, t, u, z_y fp32, argmax int32) and with STORE_Z the fp32 logits (4 B per logit);
    gradient tiles 2 B (half) or 4 B (fp32) per logit; dH per row; dW per chunk, and dw_gemm with
    BETA (every chunk but the first) reads dW once more; an fp32 dW (fp16 weights, or
    HYKERNELS_FP32_ACCUMULATE=1) costs a final torch cast (4 B read, 2 B written per entry).
  - grad_inplace reads 4 B per logit and writes 2 B (half) or 4 B (fp32); the per-row inputs
    (targets int64, lse, lse_lo, 4 coefficients fp32) are 32 B per row, read once.
  - Out-of-bounds tile elements are masked (or zero-filled by TMA): no bytes. No atomics anywhere.
Not modelled: the host's O(rows·splits) merges and coefficient math between the kernels, db
(bias), the fp16 per-chunk scale's host sync, launch latency.

Roofline per pass: t = max(dot_flops/peak + epilogue_flops/vector_peak, bytes/bandwidth), the
passes summed (they run one after another); ``ideal_ms`` = useful_flops/peak, the time of the
useful FLOPs alone. Defaults are NVIDIA's H200 datasheet numbers (dense bf16/fp16 ~990 TFLOP/s,
plain fp32 ~67 TFLOP/s, HBM3e 4.8 TB/s, 132 SMs, 60 MB L2). Real machines reach less (an 8192³ bf16
matmul on random data is reported near ~790 TFLOP/s, a device-to-device copy near ~4.3 TB/s; not
yet measured by this project), so expect measured/roofline ≥ ~1.25 at best. fp32 inputs use
IEEE FMA dots (no tensor cores): their dot peak is the fp32 one.

Tile sizes on a GPU come from autotuning: pass the chosen ones per kernel (``blocks_by_kernel``,
Blocks or the constexpr dict _configs.launch returns); the default is each table's first
candidate for the dtype on sm_90. The lmhead bench run (bench/run.py) stores this model for
hk_triton at each case in its JSON's ``roofline`` section and reports measured / roofline time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Union

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from hykernels._grad import FP32_ACCUMULATE  # noqa: E402
from hykernels._types import LogitOptions  # noqa: E402
from hykernels.backends import triton as tb  # noqa: E402  (no Triton import: kernels load lazily)

OPS = ("fused_loss", "token_stats", "token_stats_bwd")
# An H200 (NVIDIA datasheet numbers): dense tensor-core rate, plain fp32 rate, HBM3e.
PEAK_FLOPS = {"bfloat16": 990e12, "float16": 990e12, "float32": 67e12}
VECTOR_FLOPS = 67e12
HBM_BYTES_PER_S = 4.8e12
DEVICE_SMS = 132
L2_BYTES = 60 * 10**6
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


def _column_reads(size: int, num_m: int, group_m: int, l2_bytes: int) -> tuple[int, int]:
    """(bytes, times) a grouped GEMM's column operand of ``size`` bytes is read from HBM."""
    times = 1 if size <= l2_bytes // 2 else _cdiv(num_m, group_m)
    return times * size, times


class _Pass:
    """One pass (one kernel) summed over its launches."""

    def __init__(self, name: str, kernel: str, blocks: dict):
        self.row = dict(name=name, kernel=kernel, blocks=blocks, launches=0, programs=0, dot_flops=0,
                        epilogue_flops=0, useful_flops=0, hbm_bytes_read=0, hbm_bytes_written=0, atomics=0)
        self.notes: list[str] = []

    def add(self, programs=0, dot=0, epilogue=0, useful=0, read=0, written=0, note=None):
        r = self.row
        r["launches"] += 1
        r["programs"] += programs
        r["dot_flops"] += dot
        r["epilogue_flops"] += epilogue
        r["useful_flops"] += useful
        r["hbm_bytes_read"] += read
        r["hbm_bytes_written"] += written
        if note and note not in self.notes:
            self.notes.append(note)

    def result(self) -> dict:
        r = dict(self.row, notes="; ".join(self.notes))
        r["pass"] = r.pop("name")
        r["flops"] = r["dot_flops"] + r["epilogue_flops"]
        return r

    def gemm(self, rows: int, cols: int, depth: int, row_op: int, col_op: int, written: int, l2: int,
             useful: bool = True, extra_read: int = 0, epilogue: Optional[int] = None, col_name: str = "") -> None:
        """One launch of a grouped-order GEMM over a rows × cols output, reduction ``depth``:
        ``row_op``/``col_op`` the bytes of its row/column operand."""
        t = self.row["blocks"]
        num_m, num_n = _cdiv(rows, t["BLOCK_M"]), _cdiv(cols, t["BLOCK_N"])
        steps = _cdiv(depth, t["BLOCK_K"])
        col_bytes, times = _column_reads(col_op, num_m, t["GROUP_M"], l2)
        tiles = num_m * num_n
        per_elem = EPILOGUE_FLOPS[self.row["kernel"]] if epilogue is None else epilogue
        self.add(programs=tiles, dot=tiles * steps * 2 * t["BLOCK_M"] * t["BLOCK_N"] * t["BLOCK_K"],
                 epilogue=per_elem * tiles * t["BLOCK_M"] * t["BLOCK_N"],
                 useful=2 * rows * cols * depth if useful else 0, read=row_op + col_bytes + extra_read,
                 written=written, note=f"{col_name} read {times}x per launch")


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
    e = torch.empty((), dtype=getattr(torch, name)).element_size()
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
            w_bytes, times = _column_reads(v * d * e, num_m, t["GROUP_M"], l2_bytes)
            tile = t["BLOCK_M"] * t["BLOCK_N"]
            p.add(programs=num_m * s, dot=num_m * col_tiles * _cdiv(d, t["BLOCK_K"]) * 2 * tile * t["BLOCK_K"],
                  epilogue=EPILOGUE_FLOPS["logits_fwd"] * num_m * col_tiles * tile, useful=2 * c * d * v,
                  read=c * d * e + w_bytes + TARGET_BYTES * c,
                  written=(4 * c * v if store_z else 0) + PARTIAL_BYTES * s * c,
                  note=f"{s} vocabulary splits of {width}; W read {times}x per launch")
        out["splits"] = splits[0] if len(set(splits)) == 1 else splits
        passes.append(p)

    def grad_gemms(rows_list, g_bytes):
        """dH = G·W and dW (+)= Gᵀ·H per chunk; G has ``g_bytes`` per entry."""
        dh = _Pass("dH = G·W", "dh_gemm", tiles["dh_gemm"])
        dw = _Pass("dW += Gᵀ·H", "dw_gemm", tiles["dw_gemm"])
        for i, c in enumerate(rows_list):
            if needs[0]:
                dh.gemm(c, d, v, row_op=c * v * g_bytes, col_op=v * d * e, written=c * d * e, l2=l2_bytes,
                        col_name="W")
            if needs[1]:
                beta = i > 0
                dw.gemm(v, d, c, row_op=c * v * g_bytes, col_op=c * d * e, written=v * d * dw_bytes, l2=l2_bytes,
                        extra_read=v * d * dw_bytes if beta else 0, epilogue=EPILOGUE_FLOPS["dw_gemm"] + beta,
                        col_name="H chunk")
        passes.extend(p for p, need in ((dh, needs[0]), (dw, needs[1])) if need)
        if needs[1] and dw_bytes != e:
            cast = _Pass("dW fp32 → dtype", "torch cast", {})
            cast.add(read=4 * v * d, written=e * v * d, note="fp32 dW accumulator cast once at the end")
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
                   extra_read=ROW_INPUT_BYTES * c, col_name="W")
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
                p = _Pass("gradient tile (in place)", "grad_inplace", tiles["grad_inplace"])
                br, bv = p.row["blocks"]["BLOCK_R"], p.row["blocks"]["BLOCK_V"]
                for c in rows_list:
                    progs = _cdiv(c, br)
                    p.add(programs=progs, epilogue=EPILOGUE_FLOPS["grad_inplace"] * progs * br * _cdiv(v, bv) * bv,
                          read=4 * c * v + ROW_INPUT_BYTES * c, written=g_bytes * c * v)
                passes.append(p)
                grad_gemms(rows_list, g_bytes)
    out["passes"] = [p.result() for p in passes]
    return out


def triton_passes(op: str, n: int, d: int, v: int, dtype, **kwargs) -> list[dict]:
    """The passes of plan(): {pass, kernel, blocks, launches, programs, flops (= dot_flops +
    epilogue_flops), useful_flops, hbm_bytes_read, hbm_bytes_written, atomics: 0, notes} each."""
    return plan(op, n, d, v, dtype, **kwargs)["passes"]


def roofline(op: str, n: int, d: int, v: int, dtype, peak_flops: Optional[float] = None,
             vector_flops: float = VECTOR_FLOPS, hbm_bytes_per_s: float = HBM_BYTES_PER_S, **kwargs) -> dict:
    """plan() with each pass's roofline time (ms) and bound, the total and the ideal time."""
    p = plan(op, n, d, v, dtype, **kwargs)
    peak = PEAK_FLOPS[p["dtype"]] if peak_flops is None else peak_flops
    for r in p["passes"]:
        r["compute_ms"] = 1e3 * (r["dot_flops"] / peak + r["epilogue_flops"] / vector_flops)
        r["memory_ms"] = 1e3 * (r["hbm_bytes_read"] + r["hbm_bytes_written"]) / hbm_bytes_per_s
        r["roofline_ms"] = max(r["compute_ms"], r["memory_ms"])
        r["bound"] = "compute" if r["compute_ms"] >= r["memory_ms"] else "memory"
    keys = ("flops", "dot_flops", "epilogue_flops", "useful_flops", "hbm_bytes_read", "hbm_bytes_written",
            "roofline_ms")
    p["total"] = {k: sum(r[k] for r in p["passes"]) for k in keys}
    p["ideal_ms"] = 1e3 * p["total"]["useful_flops"] / peak
    p["peaks"] = dict(flops=peak, vector_flops=vector_flops, hbm_bytes_per_s=hbm_bytes_per_s)
    return p


def case_key(case: dict) -> tuple:
    """What a roofline entry and a bench result are matched on."""
    return case["workload"], case["D"], case["V"], case["N"], case["dtype"]


# What each bench workload runs on the triton backend: (forward ops, backward ops).
WORKLOAD_OPS = {"ce": (("fused_loss",), ()), "rd_rlif": (("fused_loss",), ()),
                "token_stats": (("token_stats",), ("token_stats_bwd",)),
                "prg": (("token_stats",), ("token_stats_bwd",))}


def bench_section(cases: list[dict], device_sms: Optional[int] = None, **kwargs) -> dict:
    """The JSON report's ``roofline`` section: this model for hk_triton at every case (one entry
    per distinct workload/D/V/N/dtype), with fwd/bwd/total roofline times to set beside the
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
    return {"model": "bench/roofline.py: hk_triton's passes, FLOPs from tiles and loop bounds, HBM bytes from "
                     "its L2 model; t = max(compute, bytes/bandwidth) per pass, summed; default peaks an "
                     "H200's datasheet numbers, default tiles each autotune table's first candidate",
            "device_sms": sms, "impl": "hk_triton", "cases": entries}


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

def _g(x: float, scale: float) -> str:
    return f"{x / scale:.3g}"


def table(r: dict) -> str:
    pk = r["peaks"]
    head = (f"{r['op']} at N={r['N']}, D={r['D']}, V={r['V']}, {r['dtype']}: {r['chunks']} chunk(s) of "
            f"{r['chunk_rows']} rows, workspace {r['workspace_bytes'] / 2**20:.0f} MiB; peaks {pk['flops'] / 1e12:.0f} "
            f"TFLOP/s (dots), {pk['vector_flops'] / 1e12:.0f} TFLOP/s (epilogues), "
            f"{pk['hbm_bytes_per_s'] / 1e12:.2g} TB/s, {r['device_sms']} SMs")
    cols = ["pass", "kernel", "tile m×n×k/g", "launches", "programs", "TFLOP exec", "TFLOP useful", "GB read",
            "GB written", "compute ms", "memory ms", "roofline ms", "bound"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 9 + ["---"]) + "|"]
    for p in r["passes"]:
        b = p["blocks"]
        tile = (f"{b['BLOCK_M']}×{b['BLOCK_N']}×{b['BLOCK_K']}/{b['GROUP_M']}" if "BLOCK_K" in b else
                f"{b['BLOCK_R']}×{b['BLOCK_V']}" if "BLOCK_R" in b else "-")
        lines.append("| " + " | ".join([p["pass"], p["kernel"], tile, str(p["launches"]), str(p["programs"]),
                                         _g(p["flops"], 1e12), _g(p["useful_flops"], 1e12),
                                         _g(p["hbm_bytes_read"], 1e9), _g(p["hbm_bytes_written"], 1e9),
                                         _g(p["compute_ms"], 1), _g(p["memory_ms"], 1), _g(p["roofline_ms"], 1),
                                         p["bound"]]) + " |")
    t = r["total"]
    lines.append("| **total** | | | | | " + " | ".join([
        _g(t["flops"], 1e12), _g(t["useful_flops"], 1e12), _g(t["hbm_bytes_read"], 1e9),
        _g(t["hbm_bytes_written"], 1e9)]) + f" | | | **{t['roofline_ms']:.3g}** | |")
    ndv = r["N"] * r["D"] * r["V"]
    lines += ["", f"useful FLOPs = {t['useful_flops'] / ndv:g}·N·D·V; ideal (useful FLOPs at peak) "
                  f"{r['ideal_ms']:.3g} ms; roofline / ideal = {t['roofline_ms'] / r['ideal_ms']:.3f}"
              + (f"; {r['path']}" if r.get("path") else "")]
    notes = [f"{p['pass']}: {p['notes']}" for p in r["passes"] if p["notes"]]
    return "\n".join(lines + ([f"notes: {'; '.join(notes)}"] if notes else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lmhead", help="bench/run.py preset whose shapes to model (default lmhead)")
    p.add_argument("--models", nargs="+", help="model shapes (run.py's names or D:V) instead of the preset's")
    p.add_argument("--n", type=int, nargs="+", help="rows N instead of the preset's")
    p.add_argument("--dtypes", nargs="+", choices=list(PEAK_FLOPS), help="dtypes instead of the preset's")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--sms", type=int, default=DEVICE_SMS, help="multiprocessors (vocabulary splits)")
    p.add_argument("--workspace-mb", type=int, default=None, help="chunk budget (default: the backend's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dot peak (default: H200 datasheet per dtype)")
    p.add_argument("--vector-tflops", type=float, default=VECTOR_FLOPS / 1e12)
    p.add_argument("--hbm-tbs", type=float, default=HBM_BYTES_PER_S / 1e12, help="HBM bandwidth, TB/s")
    p.add_argument("--json", default=None, help="also write the models to this JSON file")
    args = p.parse_args(argv)
    import presets  # bench/presets.py: the presets and model shapes

    preset = presets.PRESETS[args.preset]
    out = []
    for model in args.models or preset["models"]:
        d, v = presets.shape_of(model)
        for dtype in args.dtypes or preset["dtypes"]:
            for n in args.n or preset["n"]:
                for op in args.ops:
                    r = roofline(op, n, d, v, dtype, device_sms=args.sms,
                                 workspace_bytes=None if args.workspace_mb is None else args.workspace_mb * 2**20,
                                 peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12,
                                 vector_flops=args.vector_tflops * 1e12, hbm_bytes_per_s=args.hbm_tbs * 1e12)
                    out.append(r)
                    print(table(r) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
