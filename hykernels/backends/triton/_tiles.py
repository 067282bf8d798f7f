"""Triton building blocks shared by the lm_head kernels (one module, as CCE's tl_utils):
grouped tile order, operand tiles by tensor descriptor or pointer, the logits tile with its
softcap and temperature, and §2's gradient tile.

``UPCAST`` (the CPU interpreter) makes operands fp32 and sums each dot over k in order (_dot):
the interpreter computes bf16 dots wrongly, and its BLAS rounds an entry by its place in the tile.
``IEEE`` selects exact fp32 dots for fp32 inputs (Triton's default for fp32 is tf32).
``TMA`` selects tensor-descriptor operands (see _configs.use_descriptors).

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
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order (Triton tutorial 03): GROUP_M row
    blocks sweep the column blocks together, so each column operand tile is read from HBM once
    per group and from L2 by the group's other row blocks, while the group's row operand tiles
    stay in L2 for the whole sweep."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile(src, r0, c0, n_rows, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr, TMA: tl.constexpr):
    """The [BR, BC] block at (r0, c0) of a row-major [n_rows, n_cols] matrix, zero outside it:
    one tensor-descriptor load (TMA zero-fills out of bounds), or masked pointer loads."""
    # One return at the end: a return inside a compile-time branch does not end code generation,
    # so the pointer code after it would still be compiled with a descriptor as ``src``.
    if TMA:
        tile = src.load([r0, c0])
    else:
        rows = tl.arange(0, BR).to(tl.int64) + r0
        cols = tl.arange(0, BC) + c0
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        tile = tl.load(src + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def _narrow(x, ty: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` in dtype ``ty``, rounded to nearest even. The interpreter truncates fp32 → bf16
    (even with fp_downcast_rounding="rtne"); there the bits are rounded first, after which its
    truncation is exact. Compiled code converts with round-to-nearest-even already."""
    if UPCAST:
        if ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _store_tile(dst, value, r0, c0, n_rows, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr,
                TMA: tl.constexpr, UPCAST: tl.constexpr):
    """Store fp32 ``value`` ([BR, BC], rounded to the destination dtype) at (r0, c0), clipped to
    [n_rows, n_cols]."""
    if TMA:
        dst.store([r0, c0], _narrow(value, dst.dtype, UPCAST))
    else:
        rows = tl.arange(0, BR).to(tl.int64) + r0
        cols = tl.arange(0, BC) + c0
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        tl.store(dst + rows[:, None] * stride + cols[None, :], _narrow(value, dst.dtype.element_ty, UPCAST),
                 mask=mask)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a·b in fp32. Compiled, an entry's dot does not depend on where the entry sits in the
    tile, nor on BLOCK_K (fp32: one FMA per k, in order; half: the tensor cores' k-steps, in
    order), so logits_grad's recomputed logits are bitwise logits_fwd's, as its
    log p = (z − lse) − lse_lo needs (_grad_tile): p is exp of a difference of two ~|z| numbers,
    and an ulp of z off the one lse came from is an ulp of relative error in p, with no
    (1 − p) factor to damp it at a near-one p. The interpreter's tl.dot is a BLAS sgemm
    (np.matmul), which rounds an entry by its row and column in the tile; a backward chunk's rows
    sit elsewhere in their row tile than in the statistics pass over all rows, so z came back an
    ulp or two off (1.5e-5 to 3e-5 at |z| ~ 200-300) and G with it (up to 2e-4 at coefficients
    ~3: issue 10). There (UPCAST) each entry is summed over k in order too: np.sum along a
    non-contiguous axis adds the k slices one after the other."""
    if UPCAST:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _logits_tile(H, W, B, r0, v0, N, V, D, stride_h, stride_w, inv_temp, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 TMA: tl.constexpr):
    """z = s(H·Wᵀ + b)·inv_temp for rows r0.. × vocabulary v0.. (the model's softcap first, then
    the sampler's temperature: docs/math.md §1), and the softcap slope s′(x) = 1 − tanh²(x/c)
    (1 without softcap). 2·BLOCK_M·BLOCK_N·D FLOPs; reads a BLOCK_M×D and a BLOCK_N×D panel."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        h = _tile(H, r0, k0, N, D, stride_h, BLOCK_M, BLOCK_K, TMA)
        w = _tile(W, v0, k0, V, D, stride_w, BLOCK_N, BLOCK_K, TMA)
        acc = _dot(h, tl.trans(w), acc, UPCAST, IEEE)
    cols = tl.arange(0, BLOCK_N) + v0  # int32: a vocabulary index (< 2³¹), never scaled by D here
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    slope = tl.full((BLOCK_M, BLOCK_N), 1.0, dtype=tl.float32)
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        z = t * (softcap * inv_temp)
        slope = 1.0 - t * t
    else:
        z = acc * inv_temp
    return z, slope


@triton.jit
def _row_coefs(LSE, LSE_LO, CA, CB, CC, CD, rows, row_mask):
    """A row block's lse, lse_lo and the four §2 coefficients (hykernels/_grad.py)."""
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    lse_lo = tl.load(LSE_LO + rows, mask=row_mask, other=0.0)
    a = tl.load(CA + rows, mask=row_mask, other=0.0)
    b = tl.load(CB + rows, mask=row_mask, other=0.0)
    c = tl.load(CC + rows, mask=row_mask, other=0.0)
    d = tl.load(CD + rows, mask=row_mask, other=0.0)
    return lse, lse_lo, a, b, c, d


@triton.jit
def _grad_tile(z, slope, y, cols, inside, lse, lse_lo, a, b, c, d, inv_temp):
    """dL/d(pre-softcap logit) of a tile: (p·(A + B·log p) + C·[v = y] + D)·s′·inv_temp, with
    log p = z − lse − lse_lo (lse_lo: lse's rounding remainder), 0 outside ``inside``."""
    logp = tl.where(inside, (z - lse[:, None]) - lse_lo[:, None], 0.0)  # padding: no overflow
    p = tl.exp(logp)
    g = tl.where(p == 0.0, 0.0, p * (a[:, None] + b[:, None] * logp)) + d[:, None]
    g += tl.where(cols[None, :] == y[:, None], c[:, None], 0.0)
    return tl.where(inside, g * slope * inv_temp, 0.0)
