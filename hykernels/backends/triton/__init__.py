"""Triton backend: fully fused, the [N, V] logits never reach global memory.

Forward: ``stats_fwd`` streams the vocabulary per token block (split over a few programs per
block for parallelism; partials merged here in O(N·splits)). Backward: ``logits_bwd``
recomputes each logits tile and applies §2's four per-row scalars, accumulating dH and dW in
fp32 with atomics (run-to-run bits may differ in the last place).

fused_loss: statistics pass, the closed-form §5 coefficients (hykernels/_grad.py, O(N)), then
the gradient pass, all inside the forward call. That is 2 + 2 + 4 = 8·N·D·V FLOPs: a row's
gradient needs its full-vocabulary lse, which a tile only knows after the whole row has been
streamed, so without keeping logits somewhere the tile must be recomputed. The 6·N·D·V design
(a bounded logits workspace per token chunk) belongs to the cuda backend.

Extra memory: O(N·splits) statistics, the fp32 dH/dW/db accumulators (the gradients
themselves for fp32 inputs), nothing of size N×V.

Segment ops (answer-span sums, PRG) run the kernels of _segment_kernels.py, fp32 throughout.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..._checks import target_mask
from ..._grad import fp16_grad_scale, grad_bound, loss_by_recompute
from ..._partials import Partials, finish, slice_counts
from ..._types import PRG_VARIANTS, LogitOptions, LossTerms, RowCoefs, TokenStats
from .. import _dense

NAME = "triton"
# fp32 accumulation throughout: fp64 inputs would silently lose precision, so they are refused.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None  # the Triton interpreter: for tests, ~1000× slower than a GPU
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import, for tests); got {device.type}"


@dataclass(frozen=True)
class Blocks:
    m: int
    n: int
    k: int
    splits: Optional[int] = None  # vocabulary splits of the forward; None = enough to fill the GPU
    num_warps: int = 8
    num_stages: int = 3


# Set to a Blocks to override the choice below (tests use small blocks for ragged tiles).
OVERRIDE: Optional[Blocks] = None


def gpu_blocks(dtype: torch.dtype) -> Blocks:
    """GPU tile defaults: the largest tiles that compile without register spills on sm_80 and
    sm_90a (tests/compile_triton.py fails on a spill; ptxas -v there prints the counts). At
    128×128×64 both kernels spilled 0.4–1.4 KB per thread at 255 registers (the logits tile, its
    exponentials and the gradient tile are all live at once); 64×128×32 uses 205–241 registers
    and no spills. fp32 tiles are twice the bytes: 64×64×32 is spill-free with triton 3.6 and
    3.9 and within an A100's shared memory."""
    if dtype == torch.float32:
        return Blocks(m=64, n=64, k=32, num_stages=2)
    return Blocks(m=64, n=128, k=32)


def choose_blocks(n: int, vocab: int, dim: int, device: torch.device, dtype: torch.dtype) -> Blocks:
    if OVERRIDE is not None:
        return OVERRIDE
    if device.type != "cuda":  # interpreter: big blocks, the per-op cost dominates
        return Blocks(m=64, n=512, k=64)
    return gpu_blocks(dtype)


def _split_plan(n: int, vocab: int, blocks: Blocks, device: torch.device) -> tuple[int, int]:
    """(tiles per split, splits) so that row blocks × splits fills the device, no split empty."""
    tiles = math.ceil(vocab / blocks.n)
    if blocks.splits is not None:
        want = blocks.splits
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, math.ceil(2 * sms / math.ceil(n / blocks.m)))
    else:
        want = 1
    per = math.ceil(tiles / min(want, tiles))
    return per, math.ceil(tiles / per)


