"""Triton segment kernels (docs/math.md §3): answer-span sums and PRG scores, fp32 accumulation.

- ``segment_sum_kernel``: one program per block of values, fp32 atomic adds into out[segment].
  Answer spans are contiguous, so a block's adds mostly hit one address; at R answer rows this
  is noise next to the lm_head that produced them.
- ``prg_kernel``: one program per trace, walking its gains in blocks: writes Δ_k and the chosen
  variant's score. Traces are short (K ≤ 16 by default), so a trace per program needs no
  cross-program reduction.
"""
import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(X, IDS, OUT, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    ids = tl.load(IDS + offs, mask=mask, other=0)
    tl.atomic_add(OUT + ids, x, mask=mask, sem="relaxed")


@triton.jit
def prg_kernel(C, OFF, GAINS, SCORES, eps, tau_g, VARIANT: tl.constexpr, BLOCK: tl.constexpr):
    """VARIANT indexes _types.PRG_VARIANTS: 0 progressive, 1 monotone, 2 net, 3 mean_gain, 4 min_gain."""
    t = tl.program_id(0)
    start = tl.load(OFF + t)
    end = tl.load(OFF + t + 1)
    k = end - start - 1  # gains of this trace; they start at start − t in GAINS
    rise = tl.zeros((BLOCK,), dtype=tl.float32)  # Σ max(Δ, 0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)  # Σ |Δ|
    rising = tl.zeros((BLOCK,), dtype=tl.float32)  # #{Δ > 0}
    low = tl.full((BLOCK,), float("inf"), dtype=tl.float32)  # min Δ
    for j0 in range(0, k, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mask = j < k
        prev = tl.load(C + start + j, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(C + start + j + 1, mask=mask, other=0.0).to(tl.float32) - prev
        tl.store(GAINS + (start - t) + j, d, mask=mask)
        rise += tl.maximum(d, 0.0)  # masked lanes have d = 0: they add nothing
        total += tl.abs(d)
        rising += (d > 0.0).to(tl.float32)
        low = tl.minimum(low, tl.where(mask, d, float("inf")))
    net = tl.load(C + end - 1).to(tl.float32) - tl.load(C + start).to(tl.float32)  # 0 for K = 0
    has_gains = k > 0
    per_k = tl.maximum(k, 1).to(tl.float32)
    if VARIANT == 0:
        rho = tl.where(has_gains, tl.sum(rise, axis=0) / (tl.sum(total, axis=0) + eps), 0.5)
        score = rho * tl.sigmoid(net / tau_g)
    elif VARIANT == 1:
        score = tl.where(has_gains, tl.sum(rising, axis=0) / per_k, 0.5)
    elif VARIANT == 2:
        score = net
    elif VARIANT == 3:
        score = net / per_k  # Σ_k Δ_k telescopes to c_K − c_0
    else:
        score = tl.where(has_gains, tl.min(low, axis=0), 0.0)
    tl.store(SCORES + t, score)
