"""fused_loss's cross-entropy options (issue 13, item 4) against torch on materialised logits:
label_smoothing, z_loss (and its per-token read-out), class weights through rd_weight, and
reduction = "sum" / "mean" / "none"; every backend, rows without a target included."""
import re

import pytest
import torch
import torch.nn.functional as F

import hykernels as hk
import oracle
from cases import gradcheck_case, make_case
from conftest import DEVICE
from test_token_stats import BACKENDS, FP64_BACKENDS, assert_within_rule, grads

# Cases whose logits do not depend on the softcap/temperature order (only one of them is set).
CASES = [("ragged", "temp_bias_some_ignored"), ("large_logits", "softcap_some_ignored")]
OPTION_SETS = {
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "both": dict(label_smoothing=0.25, z_loss=1e-3),
}


def torch_loss(z, y, reduction, label_smoothing=0.0, z_loss=0.0, weight=None):
    """What a user writes with materialised logits z: torch's cross-entropy (+ z·lse² per token
    with a target, Liger's z-loss, reduced like the cross-entropy). Returns (loss, z-loss part
    per token)."""
    valid = y != -100
    ce = F.cross_entropy(z, y, weight=weight, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    zl = torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, torch.zeros_like(ce))
    if reduction == "none":
        return ce + zl, zl
    if reduction == "sum":
        return (ce + zl).sum(), zl
    t = valid.sum().clamp(min=1)
    mean_ce = F.cross_entropy(z, y, weight=weight, ignore_index=-100, label_smoothing=label_smoothing)
    return mean_ce + zl.sum() / t, zl / t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("shape,case_options", CASES)
