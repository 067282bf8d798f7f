"""Numerical edges a GPU would show first, each checked on every backend here:

- masked logits (a −inf bias entry, value checks off): they contribute exactly nothing to the
  statistics and gradients (no −inf·0 = NaN), including a whole vocabulary split or slice of them;
- fp16 gradient tiles: small p·coefficient products must not flush to zero;
- int64 indices in the Triton kernels (offsets past 2³¹);
- fused_loss's in-place backward, run twice (retain_graph), still scales correctly;
- a token without KL weight contributes nothing even where exp(ref − logp) overflows.
"""
import math

import pytest
import torch

import hykernels as hk
from conftest import DEVICE
from test_token_stats import BACKENDS

if "triton" in BACKENDS:
    from hykernels.backends.triton._tiles import _indices

N, D, V = 13, 11, 200
MASKED = [3, 77, *range(128, V)]  # a few columns, and all of the last Triton split / cuda slice


@pytest.fixture
def checks_off():
    hk.set_checks(False)
    yield
    hk.set_checks(True)


def _sliced(backend, monkeypatch, rows):
    """cuda backends: a workspace of a third of a row, so a slice is all masked columns."""
    if backend in ("cuda", "cuda_emulated"):
        from cuda_emulator import sliced_workspace

        from hykernels import backends

        monkeypatch.setattr(backends._load(backend), "WORKSPACE_BYTES", sliced_workspace(rows, V, slices=3))


def _masked_case(rng):
    h = torch.randn(N, D, generator=rng, dtype=torch.float64) * 2
    w = torch.randn(V, D, generator=rng, dtype=torch.float64) / math.sqrt(D)
    b = torch.randn(V, generator=rng, dtype=torch.float64)
    b[MASKED] = float("-inf")
    keep = torch.ones(V, dtype=torch.bool)
    keep[MASKED] = False
    allowed = keep.nonzero().squeeze(1)
    y = allowed[torch.randint(0, allowed.numel(), (N,), generator=rng)]
    y[[0, 5]] = -100
    return h, w, b, y, keep


