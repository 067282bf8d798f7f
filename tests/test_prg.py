"""PRG (docs/math.md §3): answer-span support and per-trace gains and scores, every backend against
a naive per-trace transcription of §3 written here, hand-computed cases and bad input."""
import math
import re

import pytest
import torch

import hykernels as hk
import oracle
from conftest import BACKENDS, DEVICE
from test_token_stats import assert_within_rule

VARIANTS = ("progressive", "monotone", "net", "mean_gain", "min_gain")
FP64_BACKENDS = ["reference", "torch_chunked"]  # triton accumulates in fp32 and refuses fp64


def naive_prg(support, probes_per_trace, variant, eps=1e-6, tau_g=1.0):
    """§3 per trace in Python floats: (gains, scores)."""
    values, gains, scores, at = support.double().tolist(), [], [], 0
    for n in probes_per_trace:
        c, at = values[at:at + n], at + n
        d = [c[k] - c[k - 1] for k in range(1, n)]
        gains += d
        g = c[-1] - c[0]
        if variant == "progressive":
            rho = sum(max(x, 0.0) for x in d) / (sum(abs(x) for x in d) + eps) if d else 0.5
            scores.append(rho / (1.0 + math.exp(-g / tau_g)))
        elif variant == "monotone":
            scores.append(sum(x > 0 for x in d) / len(d) if d else 0.5)
        elif variant == "net":
            scores.append(g)
        elif variant == "mean_gain":
            scores.append(sum(d) / len(d) if d else 0.0)
        else:
            scores.append(min(d) if d else 0.0)
    return torch.tensor(gains, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64)


