"""Autocast: in an autocast region every op computes the lm_head GEMMs in the autocast dtype, as
F.linear does there, with fp32 statistics, and returns each gradient in its input's own dtype (an
fp32 master weight gets an fp32 gradient). Outside autocast mixed dtypes are still refused."""
import pytest
import torch
import torch.nn.functional as F

import hykernels as hk
from conftest import BACKENDS, DEVICE
from test_token_stats import assert_within_rule

AMP = torch.bfloat16
N, D, V = 37, 24, 203
# torch rounds its autocast logits to bf16 (eps 2^-8 = 3.9e-3 relative); hykernels keeps them fp32
TORCH_TOL = 2e-2
GOLD_TOL = 1e-5  # fp32 statistics of the bf16-rounded inputs against fp64 on the same inputs


def autocast(enabled=True):
    return torch.autocast(DEVICE.type, dtype=AMP, enabled=enabled)


def problem(rng, dtype=torch.float32):
    """(hidden, weight, bias) leaves and targets, about 30% of the rows without one."""
    h = torch.randn(N, D, generator=rng)
    w = torch.randn(V, D, generator=rng) / D**0.5
    b = torch.randn(V, generator=rng)
    y = torch.randint(0, V, (N,), generator=rng)
    y[torch.rand(N, generator=rng) < 0.3] = -100
    return [t.to(DEVICE, dtype).requires_grad_() for t in (h, w, b)], y.to(DEVICE)