def _gold_on_kept(h, w, b, y, keep, temperature):
    """fp64 statistics of the distribution over the unmasked columns only."""
    z = (h @ w[keep].T + b[keep]) / temperature
    logp_all = torch.log_softmax(z, -1)
    col = torch.cumsum(keep.long(), 0) - 1  # original column -> column among the kept
    valid = y != -100
    logp = torch.where(valid, logp_all.gather(1, col[y.clamp(min=0)][:, None])[:, 0], 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, torch.logsumexp(z, -1), logp_all.exp().max(-1).values


def _close(name, ours, gold, rtol=2e-5):
    err = (ours.double().cpu() - gold.double()).abs().max().item()
    scale = max(1.0, gold.double().abs().max().item())
    assert err <= rtol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_logits_contribute_nothing(rng, backend, checks_off, monkeypatch):
    _sliced(backend, monkeypatch, rows=N)
    h, w, b, y, keep = _masked_case(rng)
    temperature = 0.8
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (h, w, b)]
    gold_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    gold = _gold_on_kept(*gold_leaves, y, keep, temperature)

    st = hk.token_stats(*leaves[:2], y.to(DEVICE), bias=leaves[2], temperature=temperature, backend=backend)
    for name, ours, g in zip(("logp", "entropy", "lse", "confidence"), (st.logp, st.entropy, st.lse, st.confidence),
                             gold):
        assert torch.isfinite(ours).all(), f"{name}: {ours}"
        _close(name, ours, g)
    assert torch.isposinf(st.self_certainty).all()  # KL(U ‖ p) with p_v = 0 entries: infinite
    assert keep[st.argmax.cpu()].all()

    # token_stats' backward (recompute) and fused_loss (gradients in forward) through logp, entropy, lse
    a, e = torch.rand(N, generator=rng, dtype=torch.float64), torch.rand(N, generator=rng, dtype=torch.float64)
    (a.float().to(DEVICE) * st.logp + e.float().to(DEVICE) * st.entropy + 0.1 * st.lse).sum().backward()
    ours = [t.grad.clone() for t in leaves]
    (a * gold[0] + e * gold[1] + 0.1 * gold[2]).sum().backward(retain_graph=True)
    for name, o, g in zip(("d_hidden", "d_weight", "d_bias"), ours, gold_leaves):
        _close(name, o, torch.nan_to_num(g.grad))
        assert (o[MASKED] == 0).all() if name != "d_hidden" else True

    for t in leaves + gold_leaves:
        t.grad = None
    loss, _ = hk.fused_loss(*leaves[:2], y.to(DEVICE), bias=leaves[2], temperature=temperature, backend=backend,
                            rd_weight=a.float().to(DEVICE), entropy_weight=e.float().to(DEVICE))
    loss.backward()
    gold_loss = torch.where(y != -100, -a * gold[0] - e * gold[1], 0.0).sum()
    gold_loss.backward()
    _close("loss", loss, gold_loss)
    for name, o, g in zip(("d_hidden", "d_weight", "d_bias"), leaves, gold_leaves):
        _close(name, o.grad, torch.nan_to_num(g.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradients_do_not_flush_to_zero(rng, backend):
    """CE with a per-token weight a = 5e-4 over V = 20011: p·a is ~2.5e-8, below half fp16's smallest
    subnormal (6e-8). The weight has a mean, so the softmax part of dH (Σ_v p_v·a·W_v ≈ a/2) is
    larger than dH itself: a tile narrowed to fp16 without scaling loses all of it."""
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("the interpreter keeps gradient tiles in fp32 (UPCAST): a GPU run checks triton")
    n, d, v = 24, 16, 20011
    h = torch.randn(n, d, generator=rng, dtype=torch.float64)
    w = torch.randn(v, d, generator=rng, dtype=torch.float64) * 0.3 + 0.5
    y = torch.randint(0, v, (n,), generator=rng)
    weight = torch.full((n,), 5e-4, dtype=torch.float64)  # dH ~ 1e-4: fp16 normal range
    leaves = [t.half().to(DEVICE).requires_grad_() for t in (h, w)]
    gold = [t.detach().half().double().requires_grad_() for t in (h, w)]  # the same fp16 inputs, in fp64

    loss, _ = hk.fused_loss(*leaves, y.to(DEVICE), rd_weight=weight.float().to(DEVICE), backend=backend,
                            chunk_size=7)
    loss.backward()
    gold_loss = (weight * torch.nn.functional.cross_entropy(gold[0] @ gold[1].T, y, reduction="none")).sum()
    gold_loss.backward()
    for name, ours, g in zip(("d_hidden", "d_weight"), leaves, gold):
        rel = ((ours.grad.double().cpu() - g.grad).norm() / g.grad.norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not usable here")
def test_triton_indices_are_int64():
    """Element offsets index·stride past 2³¹ (V·D or N·D ≥ 2³¹) must not wrap."""
    import triton
    import triton.language as tl

    @triton.jit
    def offsets(out, pid, stride, BLOCK: tl.constexpr):
        tl.store(out + tl.arange(0, BLOCK), _indices(pid, BLOCK) * stride)

    pid, stride, block = 2**16 + 3, 4099, 16
    out = torch.zeros(block, dtype=torch.int64, device=DEVICE)
    offsets[(1,)](out, pid, stride, BLOCK=block)
    expected = (pid * block + torch.arange(block)) * stride
    assert expected.max() > 2**31
    assert torch.equal(out.cpu(), expected)


def test_fused_loss_second_backward_rescales(rng):
    """The first backward scales the saved gradients in place; a retained second one must still
    return the gradient for its own upstream value."""
    h = torch.randn(5, 4, generator=rng, requires_grad=True)
    w = torch.randn(9, 4, generator=rng, requires_grad=True)
    y = torch.tensor([1, 2, 3, -100, 8])
    loss, _ = hk.fused_loss(h, w, y, rd_weight=0.25)
    (0.5 * loss).backward(retain_graph=True)
    once = h.grad.clone()
    (3.0 * loss).backward()
    assert torch.allclose(h.grad, 7.0 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_kl_weight_ignores_a_far_reference(rng, backend):
    """Rows that carry no KL term (kl_weight 0: curated traces beside rollouts) with a placeholder
    ref_logp of 0 and a log-prob below −88 (exp(ref − logp) = inf in fp32): loss and gradients
    equal those of the same call with those tokens' ref_logp set to their own log-prob (k3 = 0)."""
    h = (torch.randn(6, 8, generator=rng) * 30).to(DEVICE).requires_grad_()  # large logits: logp ≪ −88
    w = torch.randn(50, 8, generator=rng).to(DEVICE).requires_grad_()
    y = torch.tensor([1, 2, 3, 4, 5, 6]).to(DEVICE)
    logp = hk.token_stats(h.detach(), w.detach(), y, backend=backend).logp
    assert logp[3:].min() < -88, "the case must overflow exp(0 − logp)"
    kl_w = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0], device=DEVICE)
    rl_w = torch.full((6,), 0.1, device=DEVICE)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0], device=DEVICE)
    near = logp + 0.1  # the rollouts' reference: a real one
    results = []
    for far in (torch.zeros(3, device=DEVICE), logp[3:]):  # placeholder 0, or the token's own log-prob
        ref = torch.cat([near[:3], far])
        loss, _ = hk.fused_loss(h, w, y, rlif_weight=rl_w, advantages=adv, kl_weight=kl_w, ref_logp=ref,
                                rd_weight=torch.tensor([0, 0, 0, 1.0, 1.0, 1.0], device=DEVICE) / 3, backend=backend)
        gh, gw = torch.autograd.grad(loss, (h, w))
        results.append((loss, gh, gw))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    assert torch.isfinite(l0) and torch.isfinite(gh0).all() and torch.isfinite(gw0).all()
    assert torch.allclose(l0, l1, rtol=1e-6) and torch.allclose(gh0, gh1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw0, gw1, rtol=1e-5, atol=1e-6)
