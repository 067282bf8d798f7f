"""Empty and degenerate batches: N = 0 rows give empty statistics and a zero loss that is part of
the graph (backward gives zero gradients of the inputs' shapes and dtypes) on every op and backend,
without calling the backend; prg_loss without target tokens (or without one kind) is 0, not NaN."""
import pytest
import torch

import hykernels as hk
from hykernels import backends
from conftest import BACKENDS, DEVICE

D, V = 12, 31
LEADS = [(0,), (3, 0)]  # leading shapes with no rows
DTYPES = [torch.float32, torch.bfloat16]
BACKEND_CALLS = ("token_stats", "token_partials", "token_stats_backward", "fused_loss", "segment_sum")


def inputs(lead, dtype=torch.float32, device=DEVICE):
    """(hidden [*lead, D], weight, bias) leaves and targets shaped like lead."""
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(*lead, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g))
    return [x.to(device, dtype).requires_grad_() for x in xs], torch.zeros(lead, dtype=torch.long, device=device)


def assert_zero_grads(xs):
    for x in xs:
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype, x.shape
        assert not x.grad.any()


def assert_empty_stats(stats, lead, float_dtype=torch.float32):
    for name, s in zip(stats._fields, stats):
        assert s.shape == lead, name
        assert s.dtype == (torch.int64 if name == "argmax" else float_dtype), name


@pytest.fixture(params=BACKENDS)
def empty_backend(request, monkeypatch):
    """A backend whose lm_head functions fail if called: an empty call never reaches them."""
    module = backends._load(request.param)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a backend was called with no rows")

    for name in BACKEND_CALLS:
        monkeypatch.setattr(module, name, refuse)
    return request.param


@pytest.fixture(params=[True, False], ids=["checks", "no_checks"])
def checks(request):
    hk.set_checks(request.param)
    yield request.param
    hk.set_checks(True)


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_token_stats(empty_backend, checks, lead, dtype):
    xs, y = inputs(lead, dtype)
    st = hk.token_stats(xs[0], xs[1], y, bias=xs[2], backend=empty_backend)
    assert_empty_stats(st, lead)
    (st.logp.sum() + st.entropy.sum() + st.self_certainty.sum() + st.lse.sum()).backward()
    assert_zero_grads(xs)
    assert_empty_stats(hk.token_stats(xs[0], xs[1], backend=empty_backend), lead)  # no targets at all


