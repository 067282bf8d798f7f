"""fused_loss (§5) against autograd through the oracle's loss, every backend."""
import math

import pytest
import torch

import hykernels as hk
import oracle
from cases import gradcheck_case, make_case
from conftest import DEVICE
from test_token_stats import BACKENDS, FP64_BACKENDS, assert_within_rule, grads

TERM_SETS = {
    "rd_only": ("rd_weight",),
    "grpo_on_policy": ("rlif_weight",),
    "ppo_clip": ("rlif_weight", "old_logp"),
    "all_terms": ("rd_weight", "rlif_weight", "old_logp", "kl_weight", "entropy_weight"),
}


def make_terms(rng, gold_logp, which):
    """Random non-uniform per-token constants; PPO ratios kept away from the clip edges
    (0.8, 1.2) so rounding cannot flip a row between clipped and unclipped."""
    n = gold_logp.numel()
    t = {}
    if "rd_weight" in which:
        t["rd_weight"] = torch.rand(n, generator=rng) / n
    if "rlif_weight" in which:
        t["rlif_weight"] = torch.rand(n, generator=rng) / n
        t["advantages"] = torch.randn(n, generator=rng)
    if "old_logp" in which:
        bands = torch.tensor([[0.4, 0.7], [0.9, 1.1], [1.3, 1.8]])[torch.randint(0, 3, (n,), generator=rng)]
        ratio = bands[:, 0] + (bands[:, 1] - bands[:, 0]) * torch.rand(n, generator=rng)
        t["old_logp"] = (gold_logp.detach().cpu() - ratio.double().log()).float()
    if "kl_weight" in which:
        t["kl_weight"] = torch.rand(n, generator=rng) * 0.1
        t["ref_logp"] = (gold_logp.detach().cpu() + 0.5 * torch.randn(n, generator=rng, dtype=torch.float64)).float()
    if "entropy_weight" in which:
        t["entropy_weight"] = torch.rand(n, generator=rng) * 0.01
    return {k: v.to(gold_logp.device) for k, v in t.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("terms", list(TERM_SETS))
@pytest.mark.parametrize("shape,options", [("ragged", "temp_bias_some_ignored"),
                                           ("large_logits", "softcap_some_ignored"),
                                           ("realistic_vocab", "plain"),
                                           ("all_negative", "softcap_temp_all_ignored")])
def test_loss_and_grads_match_oracle(rng, backend, dtype, terms, shape, options):
    c = make_case(rng, shape, options, dtype)
    inputs = (c.hidden, c.weight, c.bias)
    gold_inputs = c.fp64_leaves()
    gold = oracle.stats(*gold_inputs[:2], c.targets, gold_inputs[2], c.temperature, c.softcap, gold=True)
    base = oracle.stats(c.hidden, c.weight, c.targets, c.bias, c.temperature, c.softcap, gold=False)
    t = make_terms(rng, gold["logp"], TERM_SETS[terms])
    upstream = 0.37  # the backward must scale the gradients formed in forward

    loss, st = hk.fused_loss(c.hidden, c.weight, c.targets, backend=backend, chunk_size=c.chunk_size,
                             **c.kwargs(), **t)
    gold_loss = oracle.loss(gold, c.targets, **{k: v.double() for k, v in t.items()})
    base_loss = oracle.loss(base, c.targets, **t)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert not any(s.requires_grad for s in st)
    assert_within_rule("loss", loss, gold_loss, base_loss, dtype)
    assert_within_rule("logp", st.logp, gold["logp"], base["logp"], dtype)
    assert_within_rule("entropy", st.entropy, gold["entropy"], base["entropy"], dtype)
    if (c.targets == -100).all():
        assert loss.item() == 0.0

    g_ours = grads(loss * upstream, inputs)
    g_gold = grads(gold_loss * upstream, gold_inputs)
    g_base = grads(base_loss * upstream, inputs)
    for name, a, g, b in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_gold, g_base):
        assert a.dtype == dtype
        assert_within_rule(name, a, g, b, dtype)