def random_traces(rng, dtype):
    """Ragged traces (K = 0 and K = 1 always among them, some K past one Triton block) with
    supports that walk up and down and sometimes repeat (Δ = 0 exactly)."""
    k = torch.cat([torch.tensor([0, 1, 0, 1]), torch.randint(0, 41, (10,), generator=rng)])
    k = k[torch.randperm(k.numel(), generator=rng)]
    steps = torch.randn(int((k + 1).sum()), generator=rng, dtype=torch.float64)
    steps[torch.rand(steps.numel(), generator=rng) < 0.15] = 0.0
    support = (steps.cumsum(0) - 3.0).to(dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), (k + 1).cumsum(0)])
    return support.to(DEVICE), offsets.to(DEVICE), (k + 1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prg_matches_naive_transcription(rng, backend, variant):
    support, offsets, probes = random_traces(rng, torch.float32)
    tau_g = float(torch.empty(()).uniform_(0.5, 2.0, generator=rng))
    out = hk.prg_gains(support, offsets, variant=variant, tau_g=tau_g, backend=backend)
    gains, scores = naive_prg(support.cpu(), probes, variant, tau_g=tau_g)
    assert out.gains.dtype == out.scores.dtype == torch.float32
    torch.testing.assert_close(out.gains.cpu().double(), gains, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.scores.cpu().double(), scores, rtol=1e-5, atol=1e-5)
    k = torch.tensor(probes) - 1
    assert out.gain_offsets.tolist() == [0] + k.cumsum(0).tolist()


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_prg_fp64_stays_fp64(rng, backend):
    support, offsets, probes = random_traces(rng, torch.float64)
    for variant in VARIANTS:
        out = hk.prg_gains(support, offsets, variant=variant, backend=backend)
        gains, scores = naive_prg(support.cpu(), probes, variant)
        assert out.scores.dtype == torch.float64
        torch.testing.assert_close(out.gains.cpu(), gains, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.scores.cpu(), scores, rtol=1e-12, atol=1e-12)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Traces: rising [0, 1, 3]; falling [-1, -2, -4]; K = 0 [-0.7]; up then down [0, 2, 1].
HAND_SUPPORT = [0.0, 1.0, 3.0, -1.0, -2.0, -4.0, -0.7, 0.0, 2.0, 1.0]
HAND_OFFSETS = [0, 3, 6, 7, 10]
HAND_GAINS = [1.0, 2.0, -1.0, -2.0, 2.0, -1.0]
HAND_SCORES = {
    "progressive": [3 / (3 + 1e-6) * sigmoid(3.0), 0.0, 0.25, 2 / (3 + 1e-6) * sigmoid(1.0)],
    "monotone": [1.0, 0.0, 0.5, 0.5],
    "net": [3.0, -3.0, 0.0, 1.0],
    "mean_gain": [1.5, -1.5, 0.0, 0.5],
    "min_gain": [1.0, -2.0, 0.0, -1.0],
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_prg_hand_computed(backend):
    support = torch.tensor(HAND_SUPPORT, device=DEVICE)
    offsets = torch.tensor(HAND_OFFSETS, device=DEVICE)
    for variant, expected in HAND_SCORES.items():
        out = hk.prg_gains(support, offsets, variant=variant, backend=backend)
        assert out.gains.tolist() == HAND_GAINS
        assert out.gain_offsets.tolist() == [0, 2, 4, 4, 6]
        torch.testing.assert_close(out.scores.cpu(), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # tau_g flattens the confidence gate: σ(3/2) for the rising trace
    out = hk.prg_gains(support, offsets, tau_g=2.0, backend=backend)
    assert out.scores[0].item() == pytest.approx(3 / (3 + 1e-6) * sigmoid(1.5), rel=1e-6)


def test_prg_outputs_are_detached():
    support = torch.tensor(HAND_SUPPORT, requires_grad=True)
    out = hk.prg_gains(support, torch.tensor(HAND_OFFSETS))
    assert not out.gains.requires_grad and not out.scores.requires_grad


def test_prg_and_spans_dispatch_through_resolve(monkeypatch):
    from hykernels.backends import torch_chunked

    calls = []
    for name in ("prg_scores", "segment_sum"):
        real = getattr(torch_chunked, name)
        monkeypatch.setattr(torch_chunked, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    hk.prg_gains(torch.tensor(HAND_SUPPORT), torch.tensor(HAND_OFFSETS))
    h, w, y, ids = span_inputs(torch.Generator().manual_seed(0), torch.float32)
    hk.answer_span_logprobs(h, w, y, ids, NUM_SPANS)
    assert calls == ["prg_scores", "segment_sum", "segment_sum"]  # mean: token counts, then logp sums


NUM_SPANS = 5


def span_inputs(rng, dtype, n=23, d=9, v=37):
    """Answer rows in NUM_SPANS spans (shuffled, not contiguous), some rows without a target;
    the first NUM_SPANS rows give every span a target."""
    h = (torch.randn(n, d, generator=rng, dtype=torch.float64) * 2).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=rng, dtype=torch.float64) / 3).to(DEVICE, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=rng)
    y[NUM_SPANS:][torch.rand(n - NUM_SPANS, generator=rng) < 0.3] = -100
    ids = torch.cat([torch.randperm(NUM_SPANS, generator=rng),
                     torch.randint(0, NUM_SPANS, (n - NUM_SPANS,), generator=rng)])
    return h, w, y.to(DEVICE), ids.to(DEVICE)


def naive_spans(logp, targets, span_ids, reduce):
    """Per-span sum (or mean over rows with a target) of logp, one span at a time."""
    out = []
    for s in range(NUM_SPANS):
        rows = span_ids == s
        total = logp[rows].sum()
        out.append(total / (rows & (targets != -100)).sum() if reduce == "mean" else total)
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_answer_span_logprobs_values_and_grads(rng, backend, reduce):
    h, w, y, ids = span_inputs(rng, torch.float32)
    b = torch.randn(w.shape[0], generator=rng).to(DEVICE).requires_grad_()
    ours = hk.answer_span_logprobs(h, w, y, ids, NUM_SPANS, reduce=reduce, bias=b, softcap=8.0,
                                   backend=backend, chunk_size=4)
    leaves = tuple(t.detach().double().requires_grad_() for t in (h, w, b))
    gold = naive_spans(oracle.stats(*leaves[:2], y, leaves[2], softcap=8.0)["logp"], y, ids, reduce)
    base = naive_spans(oracle.stats(h, w, y, b, softcap=8.0, gold=False)["logp"], y, ids, reduce)
    assert ours.shape == (NUM_SPANS,) and ours.dtype == torch.float32
    assert_within_rule("span logp", ours, gold, base, torch.float32)

    up = torch.randn(NUM_SPANS, generator=rng, dtype=torch.float64).to(DEVICE)
    g_ours = torch.autograd.grad(ours.double() @ up, (h, w, b))
    g_gold = torch.autograd.grad(gold @ up, leaves)
    g_base = torch.autograd.grad(base.double() @ up, (h, w, b))
    for name, a, g, bb in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_gold, g_base):
        assert_within_rule(name, a, g, bb, torch.float32)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_answer_span_logprobs_gradcheck_fp64(rng, backend, reduce):
    h, w, y, ids = span_inputs(rng, torch.float64, n=11, d=4, v=7)
    b = torch.randn(7, generator=rng, dtype=torch.float64).requires_grad_()

    def f(h, w, b):
        return hk.answer_span_logprobs(h, w, y, ids, NUM_SPANS, reduce=reduce, bias=b, temperature=0.8,
                                       backend=backend, chunk_size=3)

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_answer_span_checks_off_drop_out_of_range_rows(rng):
    """With value checks off an out-of-range span id counts towards no span (nothing written out
    of bounds), and a span without targets averages to NaN (0/0) rather than a made-up value."""
    h, w, y, ids = span_inputs(rng, torch.float32)
    bad = ids.clone()
    bad[-3:] = torch.tensor([NUM_SPANS, -1, 99])
    keep = slice(0, -3)
    hk.set_checks(False)
    try:
        for reduce in ("mean", "sum"):
            got = hk.answer_span_logprobs(h, w, y, bad, NUM_SPANS, reduce=reduce)
            want = hk.answer_span_logprobs(h[keep], w, y[keep], ids[keep], NUM_SPANS, reduce=reduce)
            torch.testing.assert_close(got, want)
        no_targets = torch.full_like(y, -100)
        assert torch.isnan(hk.answer_span_logprobs(h, w, no_targets, ids, NUM_SPANS)).all()
    finally:
        hk.set_checks(True)


def bad_span_call(**change):
    h, w, y, ids = span_inputs(torch.Generator().manual_seed(0), torch.float32)
    kw = dict(hidden=h, weight=w, targets=y, span_ids=ids, num_spans=NUM_SPANS) | change
    return hk.answer_span_logprobs(**kw)


def _one_span_without_targets():
    _, _, y, ids = span_inputs(torch.Generator().manual_seed(0), torch.float32)
    return torch.where(ids == 1, torch.full_like(y, -100), y)


BAD_SPAN_CALLS = [
    ("reduce: expected 'mean' or 'sum'", dict(reduce="max")),
    ("num_spans: expected a positive int", dict(num_spans=0)),
    ("num_spans: expected a positive int", dict(num_spans=2.0)),
    ("num_spans: expected a positive int", dict(num_spans=True)),
    ("span_ids: expected a torch.Tensor", dict(span_ids=[0, 1])),
    ("span_ids: expected an integer dtype", dict(span_ids=torch.zeros(23))),
    ("span_ids: expected shape [23]", dict(span_ids=torch.zeros(22, dtype=torch.long))),
    ("span_ids: expected ids in [0, 5) (num_spans), got 5 at row 3",
     dict(span_ids=torch.tensor([0, 1, 2, 5] + [4] * 19))),
    ("span_ids: expected ids in [0, 5) (num_spans), got -1 at row 0", dict(span_ids=torch.full((23,), -1))),
    ("span_ids: expected a tensor on cpu", dict(span_ids=torch.zeros(23, dtype=torch.long, device="meta"))),
    ("span_ids: span 1 has no row with a target", dict(targets=_one_span_without_targets())),
    ("hidden: expected a floating dtype", dict(hidden=torch.zeros(23, 9, dtype=torch.long))),
    ("backend: unknown backend", dict(backend="fastest")),
]


@pytest.mark.parametrize("message,change", BAD_SPAN_CALLS,
                         ids=[m.split(":")[0] + str(i) for i, (m, _) in enumerate(BAD_SPAN_CALLS)])
def test_bad_span_inputs_name_the_argument(message, change):
    with pytest.raises((ValueError, TypeError), match="^" + re.escape(message)):
        bad_span_call(**change)


def test_empty_span_is_fine_for_sum():
    out = bad_span_call(targets=_one_span_without_targets(), reduce="sum")
    assert out[1] == 0


def bad_prg_call(**change):
    kw = dict(support=torch.tensor(HAND_SUPPORT), probe_offsets=torch.tensor(HAND_OFFSETS)) | change
    return hk.prg_gains(**kw)


BAD_PRG_CALLS = [
    ("support", TypeError, dict(support=HAND_SUPPORT)),
    ("support", TypeError, dict(support=torch.arange(10))),
    ("support", ValueError, dict(support=torch.zeros(2, 5))),
    ("support", ValueError, dict(support=torch.tensor(HAND_SUPPORT[:4] + [float("nan")] + HAND_SUPPORT[5:]))),
    ("support", ValueError, dict(support=torch.tensor(HAND_SUPPORT[:9] + [float("inf")]))),
    ("probe_offsets", TypeError, dict(probe_offsets=torch.tensor([0.0, 3, 6, 7, 10]))),
    ("probe_offsets", TypeError, dict(probe_offsets=HAND_OFFSETS)),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([[0, 10]]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([0]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([1, 3, 6, 7, 10]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([0, 3, 3, 7, 10]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([0, 6, 3, 7, 10]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([0, 3, 6, 7, 9]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor([0, 3, 6, 7, 11]))),
    ("probe_offsets", ValueError, dict(probe_offsets=torch.tensor(HAND_OFFSETS, device="meta"))),
    ("variant", ValueError, dict(variant="max_gain")),
    ("eps", ValueError, dict(eps=0.0)),
    ("eps", ValueError, dict(eps=float("nan"))),
    ("tau_g", ValueError, dict(tau_g=-1.0)),
    ("backend", ValueError, dict(backend="fastest")),
]


@pytest.mark.parametrize("arg,exc,change", BAD_PRG_CALLS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_PRG_CALLS)])
def test_bad_prg_inputs_name_the_argument(arg, exc, change):
    with pytest.raises(exc, match=rf"^{arg}: "):
        bad_prg_call(**change)


def test_prg_offsets_checked_even_with_checks_off():
    """A bad offset would index out of bounds, so the offsets stay checked; NaN support propagates."""
    hk.set_checks(False)
    try:
        with pytest.raises(ValueError, match="^probe_offsets: expected strictly increasing"):
            bad_prg_call(probe_offsets=torch.tensor([0, 3, 3, 7, 10]))
        nan = bad_prg_call(support=torch.tensor([float("nan")] + HAND_SUPPORT[1:]), variant="net")
        assert torch.isnan(nan.scores[0]) and not torch.isnan(nan.scores[1:]).any()
    finally:
        hk.set_checks(True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
def test_triton_refuses_fp64_support_by_name():
    with pytest.raises(TypeError, match="^support: backend 'triton' takes float16, bfloat16, float32 inputs"):
        bad_prg_call(support=torch.tensor(HAND_SUPPORT, dtype=torch.float64), backend="triton")