def leaves(xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def assert_close(name, ours, want, tol):
    scale = max(1.0, want.detach().double().abs().max().item())
    err = (ours.detach().double() - want.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def log_softmax(h, w, b):
    """log-softmax of F.linear's logits, in fp32 at least: bf16 logits under autocast (torch's
    own), fp64 on fp64 inputs (the gold)."""
    z = F.linear(h, w, b)
    return z.to(torch.promote_types(z.dtype, torch.float32)).log_softmax(-1)


def target_logp(logp_all, y):
    return torch.where(y != -100, logp_all.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)


def entropy(logp_all):
    return -(logp_all.exp() * logp_all).sum(-1)


def check_against_torch(xs, ours, outputs: dict, torch_outputs, scalar):
    """``ours`` (leaves, after backward) against torch under the same autocast and against fp64 on
    the inputs rounded to the autocast dtype (the gold): values within bf16 tolerance of torch's and
    fp32-close to the gold; gradients fp32 and, by the suite's rule, at most twice as far from the
    gold's as torch's (whose logits are rounded to bf16) plus one bf16 ulp."""
    theirs = leaves(xs)
    with autocast():
        want = torch_outputs(*theirs)
    gold_in = leaves([x.detach().to(AMP) for x in xs], torch.float64)
    gold = torch_outputs(*gold_in)
    for (name, a), b, g in zip(outputs.items(), want, gold):
        assert a.dtype == torch.float32, name
        assert_close(f"{name} vs torch", a, b, TORCH_TOL)
        assert_close(f"{name} vs fp64 on bf16 inputs", a, g, GOLD_TOL)
    scalar(*want).backward()
    scalar(*gold).backward()
    for name, a, b, g in zip(("d_hidden", "d_weight", "d_bias"), ours, theirs, gold_in):
        assert a.grad.dtype == a.dtype == torch.float32, name  # fp32 leaves: fp32 gradients
        assert_within_rule(name, a.grad, g.grad, b.grad, AMP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_equals_torch_cross_entropy_under_autocast(rng, backend):
    xs, y = problem(rng)
    ours = leaves(xs)
    with autocast():
        loss, st = hk.fused_loss(ours[0], ours[1], y, bias=ours[2], reduction="mean", backend=backend)
    loss.backward()

    def torch_outputs(h, w, b):
        logp_all = log_softmax(h, w, b)
        return F.nll_loss(logp_all, y), target_logp(logp_all, y)

    check_against_torch(xs, ours, dict(loss=loss, logp=st.logp), torch_outputs, lambda loss, _: loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_equal_torch_under_autocast(rng, backend):
    xs, y = problem(rng)
    ours = leaves(xs)
    u_logp, u_ent = (torch.randn(N, generator=rng, dtype=torch.float64).to(DEVICE) for _ in range(2))

    def scalar(logp, ent):
        return (logp.double() * u_logp + ent.double() * u_ent).sum()

    with autocast():
        st = hk.token_stats(ours[0], ours[1], y, bias=ours[2], backend=backend)
    scalar(st.logp, st.entropy).backward()

    def torch_outputs(h, w, b):
        logp_all = log_softmax(h, w, b)
        return target_logp(logp_all, y), entropy(logp_all)

    check_against_torch(xs, ours, dict(logp=st.logp, entropy=st.entropy), torch_outputs, scalar)


def run_op(op, xs, y, backend):
    """(outputs, a scalar to differentiate) of one public op on (hidden, weight, bias)."""
    h, w, b = xs
    if op == "token_stats":
        st = hk.token_stats(h, w, y, bias=b, backend=backend)
        return tuple(st), (st.logp - 0.5 * st.entropy + 0.25 * st.self_certainty - 0.1 * st.lse).sum()
    if op == "fused_loss":
        g = torch.Generator().manual_seed(1)
        terms = dict(rd_weight=torch.rand(N, generator=g) / N, rlif_weight=torch.rand(N, generator=g) / N,
                     advantages=torch.randn(N, generator=g), kl_weight=torch.full((N,), 0.05),
                     ref_logp=-torch.rand(N, generator=g) * 5)
        loss, st = hk.fused_loss(h, w, y, bias=b, backend=backend, **{k: v.to(DEVICE) for k, v in terms.items()})
        return (loss, *st), loss
    if op == "answer_span_logprobs":
        c = hk.answer_span_logprobs(h, w, y, torch.arange(N, device=DEVICE) % 4, 4, bias=b, reduce="sum",
                                    backend=backend)
        return (c,), c.sum()
    seq_ids = torch.arange(N, device=DEVICE) % 4
    loss, out = hk.prg_loss(h, w, y, seq_ids, prg=torch.tensor([0.9, 0.2, 0.6, 0.4], device=DEVICE),
                            is_rd=torch.tensor([True, False, True, False], device=DEVICE),
                            advantages=torch.tensor([0.0, 1.0, 0.0, -2.0], device=DEVICE), bias=b, backend=backend)
    return (loss, *out.stats), loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_stats", "fused_loss", "answer_span_logprobs", "prg_loss"])
def test_every_op_under_autocast_is_the_op_on_autocast_dtype_inputs(rng, backend, op):
    """fp32 inputs under autocast give exactly what bf16 copies give outside it: the inputs are cast
    once, the backend then runs as written (autocast off: its fp32 upcasts and GEMMs untouched), and
    the gradients are the bf16 ones converted to fp32."""
    xs, y = problem(rng)
    fp32, half = leaves(xs), leaves(xs, AMP)
    with autocast():
        outs, scalar = run_op(op, fp32, y, backend)
    scalar.backward()
    want, want_scalar = run_op(op, half, y, backend)
    want_scalar.backward()
    for a, b in zip(outs, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(fp32, half):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(rng, backend):
    """Outside autocast a bf16 hidden with an fp32 weight is refused; inside it both are cast, as
    F.linear casts them, and each gradient comes back in its own input's dtype."""
    (h, w, b), y = problem(rng)
    h = h.detach().to(AMP).requires_grad_()
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.bfloat16 \(the dtype of hidden\), "
                                        r"got torch.float32"):
        hk.fused_loss(h, w, y, reduction="sum", backend=backend)
    with autocast():
        loss, _ = hk.fused_loss(h, w, y, bias=b, reduction="sum", backend=backend)
    loss.backward()
    assert (h.grad.dtype, w.grad.dtype, b.grad.dtype) == (AMP, torch.float32, torch.float32)


def test_fp64_inputs_are_left_alone(rng):
    """Autocast does not cast fp64 tensors for F.linear, and neither does hykernels."""
    xs, y = problem(rng, torch.float64)
    with autocast():
        inside = hk.token_stats(xs[0], xs[1], y, bias=xs[2], backend="reference")
        with pytest.raises(TypeError, match="weight: expected dtype torch.float64"):
            hk.token_stats(xs[0], xs[1].detach().float(), y, backend="reference")
    outside = hk.token_stats(xs[0], xs[1], y, bias=xs[2], backend="reference")
    assert inside.logp.dtype == torch.float64 and torch.equal(inside.logp, outside.logp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_keeps_no_cast_copies(rng, backend):
    """The graph of fused_loss under autocast holds its three gradients (in the autocast dtype)
    and nothing else: the bf16 copies of hidden, weight and bias are gone after the call."""
    xs, y = problem(rng)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = hk.fused_loss(xs[0], xs[1], y, bias=xs[2], reduction="mean", backend=backend)
    assert saved == [((N, D), AMP), ((V, D), AMP), ((V,), AMP)]
    loss.backward()
    assert all(x.grad.dtype == torch.float32 for x in xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_autocast_of_a_call_outside_it(rng, backend):
    """A backward pass called inside an autocast region recomputes the logits of a call made
    outside it as written (fp32 here), not in the autocast dtype."""
    xs, y = problem(rng)
    grads = []
    for inside in (False, True):
        ours = leaves(xs)
        st = hk.token_stats(ours[0], ours[1], y, bias=ours[2], backend=backend)
        with autocast(inside):
            (st.logp - st.entropy).sum().backward()
        grads.append([x.grad for x in ours])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
