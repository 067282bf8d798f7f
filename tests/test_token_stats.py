"""token_stats against the independent fp64 oracle: values and gradients, every backend."""
import pytest
import torch
import torch.nn.functional as F

import hykernels as hk
import oracle
from cases import OPTIONS, SHAPES, make_case

from conftest import BACKENDS, DEVICE

FP64_BACKENDS = ["reference", "torch_chunked"]  # triton accumulates in fp32 and refuses fp64
DIFFERENTIABLE = ("logp", "entropy", "self_certainty", "lse")


def upstream(rng, n):
    """Non-uniform upstream gradients for each differentiable statistic."""
    return {k: torch.randn(n, generator=rng, dtype=torch.float64).to(DEVICE) for k in DIFFERENTIABLE}


def weighted_sum(stats, ups):
    return sum((getattr(stats, k) if hasattr(stats, k) else stats[k]).double().mul(u).sum()
               for k, u in ups.items())


def grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], allow_unused=True)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(name, ours, gold, baseline, dtype):
    """The tolerance rule (tests/oracle.py) in max-norm: |ours - gold| <= k·|same-dtype torch - gold| + tol.

    tol is 1e-5 of the gold's scale for fp32, and one ulp of the scale for half precision
    (finfo.eps: the result's own rounding to bf16/fp16 costs up to half of that). The baseline
    term covers ill-conditioned cases (entropy of large logits, logits near -300 carry ~2e-5
    of fp32 rounding each); k = 2 because two different roundings of the same size land on
    different elements, so one max can be up to about twice the other."""
    scale = max(1.0, gold.double().abs().max().item())
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    err, allowed = max_err(ours, gold), 2 * max_err(baseline, gold) + rtol * scale
    assert err <= allowed, f"{name}: max error {err:.3g} > 2 x same-dtype torch's + tol = {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("options", list(OPTIONS))
def test_values_and_grads_match_oracle(rng, backend, dtype, shape, options):
    c = make_case(rng, shape, options, dtype)
    inputs = (c.hidden, c.weight, c.bias)
    ours = hk.token_stats(c.hidden, c.weight, c.targets, backend=backend, chunk_size=c.chunk_size, **c.kwargs())
    gold_inputs = c.fp64_leaves()
    gold = oracle.stats(*gold_inputs[:2], c.targets, gold_inputs[2], c.temperature, c.softcap, gold=True)
    base = oracle.stats(c.hidden, c.weight, c.targets, c.bias, c.temperature, c.softcap, gold=False)

    for name in ("logp", "entropy", "self_certainty", "confidence", "lse"):
        assert getattr(ours, name).dtype == torch.float32
        assert_within_rule(name, getattr(ours, name), gold[name], base[name], dtype)
    # argmax may differ only between near-tied logits: the chosen logit must be (nearly) maximal
    z = oracle.logits(c.hidden, c.weight, c.bias, c.temperature, c.softcap).detach()
    chosen = z.gather(1, ours.argmax[:, None]).squeeze(1)
    slack = 1e-5 if dtype == torch.float32 else 0.05
    assert (chosen >= z.max(-1).values - slack * z.abs().max()).all()
    ignored = c.targets == -100
    assert (ours.logp[ignored] == 0).all()

    ups = upstream(rng, c.targets.numel())
    g_ours = grads(weighted_sum(ours, ups), inputs)
    g_gold = grads(weighted_sum(gold, ups), gold_inputs)
    g_base = grads(weighted_sum(base, ups), inputs)
    for name, a, g, b in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_gold, g_base):
        assert a.dtype == dtype
        assert_within_rule(name, a, g, b, dtype)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("options", ["plain", "temp_bias_some_ignored", "softcap_some_ignored"])