def test_cross_entropy_options_match_torch(rng, backend, reduction, options, shape, case_options):
    c = make_case(rng, shape, case_options, torch.float32)
    opts = OPTION_SETS[options]
    inputs, gold_inputs = (c.hidden, c.weight, c.bias), c.fp64_leaves()
    loss, st = hk.fused_loss(c.hidden, c.weight, c.targets, reduction=reduction, backend=backend,
                             chunk_size=c.chunk_size, **opts, **c.kwargs())
    z_gold = oracle.logits(*gold_inputs[:2], gold_inputs[2], c.temperature, c.softcap, gold=True)
    z_base = oracle.logits(c.hidden, c.weight, c.bias, c.temperature, c.softcap, gold=False)
    gold, gold_z = torch_loss(z_gold, c.targets, reduction, **opts)
    base, base_z = torch_loss(z_base, c.targets, reduction, **opts)
    assert loss.shape == (() if reduction != "none" else c.targets.shape) and loss.dtype == torch.float32
    assert_within_rule("loss", loss, gold, base, torch.float32)
    assert_within_rule("z_loss", st.z_loss, gold_z, base_z, torch.float32)
    if reduction == "none":
        assert torch.all(loss[c.targets == -100] == 0)
    up = torch.randn(loss.shape, generator=rng, dtype=torch.float64).to(DEVICE)  # any upstream gradient
    g_ours = grads((loss * up).sum(), inputs)
    g_gold = grads((gold * up).sum(), gold_inputs)
    g_base = grads((base * up).sum(), inputs)
    for name, a, g, b in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_gold, g_base):
        assert_within_rule(name, a, g, b, torch.float32)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weights_through_rd_weight(rng, backend, reduction):
    """rd_weight = cw[y] / Σ_valid cw[y] is F.cross_entropy(weight=cw) (mean); cw[y] with
    reduction='none' is its per-token loss."""
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float64)
    cw = torch.rand(c.weight.shape[0], generator=rng, dtype=torch.float64).to(DEVICE) + 0.1
    valid = c.targets != -100
    w_tok = torch.where(valid, cw[c.targets.clamp(min=0)], torch.zeros((), dtype=torch.float64, device=DEVICE))
    rd = w_tok / w_tok.sum() if reduction == "mean" else w_tok
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=rd, backend=backend, chunk_size=5,
                            reduction=None if reduction == "mean" else "none", **c.kwargs())
    z = oracle.logits(c.hidden, c.weight, c.bias, c.temperature, c.softcap)
    want = F.cross_entropy(z, c.targets, weight=cw, reduction=reduction)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    up = torch.randn(loss.shape, generator=rng, dtype=torch.float64)
    for a, b in zip(grads((loss * up).sum(), (c.hidden, c.weight, c.bias)),
                    grads((want * up).sum(), (c.hidden, c.weight, c.bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_reduction_none_gradcheck(rng, backend):
    """reduction='none' recomputes the logits in backward with a per-token upstream gradient."""
    c, h, w, y, b = gradcheck_case(rng)
    adv = torch.randn(6, generator=rng, dtype=torch.float64).to(DEVICE)
    # off-policy: on-policy ρ ≡ 1 has a policy gradient but a constant value, which gradcheck cannot see
    logp = hk.token_stats(h, w, y, bias=b, softcap=c.softcap).logp.detach()
    old = logp - 0.05 * torch.randn(6, generator=rng, dtype=torch.float64).to(DEVICE)

    def f(h, w, b):
        return hk.fused_loss(h, w, y, bias=b, softcap=c.softcap, rd_weight=0.5, rlif_weight=0.3, advantages=adv,
                             old_logp=old, entropy_weight=0.1, label_smoothing=0.2, z_loss=0.05, reduction="none",
                             backend=backend, chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_reductions_agree_and_mean_of_nothing_is_zero(rng):
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float64, requires_grad=False)
    t = dict(rd_weight=0.7, entropy_weight=0.01, z_loss=1e-3, label_smoothing=0.1, **c.kwargs())
    per_token, st = hk.fused_loss(c.hidden, c.weight, c.targets, reduction="none", **t)
    total, st_sum = hk.fused_loss(c.hidden, c.weight, c.targets, reduction="sum", **t)
    default, _ = hk.fused_loss(c.hidden, c.weight, c.targets, **t)
    mean, st_mean = hk.fused_loss(c.hidden, c.weight, c.targets, reduction="mean", **t)
    count = (c.targets != -100).sum()
    torch.testing.assert_close(per_token.sum(), total)
    torch.testing.assert_close(default, total)
    torch.testing.assert_close(mean, total / count)
    torch.testing.assert_close(st_mean.z_loss, st_sum.z_loss / count)
    torch.testing.assert_close(st.z_loss, st_sum.z_loss)
    for name in ("logp", "entropy", "self_certainty", "lse"):
        torch.testing.assert_close(getattr(st, name), getattr(st_sum, name))
    nothing = torch.full_like(c.targets, -100)
    empty, st_empty = hk.fused_loss(c.hidden, c.weight, nothing, reduction="mean", **c.kwargs())
    assert empty.item() == 0.0 and torch.all(st_empty.z_loss == 0)


def test_plain_cross_entropy_by_reduction_alone(rng):
    """With a reduction and no term, fused_loss is F.cross_entropy with that reduction."""
    c = make_case(rng, "ragged", "plain", torch.float64, requires_grad=False)
    z = oracle.logits(c.hidden, c.weight, c.bias)
    for reduction in ("mean", "sum", "none"):
        loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, reduction=reduction)
        torch.testing.assert_close(loss, F.cross_entropy(z, c.targets, reduction=reduction))


def test_z_loss_readout_is_liger_return_z_loss(rng):
    """stats.z_loss.sum() under reduction='mean' is Liger's return_z_loss value:
    z·Σ_valid lse² / T, the part of the loss the z-loss adds."""
    c = make_case(rng, "ragged", "temp_bias_some_ignored", torch.float64, requires_grad=False)
    with_z, st = hk.fused_loss(c.hidden, c.weight, c.targets, reduction="mean", z_loss=1e-2, **c.kwargs())
    without, _ = hk.fused_loss(c.hidden, c.weight, c.targets, reduction="mean", **c.kwargs())
    valid = c.targets != -100
    lse = torch.logsumexp(oracle.logits(c.hidden, c.weight, c.bias, c.temperature), -1)
    torch.testing.assert_close(st.z_loss.sum(), 1e-2 * lse[valid].square().sum() / valid.sum())
    torch.testing.assert_close(with_z - without, st.z_loss.sum())


def test_shapes_follow_targets(rng):
    c = make_case(rng, "ragged", "plain", torch.float32, requires_grad=False)
    h, y = c.hidden[:36].reshape(4, 9, -1), c.targets[:36].reshape(4, 9)
    loss, st = hk.fused_loss(h, c.weight, y, reduction="none", z_loss=1e-3)
    assert loss.shape == (4, 9) and st.z_loss.shape == (4, 9) and st.logp.shape == (4, 9)


BAD = [
    ("label_smoothing: expected a number in [0.0, 1.0]", dict(rd_weight=1.0, label_smoothing=1.5)),
    ("label_smoothing: expected", dict(rd_weight=1.0, label_smoothing=float("nan"))),
    ("z_loss: expected a number in [0.0, inf]", dict(rd_weight=1.0, z_loss=-1e-4)),
    ("label_smoothing: modifies the cross-entropy term", dict(rlif_weight=1.0, advantages=1.0, label_smoothing=0.1)),
    ("z_loss: modifies the cross-entropy term", dict(entropy_weight=1.0, z_loss=0.1)),
    ("reduction: expected one of", dict(rd_weight=1.0, reduction="avg")),
    ("importance_sampling_level: expected one of", dict(rd_weight=1.0, importance_sampling_level="seq")),
    ("use_bias_correction_kl: expected a bool", dict(rd_weight=1.0, use_bias_correction_kl=1)),
    ("seq_ids: required with importance_sampling_level='sequence'",
     dict(rlif_weight=1.0, advantages=1.0, importance_sampling_level="sequence")),
    ("advantages: expected shape [6]", dict(rlif_weight=1.0, advantages=torch.ones(4))),
    ("advantages: expected shape like targets, or [3] / [3, 1]",
     dict(rlif_weight=1.0, advantages=torch.ones(3, 2), seq_ids=torch.tensor([0, 0, 1, 1, 2, 2]))),
    ("seq_ids: expected ids in [-1, 2)",
     dict(rlif_weight=1.0, advantages=torch.ones(2), seq_ids=torch.tensor([0, 0, 1, 1, 2, 2]))),
    ("seq_ids: expected shape [6]", dict(rlif_weight=1.0, advantages=torch.ones(2), seq_ids=torch.zeros(5).long())),
    ("reduction: 'none' (per-token losses) is not defined",
     dict(rlif_weight=1.0, advantages=1.0, reduction="none", importance_sampling_level="sequence",
          seq_ids=torch.zeros(6).long())),
]


@pytest.mark.parametrize("message,kwargs", BAD, ids=[m.split(":")[0] + str(i) for i, (m, _) in enumerate(BAD)])
def test_bad_options_name_the_argument(message, kwargs):
    g = torch.Generator().manual_seed(0)
    h, w, y = torch.randn(6, 4, generator=g), torch.randn(11, 4, generator=g), torch.randint(0, 11, (6,), generator=g)
    with pytest.raises((ValueError, TypeError), match="^" + re.escape(message)):
        hk.fused_loss(h, w, y, **kwargs)
