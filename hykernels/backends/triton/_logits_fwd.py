"""The statistics pass: logits GEMM with an online-softmax epilogue, optionally keeping the logits.

``logits_fwd``: program (row block, vocabulary split), in grouped order. It streams the split's
vocabulary in BLOCK_N tiles; each tile is z = s(H·Wᵀ+b)/τ over all of D (_tiles._logits_tile),
folded into fp32 online accumulators per row: max m, Σe^{z−m}, Σ(z−m)e^{z−m}, Σ(z−m), z_y and
the argmax (hykernels/_partials.py merges the splits on the host in O(rows·splits)). With
``STORE_Z`` it also writes z (fp32) into the chunk workspace, for fused_loss's in-place gradient
(_logits_grad.grad_inplace): the logits are formed once, 6·N·D·V FLOPs in all.

Cost at N rows (one launch covers a chunk of them), D, V, tile m×n×k, splits S:
  FLOPs   2·N·D·V in tl.dot (+ ~10 per logit in the epilogue, 3 of them exp/tanh);
  HBM     W read ⌈rows/m / GROUP_M⌉ times (once per group of row blocks: its tiles are reused
          from L2 by the group), H read once (the group's row panels stay in L2), STORE_Z writes
          4·N·V bytes, partials 24·N·S bytes. No atomics.
"""
import triton
import triton.language as tl

from ._tiles import _grouped, _indices, _logits_tile


@triton.jit
def logits_fwd(H, W, B, Y, Z, M_out, S_out, T_out, U_out, ZY_out, AM_out,
               N, V, D, stride_h, stride_w, stride_z, inv_temp, softcap, split_width, num_splits,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, STORE_Z: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    pid_m, split = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_M), num_splits, GROUP_M)
    rows = _indices(pid_m, BLOCK_M)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e^{z−m}
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ (z−m)·e^{z−m}
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ (z−m)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.int32)
    seen = 0.0  # vocabulary entries folded in so far (for rebasing u)
    if STORE_Z:
        z_rows = Z + rows * stride_z  # the rows of the kept logits
    v_start = split * split_width
    v_end = tl.minimum(v_start + split_width, V)
    for v0 in range(v_start, v_end, BLOCK_N):
        # int32 columns: vocabulary indices (< 2³¹); the int64 offset is formed once per row
        # (z_rows). 64-bit offsets per stored logit made the epilogue spill registers at 128×128.
        cols = tl.arange(0, BLOCK_N) + v0
        col_mask = cols < v_end
        z, _ = _logits_tile(H, W, B, pid_m * BLOCK_M, v0, N, V, D, stride_h, stride_w, inv_temp, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE, TMA)
        if STORE_Z:
            tl.store(z_rows[:, None] + cols[None, :], z, mask=row_mask[:, None] & col_mask[None, :])
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        tile_arg = tl.argmax(z, axis=1).to(tl.int32) + v0
        new_m = tl.maximum(m, tile_max)
        # Rebase the accumulators from m to new_m. While every entry so far is −inf (m = −inf),
        # s = t = 0: a zero shift keeps them zero without forming −inf·0, and the tile is shifted
        # by 0 instead of its −inf max (z − m would be NaN).
        shift = tl.where(m == float("-inf"), 0.0, m - new_m)
        alpha = tl.exp(shift)
        base = tl.where(new_m == float("-inf"), 0.0, new_m)
        zs = tl.where(col_mask[None, :], z - base[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(zs), 0.0)
        t = alpha * (t + shift * s) + tl.sum(tl.where(e == 0.0, 0.0, zs * e), axis=1)
        u = u + seen * shift + tl.sum(zs, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        amax = tl.where(tile_max > m, tile_arg, amax)  # strict: the first maximum wins
        m = new_m
        seen += tl.sum(col_mask.to(tl.float32), axis=0)
    out = split.to(tl.int64) * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(T_out + out, t, mask=row_mask)
    tl.store(U_out + out, u, mask=row_mask)
    tl.store(ZY_out + out, zy, mask=row_mask)
    tl.store(AM_out + out, amax, mask=row_mask)