def _common(hidden, weight, bias, opts: LogitOptions):
    from . import _kernels  # noqa: F401  (imported lazily: TRITON_INTERPRET is read at decoration)

    hidden, weight = hidden.contiguous(), weight.contiguous()
    fp32 = hidden.dtype == torch.float32
    return dict(
        args=dict(D=hidden.shape[1], stride_h=hidden.stride(0), stride_w=weight.stride(0),
                  inv_temp=1.0 / opts.temperature, softcap=opts.softcap or 1.0),
        meta=dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
                  UPCAST=_interpreting(), IEEE=fp32),
        hidden=hidden, weight=weight,
    )


def _launch_opts(blocks: Blocks, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    """Online-softmax partials of each vocabulary split (hykernels/_partials.py)."""
    from ._kernels import stats_fwd

    n, vocab = hidden.shape[0], weight.shape[0]
    c = _common(hidden, weight, bias, opts)
    blocks = choose_blocks(n, vocab, hidden.shape[1], hidden.device, hidden.dtype)
    per, splits = _split_plan(n, vocab, blocks, hidden.device)
    valid, _ = target_mask(targets, vocab, opts.ignore_index)
    y = torch.where(valid, targets, torch.full_like(targets, -1))  # -1 never matches a column
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s, t, u, zy = (torch.empty(splits, n, **f32) for _ in range(5))
    am = torch.empty(splits, n, dtype=torch.int32, device=hidden.device)
    grid = (math.ceil(n / blocks.m), splits)
    stats_fwd[grid](c["hidden"], c["weight"], bias, y, m, s, t, u, zy, am, n, vocab, tiles_per_split=per,
                    BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, **c["args"], **c["meta"],
                    **_launch_opts(blocks, hidden.device))
    return Partials(m, s, t, u, zy, am.long(), slice_counts(vocab, per * blocks.n, m))


def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    valid, _ = target_mask(targets, weight.shape[0], opts.ignore_index)
    return finish(token_partials(hidden, weight, bias, targets, opts), valid, _dense.stat_dtype(hidden.dtype))


def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    from ._kernels import logits_bwd

    n, vocab, dim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    c = _common(hidden, weight, bias, opts)
    blocks = choose_blocks(n, vocab, dim, hidden.device, hidden.dtype)
    valid, _ = target_mask(targets, vocab, opts.ignore_index)
    y = torch.where(valid, targets, torch.full_like(targets, -1))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    need_dh, need_dw, need_db = needs[0], needs[1], bias is not None and needs[2]
    # fp32 accumulators (one element stands in for an unneeded one: never written)
    dh = torch.zeros(n, dim, **f32) if need_dh else torch.empty(1, **f32)
    dw = torch.zeros(vocab, dim, **f32) if need_dw else torch.empty(1, **f32)
    db = torch.zeros(vocab, **f32) if need_db else torch.empty(1, **f32)
    # fp16 gradient tiles are scaled by a power of two S so small entries do not flush to zero
    # (_grad.fp16_grad_scale); the fp32 accumulators are divided by S again (exact).
    scale = fp16_grad_scale(grad_bound(coefs, 1.0 / opts.temperature)) if hidden.dtype == torch.float16 else 1.0
    A, B, C, D = (x.to(torch.float32).mul(scale).contiguous() for x in coefs)
    grid = (math.ceil(n / blocks.m), math.ceil(vocab / blocks.n))
    logits_bwd[grid](c["hidden"], c["weight"], bias, y, lse.float(), lse_lo.float(), A, B, C, D, dh, dw, db,
                     n, vocab, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                     BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, **c["args"], **c["meta"],
                     **_launch_opts(blocks, hidden.device))
    if scale != 1.0:
        for acc in (dh, dw, db):
            acc /= scale
    return (dh.to(hidden.dtype) if need_dh else None,
            dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)


def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    return loss_by_recompute(token_stats, token_stats_backward, hidden, weight, bias, targets, opts, terms, needs,
                             weight.shape[0])


SEGMENT_BLOCK = 1024  # values per segment_sum program
PRG_BLOCK = 16  # gains per step of a PRG program: K ≤ 16 by default (hytuning.md §3), one step
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
