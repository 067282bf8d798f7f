"""The gradient-tile passes: §2's dL/dz for a chunk of rows, written to the chunk workspace
in the operands' dtype for the two gradient GEMMs (_grad_gemm.py). No atomics.

- ``grad_inplace`` (fused_loss, 6·N·D·V in all): the logits of the chunk are already in the
  workspace (fp32, _logits_fwd.logits_fwd with STORE_Z); each program takes BLOCK_R rows and
  walks their columns in increasing order, overwriting the fp32 logits with the gradient. For
  half-precision inputs the gradient row is packed at the start of its fp32 row (row stride
  2·Vp in bf16/fp16 elements): column block j writes bytes [2·j·B, 2·(j+1)·B) of the row, which
  hold logits of columns below (j+1)·B/2, all read by this program already (blocks ≤ j), and
  never logits of a later block; a barrier per block orders the warps (a warp's packed columns
  overlay logits other warps load), so the overwrite needs no second buffer.
  Elementwise: reads 4 and writes 2 (half) or 4 (fp32) bytes per logit; ~12 FLOPs, one exp.
- ``logits_grad`` (token_stats backward and fused_loss when a chunk's rows do not fit the
  workspace, 8·N·D·V in all): recomputes each logits tile (2·D FLOPs per logit, as
  _logits_fwd) and writes its gradient tile (e bytes per logit; by a TMA store with
  descriptors), grouped order as there. L2 operand reads as _logits_fwd's: 2·m·n/((m+n)·e)
  FLOP per byte, 42.7 at 128×64 and 64×128 in bf16/fp16 and 64 at 128×128 (sm_90 with
  descriptors, where the TMA store of the gradient tile keeps it spill-free); at a 1024-row
  chunk of D=4096, V=151936 in bf16, 29.9 GB at 128×64 and 19.9 GB at 128×128 for 1.27 TFLOP.

The softcap slope comes from the kept logit: z = c·tanh(x/c)/τ, so s′ = 1 − tanh² = 1 − (τz/c)².
"""
import triton
import triton.language as tl

from ._tiles import _grad_tile, _grouped, _indices, _logits_tile, _narrow, _row_coefs, _store_tile


@triton.jit
def grad_inplace(Z, G, Y, LSE, LSE_LO, CA, CB, CC, CD, N, V, stride_z, stride_g, temp, inv_temp, softcap,
                 HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, UPCAST: tl.constexpr):
    rows = _indices(tl.program_id(0), BLOCK_R)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse, lse_lo, a, b, c, d = _row_coefs(LSE, LSE_LO, CA, CB, CC, CD, rows, row_mask)
    z_rows, g_rows = Z + rows * stride_z, G + rows * stride_g
    for v0 in range(0, V, BLOCK_V):  # increasing: see the module docstring
        cols = tl.arange(0, BLOCK_V) + v0  # int32; the int64 offsets are per row (z_rows, g_rows)
        inside = row_mask[:, None] & (cols < V)[None, :]
        z = tl.load(z_rows[:, None] + cols[None, :], mask=inside, other=0.0)
        slope = tl.full((BLOCK_R, BLOCK_V), 1.0, dtype=tl.float32)
        if HAS_SOFTCAP:
            tz = z * (temp / softcap)
            slope = 1.0 - tz * tz
        g = _grad_tile(z, slope, y, cols, inside, lse, lse_lo, a, b, c, d, inv_temp)
        # Warps do not run in lockstep: the packed columns a warp stores overlay logits that other
        # warps load (column c over logit c/2). Every warp has read this block before any writes.
        tl.debug_barrier()
        tl.store(g_rows[:, None] + cols[None, :], _narrow(g, G.dtype.element_ty, UPCAST), mask=inside)


@triton.jit
def logits_grad(H, W, B, Y, G, LSE, LSE_LO, CA, CB, CC, CD, N, V, D, stride_h, stride_w, stride_g,
                inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    rows = _indices(pid_m, BLOCK_M)
    cols = tl.arange(0, BLOCK_N) + pid_n * BLOCK_N  # int32 vocabulary indices
    row_mask = rows < N
    z, slope = _logits_tile(H, W, B, pid_m * BLOCK_M, pid_n * BLOCK_N, N, V, D, stride_h, stride_w, inv_temp,
                            softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE, TMA)
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse, lse_lo, a, b, c, d = _row_coefs(LSE, LSE_LO, CA, CB, CC, CD, rows, row_mask)
    inside = row_mask[:, None] & (cols < V)[None, :]
    g = _grad_tile(z, slope, y, cols, inside, lse, lse_lo, a, b, c, d, inv_temp)
    _store_tile(G, g, pid_m * BLOCK_M, pid_n * BLOCK_N, N, V, stride_g, BLOCK_M, BLOCK_N, TMA, UPCAST)