# name -> fused_loss kwargs, given an empty per-token tensor t and empty sequence ids s
LOSSES = {
    "default_mean": lambda t, s: dict(reduction="mean"),
    "sum": lambda t, s: dict(reduction="sum"),
    "per_token": lambda t, s: dict(reduction="none"),
    "smoothing_z_loss": lambda t, s: dict(reduction="mean", label_smoothing=0.1, z_loss=1e-4),
    "all_terms": lambda t, s: dict(rd_weight=t, rlif_weight=t, advantages=t, old_logp=t, ref_logp=t, kl_weight=t,
                                   entropy_weight=0.01),
    "gspo_two_sequences": lambda t, s: dict(rlif_weight=1.0, advantages=torch.ones(2, device=DEVICE), seq_ids=s,
                                            importance_sampling_level="sequence", use_bias_correction_kl=True,
                                            kl_weight=0.1, ref_logp=t),
    "gspo_no_sequences": lambda t, s: dict(rlif_weight=1.0, advantages=t, seq_ids=s,
                                           importance_sampling_level="sequence"),
}


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("which", list(LOSSES))
def test_fused_loss(empty_backend, checks, lead, which):
    xs, y = inputs(lead)
    terms = LOSSES[which](torch.zeros(lead, device=DEVICE), torch.zeros(lead, dtype=torch.long, device=DEVICE))
    loss, st = hk.fused_loss(xs[0], xs[1], y, bias=xs[2], backend=empty_backend, **terms)
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert loss.shape == (lead if which == "per_token" else ())
    assert not loss.any()
    assert_empty_stats(st, lead)
    loss.sum().backward()
    assert_zero_grads(xs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_loss_under_no_grad_and_autocast(empty_backend, dtype):
    xs, y = inputs((0,), dtype)
    with torch.no_grad():
        loss, _ = hk.fused_loss(xs[0], xs[1], y, reduction="mean", backend=empty_backend)
    assert loss.item() == 0.0 and not loss.requires_grad
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, st = hk.fused_loss(xs[0], xs[1], y, bias=xs[2], reduction="mean", backend=empty_backend)
    assert loss.dtype == st.logp.dtype == torch.float32
    loss.backward()
    assert_zero_grads(xs)  # in each input's own dtype


def test_answer_span_logprobs(empty_backend, checks):
    xs, y = inputs((0,))
    spans = torch.zeros(0, dtype=torch.long, device=DEVICE)
    c = hk.answer_span_logprobs(xs[0], xs[1], y, spans, 3, bias=xs[2], reduce="sum", backend=empty_backend)
    assert c.shape == (3,) and c.dtype == torch.float32 and not c.any()
    c.sum().backward()
    assert_zero_grads(xs)
    if checks:  # a mean over a span without rows: refused, as for any empty span
        with pytest.raises(ValueError, match="span_ids: span 0 has no row with a target"):
            hk.answer_span_logprobs(xs[0], xs[1], y, spans, 3, reduce="mean", backend=empty_backend)


# --- prg_loss -------------------------------------------------------------------------------

KINDS = {"rd_only": [True, True, True], "rlif_only": [False, False, False], "mixed": [True, False, False]}


def sequences(kinds, lead=(12,)):
    """prg_loss's per-sequence arguments for ``kinds``, tokens split evenly over the sequences."""
    s = len(kinds)
    n = lead[-1] if lead else 0
    seq_ids = (torch.arange(n) * s // max(n, 1)).reshape(lead) if s else torch.full(lead, -1)
    return seq_ids.to(DEVICE), dict(prg=torch.linspace(0.2, 0.9, s, device=DEVICE),
                                    is_rd=torch.tensor(kinds, dtype=torch.bool, device=DEVICE),
                                    rewards=torch.arange(s, dtype=torch.float32, device=DEVICE),
                                    group_ids=torch.zeros(s, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kinds", list(KINDS))
def test_prg_loss_without_target_tokens_is_zero(backend, kinds):
    xs, _ = inputs((12,))
    seq_ids, seqs = sequences(KINDS[kinds])
    y = torch.full((12,), -100, device=DEVICE)
    loss, out = hk.prg_loss(xs[0], xs[1], y, seq_ids, bias=xs[2], backend=backend, **seqs)
    assert loss.item() == 0.0 and torch.isfinite(out.rd_weights).all() and torch.isfinite(out.advantages).all()
    loss.backward()
    assert_zero_grads(xs)


@pytest.mark.parametrize("kinds", list(KINDS) + ["none"])
def test_prg_loss_on_no_rows_is_zero(empty_backend, kinds):
    """An empty batch, with the per-sequence inputs of its sequences (or of none at all)."""
    xs, y = inputs((0,))
    seq_ids, seqs = sequences(KINDS.get(kinds, []), lead=(0,))
    loss, out = hk.prg_loss(xs[0], xs[1], y, seq_ids, bias=xs[2], backend=empty_backend, **seqs)
    assert loss.item() == 0.0 and out.stats.logp.shape == (0,)
    loss.backward()
    assert_zero_grads(xs)
    loss, _ = hk.HyTuningLoss(backend=empty_backend)(xs[0], xs[1], y, seq_ids, **seqs)
    assert loss.item() == 0.0


def test_prg_loss_with_one_kind_has_no_nan(rng):
    """A batch of one kind uses only that term (λ = 1 or 0): finite, the other term exactly 0, also
    with an RLIF group of a single rollout (advantage 0)."""
    xs, y = inputs((12,))
    y = torch.randint(0, V, (12,), generator=rng).to(DEVICE)
    for kinds in ("rd_only", "rlif_only"):
        seq_ids, seqs = sequences(KINDS[kinds])
        seqs["group_ids"] = torch.arange(3, device=DEVICE)  # every rollout alone in its group
        loss, out = hk.prg_loss(xs[0], xs[1], y, seq_ids, backend="reference", **seqs)
        assert out.lam == (1.0 if kinds == "rd_only" else 0.0) and torch.isfinite(loss)
        if kinds == "rlif_only":
            assert loss.item() == 0.0 and not out.advantages.any()
        loss.backward()
        assert torch.isfinite(xs[0].grad).all() and torch.isfinite(xs[1].grad).all()
