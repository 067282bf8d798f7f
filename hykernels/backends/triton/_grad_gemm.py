"""The gradient GEMMs of a chunk: dH = G·W and dW (+)= Gᵀ·H, each program owning its output tile.

G is the chunk's gradient tile [rows, V] in the operands' dtype (_logits_grad.py), fp32
accumulation in registers; no atomics, so results are deterministic run to run.

- ``dh_gemm``: dH[rows, D] = α·G·W. A chunk's rows are complete after one launch (the
  reduction runs over all of V), so the tile goes straight to the dH returned, in its dtype.
  Grid ⌈rows/m⌉·⌈D/n⌉ (one wave at the lmhead shape); the G row panel and the W column panel
  are read by every program of the same row/column, concurrently: ~once each from HBM.
  FLOPs 2·rows·V·D; HBM ≈ |G| + |W| + |dH chunk|.
- ``dw_gemm``: dW[V, D] = α·Gᵀ·H (+ dW with BETA): the chunks are summed in order, one
  rounding per chunk when dW is bf16 (as Liger's fused linear CE; fp32 accumulation across
  chunks is the caller's choice: _grad.FP32_ACCUMULATE). Grouped order over the vocabulary
  blocks; H's chunk (rows·D) stays in L2. FLOPs 2·rows·V·D; HBM ≈ |G| + |H chunk| + dW read
  (BETA) and written once per chunk: dW's read-modify-write is why chunks are made as large
  as the workspace budget allows.
"""
import triton
import triton.language as tl

from ._tiles import _dot, _grouped, _store_tile, _tile


@triton.jit
def _gemm(A, B, m0, n0, M, N, K, stride_a, stride_b, TRANS_A: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
          TMA: tl.constexpr):
    """The fp32 tile at (m0, n0) of A·B over K: A is [M, K] row-major, or [K, M] with TRANS_A (G
    read as Gᵀ: wgmma takes the transposed shared-memory tile as it is); B is [K, N]."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TRANS_A:
            a = tl.trans(_tile(A, k0, m0, K, M, stride_a, BLOCK_K, BLOCK_M, TMA))
        else:
            a = _tile(A, m0, k0, M, K, stride_a, BLOCK_M, BLOCK_K, TMA)
        acc = _dot(a, _tile(B, k0, n0, K, N, stride_b, BLOCK_K, BLOCK_N, TMA), acc, UPCAST, IEEE)
    return acc


@triton.jit
def dh_gemm(G, W, DH, N, V, D, stride_g, stride_w, stride_dh, alpha,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    r0, d0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = _gemm(G, W, r0, d0, N, D, V, stride_g, stride_w, False, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE, TMA)
    _store_tile(DH, acc * alpha, r0, d0, N, D, stride_dh, BLOCK_M, BLOCK_N, TMA, UPCAST)


@triton.jit
def dw_gemm(G, H, DW, N, V, D, stride_g, stride_h, stride_dw, alpha, BETA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(V, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    v0, d0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = _gemm(G, H, v0, d0, V, D, N, stride_g, stride_h, True, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE,
                TMA) * alpha
    if BETA:
        acc += _tile(DW, v0, d0, V, D, stride_dw, BLOCK_M, BLOCK_N, TMA).to(tl.float32)
    _store_tile(DW, acc, v0, d0, V, D, stride_dw, BLOCK_M, BLOCK_N, TMA, UPCAST)
