"""torch.compile: the public ops are torch.library custom ops (hykernels/_ops.py), so a training
step calling fused_loss, token_stats or prg_loss compiles with fullgraph=True (where a graph
break is an error) and equals the eager step: the loss and every gradient, on every backend.

The step's loss is compiled and backward() runs the compiled graph's backward (AOTAutograd), the
usual form of a compiled training step. loss.backward() inside the compiled region (dynamo's
trace_autograd_ops, experimental in torch 2.13) also traced without graph breaks, but it leaves
dynamo state behind that breaks a later FlexAttention compile in the same process
(tests/test_probes.py), so it is not part of the suite. torch.library.opcheck checks each op's
schema, fake and autograd registrations."""
import pytest
import torch

import hykernels as hk
from hykernels import _ops
from hykernels._ops import BackendSpec, flat
from hykernels._types import LogitOptions, LossTerms
from hykernels.hytuning.objective import HyTuningConfig, prg_token_weights
from conftest import BACKENDS, DEVICE

D_IN, D, V = 6, 12, 37
IGN = -100


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles its own step: no cache limit reached (which would fall back to eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Tiny(torch.nn.Module):
    """A Linear trunk and an lm_head (weight [V, D], bias)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Linear(D_IN, D)
        self.lm_head = torch.nn.Linear(D, V)
        self.to(DEVICE)


def data(lead=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D_IN, generator=g)
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[::4] = IGN
    return x.to(DEVICE), y.to(DEVICE)


def fused_loss_terms(y, seed=2):
    g = torch.Generator().manual_seed(seed)
    per_token = lambda: torch.rand(y.shape, generator=g).to(DEVICE)  # noqa: E731
    old = -3.0 - torch.rand(y.shape, generator=g).to(DEVICE)  # off-policy: ratios away from 1
    return dict(rd_weight=per_token() / 10, rlif_weight=per_token() / 10, advantages=per_token() - 0.5,
                old_logp=old, entropy_weight=per_token() / 100)


def fused_loss_step(model, x, y, backend, **terms):
    loss, out = hk.fused_loss(model.trunk(x), model.lm_head.weight, y, bias=model.lm_head.bias, backend=backend,
                              chunk_size=4, **terms)
    return loss + out.entropy.sum() * 0  # the statistics are part of the graph too (detached)


def token_stats_step(model, x, y, backend):
    st = hk.token_stats(model.trunk(x), model.lm_head.weight, y, bias=model.lm_head.bias, backend=backend,
                        chunk_size=4, temperature=0.9)
    mask = (y != IGN).float()
    return -(st.logp * mask).sum() / mask.sum() - 0.01 * st.entropy.mean() + 0.001 * st.lse.square().mean()


def prg_inputs(seed=3):
    """A packed batch of 4 sequences (2 RD, 2 RLIF in two groups) and 3 tokens of none."""
    g = torch.Generator().manual_seed(seed)
    lens = [4, 3, 5, 4]
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((3,), -1)])
    x, y = data((seq_ids.numel(),), seed)
    per_seq = dict(prg=torch.rand(4, generator=g), is_rd=torch.tensor([True, True, False, False]),
                   rewards=torch.randn(4, generator=g), group_ids=torch.tensor([0, 0, 5, 5]))
    return x, y, seq_ids.to(DEVICE), {k: v.to(DEVICE) for k, v in per_seq.items()}


def prg_loss_step(model, x, y, backend, seq_ids, per_seq, **extra):
    loss, out = hk.prg_loss(model.trunk(x), model.lm_head.weight, y, seq_ids, bias=model.lm_head.bias,
                            backend=backend, chunk_size=4, **per_seq, **extra)
    return loss + out.rd_weights.sum() * 0


def eager_and_compiled(loss_fn, *args, compiler="aot_eager", **kwargs):
    """(loss, grads) of the eager step and of the step with its loss compiled (fullgraph)."""
    model = Tiny()

    def step(fn):
        for p in model.parameters():
            p.grad = None
        loss = fn(model, *args, **kwargs)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    eager = step(loss_fn)
    return eager, step(torch.compile(loss_fn, fullgraph=True, backend=compiler))


def assert_same(eager, *compiled):
    for loss, grads in compiled:
        torch.testing.assert_close(loss, eager[0], rtol=1e-6, atol=1e-7)
        assert len(grads) == len(eager[1])
        for a, b in zip(grads, eager[1]):
            assert a is not None
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss(backend):
    x, y = data()
    assert_same(*eager_and_compiled(fused_loss_step, x, y, backend, **fused_loss_terms(y)))


@pytest.mark.parametrize("options", [dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3),
                                     dict(importance_sampling_level="sequence", use_bias_correction_kl=True,
                                          kl_weight=0.05)], ids=["mean_smoothing_zloss", "sequence_ratio"])
def test_fused_loss_options(options):
    """Reductions, cross-entropy options and sequence-level ratios (sequences = rows of [B, T])
    take the same op: no graph break."""
    x, y = data()
    terms = fused_loss_terms(y)
    if "kl_weight" in options:
        terms = dict(rlif_weight=terms["rlif_weight"], advantages=terms["advantages"], old_logp=terms["old_logp"],
                     ref_logp=terms["old_logp"] + 0.3)
    else:
        terms = {}
    assert_same(*eager_and_compiled(fused_loss_step, x, y, "torch_chunked", **terms, **options))


def test_fused_loss_reduction_none():
    """reduction="none": per-token losses with any upstream gradient (the per_token_loss op)."""

    def step(model, x, y, backend):
        loss, _ = hk.fused_loss(model.trunk(x), model.lm_head.weight, y, bias=model.lm_head.bias,
                                reduction="none", backend=backend, chunk_size=4)
        return (loss * torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE).reshape(loss.shape)).sum()

    x, y = data()
    assert_same(*eager_and_compiled(step, x, y, "torch_chunked"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats(backend):
    x, y = data()
    assert_same(*eager_and_compiled(token_stats_step, x, y, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prg_loss(backend):
    x, y, seq_ids, per_seq = prg_inputs()
    assert_same(*eager_and_compiled(prg_loss_step, x, y, backend, seq_ids, per_seq))


def test_prg_loss_given_lambda_and_kl():
    """λ given (HyTuningLoss's EMA, passed in a compiled step) and the KL and entropy terms."""
    x, y, seq_ids, per_seq = prg_inputs()
    cfg = HyTuningConfig(kl_coef=0.1, entropy_coef=0.01)
    ref = torch.full(y.shape, -3.5, device=DEVICE)
    assert_same(*eager_and_compiled(prg_loss_step, x, y, "torch_chunked", seq_ids, per_seq, lam=0.3, config=cfg,
                                    ref_logp=ref))


def test_answer_span_logprobs_without_value_checks():
    """Span and empty-span checks read host values: with value checks off nothing breaks the graph."""
    spans = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2, 0, 1, 1, 2], device=DEVICE)

    def step(model, x, y, backend):
        c = hk.answer_span_logprobs(model.trunk(x), model.lm_head.weight, y, spans, 3, bias=model.lm_head.bias,
                                    backend=backend, chunk_size=4)
        return -(c * torch.tensor([1.0, 2.0, 3.0], device=DEVICE)).sum()

    x, y = data((15,))
    hk.set_checks(False)
    try:
        assert_same(*eager_and_compiled(step, x, y, "torch_chunked"))
    finally:
        hk.set_checks(True)


