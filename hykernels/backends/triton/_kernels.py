"""Triton kernels: logits tiles live in registers/SRAM only, never in global memory.

Two kernels, both tiled [BLOCK_M tokens × BLOCK_N vocab] with the lm_head GEMM over D in
BLOCK_K steps (the approach of Apple's Cut Cross-Entropy, extended to all of §2):

- ``stats_fwd``: one streaming pass over a vocabulary split per token block, online-softmax
  accumulators in fp32 (max m, Σe^{z−m}, Σ(z−m)e^{z−m}, Σ(z−m), z_y, argmax), partials per
  split merged on the host side in O(N·splits).
- ``logits_bwd``: recomputes a logits tile, applies the four per-row scalars of §2
  (lse-relative form, see hykernels/_grad.py) and adds G·W into dH and Gᵀ·H into dW with fp32
  atomics.

``UPCAST`` makes the tiles fp32 before tl.dot: the CPU interpreter computes bf16 dots wrongly.
``IEEE`` selects exact fp32 dots for fp32 inputs (Triton's default for fp32 is tf32).

Row and column indices are int64 (``_indices``): element offsets rows·stride and cols·D pass 2³¹
once N·D or V·D does (V = 256k, D = 8192), and int32 would wrap silently.
A masked logit (z = −inf, e.g. a −inf bias entry with value checks off) contributes exactly
nothing: p·(z − m) and p·(A + B·log p) are taken as 0 where p = 0, never −inf·0 = NaN.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh to about torch's accuracy (max relative error 1e-7 in fp32, tests/test_softcap_order.py),
    # compiled or interpreted: no libdevice (the interpreter lacks it), no hardware exp (ex2.approx).
    # |x| < 0.75: an odd minimax polynomial x + x³·P(x²). Beyond: 1 − 2/(e^{2|x|} + 1), where
    # e^{2|x|} = 2^k·e^r by Cody–Waite reduction (|r| ≤ ln2/2, e^r by its degree-7 Taylor series,
    # 2^k built from its exponent bits) and |x| is clamped at 10 (tanh rounds to 1 there).
    a = tl.abs(x)
    b = tl.minimum(a, 0.75)  # = a wherever the polynomial is used; keeps it finite for a = inf
    u = b * b
    p = -6.376697565428913e-04
    p = p * u + 2.979334443807602e-03
    p = p * u - 8.604143746197224e-03
    p = p * u + 2.1807244047522545e-02
    p = p * u - 5.396014824509621e-02
    p = p * u + 1.3333283364772797e-01
    p = p * u - 3.333333134651184e-01
    near = b + b * (u * p)
    y = 2.0 * tl.minimum(a, 10.0)
    k = tl.floor(y * 1.4426950408889634 + 0.5)
    r = (y - k * 0.693145751953125) - k * 1.428606765330187e-06  # ln2 = hi (exact k·hi) + lo
    e = r * 1.984126984126984e-04 + 1.388888888888889e-03
    e = e * r + 8.333333333333333e-03
    e = e * r + 4.1666666666666664e-02
    e = e * r + 1.6666666666666666e-01
    e = e * r + 0.5
    e = e * r + 1.0
    e = e * r + 1.0
    two_k = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    far = 1.0 - 2.0 / (e * two_k + 1.0)
    t = tl.where(a < 0.75, near, far)
    t = tl.where(x < 0, -t, t)
    return tl.where(x != x, x, t)  # NaN stays NaN


@triton.jit
def _indices(pid, BLOCK: tl.constexpr):
    """The int64 indices of block ``pid``: offsets computed from them cannot wrap at 2³¹."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """z = s(H·Wᵀ + b)·inv_temp for one tile (the model's softcap first, then the sampler's
    temperature: hytuning.md §1), and the softcap slope s′(x) = 1 − tanh²(x/c) (1 without softcap)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + ks) < D
        h = tl.load(H + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    slope = tl.full((BLOCK_M, BLOCK_N), 1.0, dtype=tl.float32)
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        z = t * (softcap * inv_temp)
        slope = 1.0 - t * t
    else:
        z = acc * inv_temp
    return z, slope


@triton.jit
def stats_fwd(H, W, B, Y, M_out, S_out, T_out, U_out, ZY_out, AM_out,
              N, V, D, stride_h, stride_w, inv_temp, softcap, tiles_per_split,
              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
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
    v_start = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_N, V)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = tl.arange(0, BLOCK_N).to(tl.int64) + v0  # int64, as _indices
        col_mask = cols < v_end
        z, _ = _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
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
    out = split * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(T_out + out, t, mask=row_mask)
    tl.store(U_out + out, u, mask=row_mask)
    tl.store(ZY_out + out, zy, mask=row_mask)
    tl.store(AM_out + out, amax, mask=row_mask)


@triton.jit
def logits_bwd(H, W, B, Y, LSE, LSE_LO, CA, CB, CC, CD, DH, DW, DB,
               N, V, D, stride_h, stride_w, inv_temp, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr,
               NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = _indices(pid_m, BLOCK_M)
    cols = _indices(pid_n, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < V
    z, slope = _logits_tile(H, W, B, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    lse_lo = tl.load(LSE_LO + rows, mask=row_mask, other=0.0)
    a = tl.load(CA + rows, mask=row_mask, other=0.0)
    b = tl.load(CB + rows, mask=row_mask, other=0.0)
    c = tl.load(CC + rows, mask=row_mask, other=0.0)
    d = tl.load(CD + rows, mask=row_mask, other=0.0)
    inside = row_mask[:, None] & col_mask[None, :]
    logp = tl.where(inside, (z - lse[:, None]) - lse_lo[:, None], 0.0)  # padding: no overflow
    p = tl.exp(logp)
    g = tl.where(p == 0.0, 0.0, p * (a[:, None] + b[:, None] * logp)) + d[:, None]
    g += tl.where(cols[None, :] == y[:, None], c[:, None], 0.0)
    g = tl.where(inside, g * slope * inv_temp, 0.0)
    if NEED_DB:
        tl.atomic_add(DB + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")

    ks = tl.arange(0, BLOCK_K)
    g_op = g if UPCAST else g.to(H.dtype.element_ty)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + ks) < D
        if NEED_DH:  # dH[rows, k] += G · W[cols, k]
            w = tl.load(W + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            if IEEE:
                dh = tl.dot(g_op, w, input_precision="ieee")
            else:
                dh = tl.dot(g_op, w)
            tl.atomic_add(DH + rows[:, None] * D + (k0 + ks)[None, :], dh,
                          mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if NEED_DW:  # dW[cols, k] += Gᵀ · H[rows, k]
            h = tl.load(H + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            if IEEE:
                dw = tl.dot(tl.trans(g_op), h, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(g_op), h)
            tl.atomic_add(DW + cols[:, None] * D + (k0 + ks)[None, :], dw,
                          mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")