def test_grad_equals_autograd_through_token_stats(rng):
    """The closed-form in-forward gradient equals autograd through the reference token_stats
    (the §2 backward) with the §5 loss written in plain torch on top."""
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float64)
    inputs = (c.hidden, c.weight, c.bias)
    s = hk.token_stats(c.hidden, c.weight, c.targets, backend="reference", **c.kwargs())
    t = {k: v.double() for k, v in make_terms(rng, s.logp, TERM_SETS["all_terms"]).items()}
    plain = oracle.loss({"logp": s.logp, "entropy": s.entropy}, c.targets, **t)
    fused, _ = hk.fused_loss(c.hidden, c.weight, c.targets, backend="torch_chunked", chunk_size=5,
                             **c.kwargs(), **t)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(fused * -1.7, inputs), grads(plain * -1.7, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradcheck_fp64(rng, backend):
    c, h, w, y, b = gradcheck_case(rng)
    s = hk.token_stats(h, w, y, bias=b, softcap=c.softcap, temperature=0.8)
    t = {k: v.double() for k, v in make_terms(rng, s.logp, TERM_SETS["all_terms"]).items()}

    def f(h, w, b):
        return hk.fused_loss(h, w, y, bias=b, softcap=c.softcap, temperature=0.8, backend=backend,
                             chunk_size=4, **t)[0]

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_only_requested_gradients_are_formed(rng, monkeypatch):
    c = make_case(rng, "ragged", "plain", torch.float32, requires_grad=False)
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=1.0)  # inference: no grads held
    assert not loss.requires_grad
    c.weight.requires_grad_()
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=1.0 / c.targets.numel())
    loss.backward()
    assert c.weight.grad is not None and c.hidden.grad is None


def test_no_gradients_formed_under_no_grad(rng, monkeypatch):
    """Scoring under torch.no_grad() (e.g. old_logp of a rollout) costs a forward only, even
    though the lm_head weight requires grad."""
    from hykernels.backends import torch_chunked

    seen = []
    real = torch_chunked.fused_loss
    monkeypatch.setattr(torch_chunked, "fused_loss", lambda *a: seen.append(a[-1]) or real(*a))
    c = make_case(rng, "ragged", "plain", torch.float32)
    with torch.no_grad():
        hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=1.0, backend="torch_chunked")
    hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=1.0, backend="torch_chunked")
    assert seen == [(False, False, False), (True, True, False)]


def test_scalar_weights_broadcast_and_mean_ce(rng):
    """rd_weight = 1/T reproduces torch's mean cross-entropy."""
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float32, requires_grad=False)
    valid = (c.targets != -100).sum().item()
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=1.0 / valid, **c.kwargs())
    logits = (c.hidden @ c.weight.T + c.bias) / c.temperature
    ce = torch.nn.functional.cross_entropy(logits, c.targets, ignore_index=-100)
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-6)


def test_on_policy_grpo_loss_value_is_minus_weighted_advantage(rng):
    c = make_case(rng, "ragged", "plain", torch.float32)
    b = torch.rand(c.targets.numel(), generator=rng).to(c.hidden.device)
    adv = torch.randn(c.targets.numel(), generator=rng).to(c.hidden.device)
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rlif_weight=b, advantages=adv)
    assert math.isclose(loss.item(), -(b * adv).sum().item(), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_allocates_no_gradient_sized_buffer(rng, backend):
    """fused_loss formed its gradients in forward; its backward only scales them in place. Autograd
    must not allocate a zero gradient for each unused output either (dW's size among them: 1.2 GB
    bf16 at V=151936, D=4096): the backward allocates less than a tenth of dW."""
    h = torch.randn(64, 48, generator=rng).to(DEVICE).requires_grad_()
    w = torch.randn(3000, 48, generator=rng).to(DEVICE).requires_grad_()
    y = torch.randint(0, 3000, (64,), generator=rng).to(DEVICE)
    loss, _ = hk.fused_loss(h, w, y, rd_weight=1.0 / 64, backend=backend)
    kinds = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE.type == "cuda"
                                                     else [])
    with torch.profiler.profile(activities=kinds, profile_memory=True) as prof:
        loss.backward()
    allocated = sum(max(e.self_cpu_memory_usage, 0) + max(getattr(e, "self_device_memory_usage", 0), 0)
                    for e in prof.key_averages())
    assert allocated < w.numel() * 4 / 10, f"backward allocated {allocated} bytes (dW is {w.numel() * 4})"
    assert w.grad is not None and h.grad is not None