def test_prg_lambda_is_a_tensor_when_compiled():
    x, y, seq_ids, per_seq = prg_inputs()
    model = Tiny()

    def lam(x):
        return hk.prg_loss(model.trunk(x), model.lm_head.weight, y, seq_ids, backend="torch_chunked", **per_seq)[1].lam

    eager, compiled = lam(x), torch.compile(lam, fullgraph=True, backend="aot_eager")(x)
    assert isinstance(eager, float) and isinstance(compiled, torch.Tensor) and compiled.item() == eager


def test_inductor():
    """The same fused_loss step through inductor (C++ on CPU): the custom ops stay opaque."""
    x, y = data()
    assert_same(*eager_and_compiled(fused_loss_step, x, y, "torch_chunked", compiler="inductor",
                                    **fused_loss_terms(y)))


def test_value_checks_still_raise_when_compiled():
    """Value checks run inside the ops, at run time: a compiled step still refuses a bad target."""
    x, y = data()
    y[0, 1] = V
    model = Tiny()
    with pytest.raises(ValueError, match="targets: expected ids"):
        torch.compile(fused_loss_step, fullgraph=True, backend="aot_eager")(model, x, y, "torch_chunked",
                                                                             rd_weight=1.0)


# --- opcheck ------------------------------------------------------------------------------------


def op_inputs(seed=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(7, 5, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(11, 5, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    b = torch.randn(11, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    y = torch.randint(0, 11, (7,), generator=g).to(DEVICE)
    y[2] = IGN
    call = (*flat(LogitOptions(temperature=0.8, softcap=5.0, chunk_size=3)), *flat(BackendSpec("torch_chunked", 11)))
    return h, w, b, y, call


def test_opcheck_token_stats():
    h, w, b, y, call = op_inputs()
    torch.library.opcheck(_ops.token_stats, (h, w, b, y, *call))
    torch.library.opcheck(_ops.token_stats, (h, w, None, y, *call))
    lse = torch.zeros(7, dtype=h.dtype)
    coefs = [torch.rand(7, dtype=h.dtype) for _ in range(4)]
    args = (h.detach(), w.detach(), b.detach(), y, lse, lse, *coefs, *call)
    torch.library.opcheck(_ops.token_stats_backward, (*args, [True, False, True]))


def test_opcheck_fused_loss_and_per_token_loss():
    h, w, b, y, call = op_inputs()
    n = y.numel()
    terms = LossTerms(rd_weight=torch.rand(n, dtype=h.dtype), rlif_weight=torch.rand(n, dtype=h.dtype),
                      advantages=torch.randn(n, dtype=h.dtype), old_logp=torch.full((n,), -2.5, dtype=h.dtype),
                      vocab_size=11, label_smoothing=0.1)
    torch.library.opcheck(_ops.fused_loss, (h, w, b, y, *call, *flat(terms), [True, True, True]))
    torch.library.opcheck(_ops.fused_loss, (h.detach(), w, None, y, *call, *flat(terms), [False, True, False]))
    torch.library.opcheck(_ops.per_token_loss, (h, w, b, y, *call, *flat(terms)))


def test_opcheck_segment_sum_and_prg_token_weights():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(9, generator=g).requires_grad_()
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 3, 0])
    torch.library.opcheck(_ops.segment_sum, (values, ids, 4, "torch_chunked"))
    _, y, seq_ids, per_seq = prg_inputs()
    cfg = flat(HyTuningConfig())
    args = (y, seq_ids, per_seq["prg"], per_seq["is_rd"], None, per_seq["rewards"], per_seq["group_ids"])
    torch.library.opcheck(prg_token_weights, (*args, None, None, None, IGN, *cfg))
    torch.library.opcheck(prg_token_weights, (*args, torch.rand(y.shape, generator=g), 0.25, None, IGN, *cfg))
    torch.library.opcheck(prg_token_weights, (*args, None, 0.25, 0.4, IGN, *cfg))
