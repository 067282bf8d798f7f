"""The statistics pass: logits GEMM with an online-softmax epilogue, optionally keeping the logits.

``logits_fwd``: program (row block, vocabulary split), in grouped order. It streams the split's
vocabulary in BLOCK_N tiles; each tile is z = s(H·Wᵀ+b)/τ over all of D (_tiles._logits_tile),
folded into fp32 online accumulators per row (``_fold``): max m, Σe^{z−m}, Σ(z−m)e^{z−m},
Σ(z−m), z_y and the argmax (hykernels/_partials.py merges the splits on the host in
O(rows·splits)). With ``STORE_Z`` it also writes z (fp32) into the chunk workspace, for
fused_loss's in-place gradient (_logits_grad.grad_inplace): the logits are formed once,
6·N·D·V FLOPs in all. With descriptors (TMA) z leaves by a TMA store. Tiles of more than 8192
logits (128×128) are folded in two halves, so that a half's exponentials, not the whole tile's,
live beside z: with that and the TMA store 128×128 compiles without spills on sm_90a.

Cost at N rows (one launch covers a chunk of them), D, V, tile m×n×k, splits S, e bytes per
operand element:
  FLOPs   2·N·D·V in tl.dot (+ ~10 per logit in the epilogue, 3 of them exp/tanh);
  L2      each program reads (m+n)·k·e operand bytes per k step for 2·m·n·k FLOPs:
          2·m·n/((m+n)·e) FLOP per byte, in bf16/fp16 42.7 at 128×64 and 64×128, 64 at 128×128
          (sm_90 with descriptors; _configs._HALF_FWD). A launch reads N·V·D·e·(1/m + 1/n)
          bytes: at a 512-row chunk of D=4096, V=151936 in bf16, 14.9 GB at 128×64 and 10.0 GB
          at 128×128, for 0.64 TFLOP;
  HBM     W read ⌈rows/m / GROUP_M⌉ times (once per group of row blocks: its tiles are reused
          from L2 by the group), H read once (the group's row panels stay in L2), STORE_Z writes
          4·N·V bytes, partials 24·N·S bytes. No atomics.
"""
import triton
import triton.language as tl

from ._tiles import _grouped, _indices, _logits_tile


@triton.jit
def _fold(z, cols, col_mask, y, c0, m, s, t, u, zy, amax, seen):
    """Fold the logits tile ``z`` (columns ``cols`` from c0; those outside ``col_mask`` ignored)
    into the running statistics."""
    # The maximum and its first index in one reduction (fewer registers at 128×128 than tl.max
    # and tl.argmax apart). Sums by tl.sum: the interpreter runs a reduction with a custom
    # combine function one element at a time in Python (a 100-fold slower CPU test).
    tile_max, tile_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tile_arg = tile_arg.to(tl.int32) + c0
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
    return new_m, s, t, u, zy, amax, seen + tl.sum(col_mask.to(tl.float32), axis=0)


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
    if STORE_Z and not TMA:
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
            if TMA:  # clipped at V by the descriptor; a tile never crosses a split's end
                Z.store([pid_m * BLOCK_M, v0], z)
            else:
                tl.store(z_rows[:, None] + cols[None, :], z, mask=row_mask[:, None] & col_mask[None, :])
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if BLOCK_M * BLOCK_N > 8192:  # fold the tile's halves one after the other
            za, zb = tl.split(tl.permute(tl.reshape(z, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            ca = tl.arange(0, BLOCK_N // 2) + v0
            cb = ca + BLOCK_N // 2
            m, s, t, u, zy, amax, seen = _fold(za, ca, ca < v_end, y, v0, m, s, t, u, zy, amax, seen)
            m, s, t, u, zy, amax, seen = _fold(zb, cb, cb < v_end, y, v0 + BLOCK_N // 2, m, s, t, u, zy, amax,
                                               seen)
        else:
            m, s, t, u, zy, amax, seen = _fold(z, cols, col_mask, y, v0, m, s, t, u, zy, amax, seen)
    out = split.to(tl.int64) * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(T_out + out, t, mask=row_mask)
    tl.store(U_out + out, u, mask=row_mask)
    tl.store(ZY_out + out, zy, mask=row_mask)
    tl.store(AM_out + out, amax, mask=row_mask)