def test_gradcheck_fp64(rng, backend, options):
    c = make_case(rng, "ragged", options, torch.float64)
    c.hidden, c.weight = c.hidden[:7].detach().requires_grad_(), c.weight[:11].detach().requires_grad_()
    c.targets = c.targets[:7].clamp(max=10).masked_fill(c.targets[:7] == -100, -100)
    if c.bias is not None:
        c.bias = c.bias[:11].detach().requires_grad_()

    def f(h, w, *b):
        s = hk.token_stats(h, w, c.targets, bias=b[0] if b else None, temperature=c.temperature,
                           softcap=c.softcap, backend=backend, chunk_size=3)
        return s.logp, s.entropy, s.self_certainty, s.lse

    inputs = (c.hidden, c.weight) + ((c.bias,) if c.bias is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_matches_torch_cross_entropy(rng, backend):
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float32, requires_grad=False)
    logits = ((c.hidden @ c.weight.T + c.bias) / c.temperature).double()
    ce = F.cross_entropy(logits, c.targets, reduction="none", ignore_index=-100)
    s = hk.token_stats(c.hidden, c.weight, c.targets, backend=backend, **c.kwargs())
    torch.testing.assert_close(s.logp.double(), -ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(rng, backend):
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float16)
    s = hk.token_stats(c.hidden, c.weight, c.targets, backend=backend, **c.kwargs())
    gold = oracle.stats(c.hidden, c.weight, c.targets, c.bias, c.temperature, gold=True)
    base = oracle.stats(c.hidden, c.weight, c.targets, c.bias, c.temperature, gold=False)
    for name in DIFFERENTIABLE:
        assert_within_rule(name, getattr(s, name), gold[name], base[name], torch.float16)
    s.logp.sum().backward()
    assert c.hidden.grad.dtype == torch.float16 and torch.isfinite(c.hidden.grad).all()


def test_self_certainty_is_kl_from_uniform(rng):
    """KL(U ‖ p) >= 0, and 0 exactly for uniform logits."""
    h = torch.randn(9, 5, generator=rng)
    w = torch.randn(31, 5, generator=rng)
    assert (hk.token_stats(h, w).self_certainty >= -1e-6).all()
    flat = hk.token_stats(h, torch.zeros(31, 5))
    torch.testing.assert_close(flat.self_certainty, torch.zeros(9), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.confidence, torch.full((9,), 1 / 31))


def test_leading_dims_and_no_targets(rng):
    h = torch.randn(3, 5, 8, generator=rng)
    w = torch.randn(40, 8, generator=rng)
    y = torch.randint(0, 40, (3, 5), generator=rng)
    s = hk.token_stats(h, w, y)
    flat = hk.token_stats(h.reshape(15, 8), w, y.reshape(15))
    assert s.logp.shape == (3, 5)
    for a, b in zip(s, flat):
        assert torch.equal(a.reshape(-1), b)
    no_targets = hk.token_stats(h, w)  # rollouts scored without targets
    assert (no_targets.logp == 0).all()
    torch.testing.assert_close(no_targets.entropy, s.entropy)


def test_only_requested_gradients(rng):
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float32, requires_grad=False)
    c.hidden.requires_grad_()
    s = hk.token_stats(c.hidden, c.weight, c.targets, **c.kwargs())
    s.entropy.sum().backward()
    assert c.hidden.grad is not None and c.weight.grad is None and c.bias.grad is None


def test_unused_outputs_give_zero_gradient(rng):
    c = make_case(rng, "ragged", "plain", torch.float32)
    s = hk.token_stats(c.hidden, c.weight, c.targets)
    (s.confidence.sum() * 0 + s.lse.sum() * 0).backward()
    assert torch.count_nonzero(c.hidden.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_gradient_sums_to_one_at_large_offsets(rng, backend):
    """d lse / d bias = softmax, which sums to 1. At logits near -3000 an fp32 lse alone is off
    by up to 1.2e-4 (half an ulp) and every p of the row with it; the backward must carry lse's
    rounding remainder to keep the sum at 1 to fp32 accuracy. One row per call, so each row's
    sum is checked on its own."""
    w = torch.randn(97, 8, generator=rng).to(DEVICE)
    for _ in range(8):
        h = torch.randn(1, 8, generator=rng).to(DEVICE)
        b = (torch.randn(97, generator=rng) - 3000.0).to(DEVICE).requires_grad_()
        hk.token_stats(h, w, bias=b, backend=backend).lse.sum().backward()
        assert abs(b.grad.double().sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_takes_the_first_of_tied_maxima(rng, backend):
    """Like torch.argmax: with exactly tied maxima the lowest index wins, whether the tie is
    between vocabulary tiles of one split (17, 100) or across splits (40, 299 with the triton
    test blocks). Integer-valued inputs make the tie exact whatever order a GEMM sums in."""
    h = torch.randint(1, 4, (5, 16), generator=rng).float() * (torch.randint(0, 2, (5, 16), generator=rng) * 2 - 1)
    w = torch.randint(-1, 2, (300, 16), generator=rng).float()
    w[100] = w[17] = h[0] * 3  # logit 3·|h_0|² > any ±1-row's logit: the maximum of row 0, twice
    w[299] = w[40] = h[1] * 3
    s = hk.token_stats(h.to(DEVICE), w.to(DEVICE), backend=backend)
    assert s.argmax[0] == 17 and s.argmax[1] == 40
