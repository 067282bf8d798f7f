"""The §6 recipe: prg_loss / HyTuningLoss against a plain-PyTorch transcription, rewards, advantages."""
import math

import pytest
import torch

import hykernels as hk
from hykernels import backends
import oracle
from conftest import BACKENDS
from hykernels.hytuning import HyTuningConfig, HyTuningLoss, group_advantages, rewards_from_stats
from hykernels.hytuning.objective import rd_sequence_weights

IGN = -100


def batch(rng, kinds=(True, True, False, False, False, False), dtype=torch.float64):
    """A packed batch: sequences of ragged length, the first token of each without a target,
    a few tokens (padding) in no sequence."""
    lens = torch.randint(3, 9, (len(kinds),), generator=rng).tolist()
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((3,), -1)])
    n, d, v = seq_ids.numel(), 12, 97
    h = (torch.randn(n, d, generator=rng, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=rng, dtype=torch.float64) / 3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=rng)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    y[starts] = IGN
    y[-3:] = IGN
    return dict(h=h, w=w, y=y, seq_ids=seq_ids, is_rd=torch.tensor(kinds),
                prg=torch.rand(len(kinds), generator=rng, dtype=torch.float64).to(dtype),
                rewards=torch.randn(len(kinds), generator=rng, dtype=torch.float64).to(dtype), group_ids=torch.tensor([7, 7, 3, 3, 3, 9])[:len(kinds)])


def transcription(b, cfg, lam=None, rd_prg_mean=None):
    """§4 + §6 written out per sequence and per token, autograd through fp64 oracle stats."""
    st = oracle.stats(b["h"], b["w"], b["y"])
    prg, is_rd = b["prg"].double(), b["is_rd"]
    S = len(prg)
    if lam is None:
        if is_rd.all():
            lam = 1.0
        elif not is_rd.any():
            lam = 0.0
        else:
            gap = prg[is_rd].mean() - prg[~is_rd].mean()
            lam = min(max(cfg.lambda0 + cfg.kappa * gap.item(), cfg.lambda_min), cfg.lambda_max)
    mean_rd = rd_prg_mean if rd_prg_mean is not None else prg[is_rd].mean() if is_rd.any() else None
    adv = torch.zeros(S, dtype=torch.float64)
    rl = [i for i in range(S) if not is_rd[i]]
    for g in set(b["group_ids"][rl].tolist()):
        members = [i for i in rl if b["group_ids"][i] == g]
        u = torch.stack([prg[i] * b["rewards"][i].double() for i in members])
        a = (u - u.mean()) / (u.std(unbiased=False) + cfg.eps)
        for i, ai in zip(members, a):
            adv[i] = ai
    has = (b["seq_ids"] >= 0) & (b["y"] != IGN)
    t_rd = sum(int(has[t]) for t in range(len(has)) if b["seq_ids"][t] >= 0 and is_rd[b["seq_ids"][t]])
    t_rl = int(has.sum()) - t_rd
    total = 0.0
    for t in range(len(has)):
        if not has[t]:
            continue
        i = int(b["seq_ids"][t])
        if is_rd[i]:
            d = cfg.rd_weight_smoothing  # PRG in [0, 1] here: w_i = (PRG_i + δ) / (m + δ), clamped
            w_i = min(max(((prg[i] + d) / (mean_rd + d)).item(), cfg.rd_weight_min), cfg.rd_weight_max)
            total = total + lam * w_i / t_rd * (-st["logp"][t])
        else:
            ratio = torch.exp(st["logp"][t] - st["logp"][t].detach())  # on-policy GRPO
            total = total - (1 - lam) / t_rl * ratio * adv[i]
    return total, lam, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kinds", [(True, True, False, False, False, False), (True, True, True),
                                   (False, False, False, False, False, False)], ids=["mixed", "rd_only", "rlif_only"])
def test_prg_loss_equals_transcription(rng, backend, kinds):
    dtype = torch.float64 if torch.float64 in backends._load(backend).DTYPES else torch.float32
    b = batch(rng, kinds, dtype)
    cfg = HyTuningConfig()
    loss, out = hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"],
                            group_ids=b["group_ids"], backend=backend)
    want, lam, adv = transcription(b, cfg)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    assert out.lam == pytest.approx(lam)
    torch.testing.assert_close(out.advantages.double(), adv, **tol)
    torch.testing.assert_close(loss.double(), want.double(), **tol)
    for a, g in zip(torch.autograd.grad(loss, (b["h"], b["w"])), torch.autograd.grad(want, (b["h"], b["w"]))):
        torch.testing.assert_close(a.double(), g.double(), **tol)


def test_rd_prg_mean_normalises_trace_weights(rng):
    """rd_prg_mean (a whole batch's mean PRG of traces, when it is split over calls) replaces this
    call's own mean in w_i, and nothing else."""
    b = batch(rng)
    cfg = HyTuningConfig()
    kw = dict(prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"], group_ids=b["group_ids"])
    loss, out = hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], rd_prg_mean=0.37, **kw)
    want, _, _ = transcription(b, cfg, rd_prg_mean=0.37)
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-9, atol=1e-12)
    d = cfg.rd_weight_smoothing
    w = ((b["prg"][:2] + d) / (0.37 + d)).clamp(cfg.rd_weight_min, cfg.rd_weight_max)
    torch.testing.assert_close(out.rd_weights[:2], w)
    own, _ = hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], rd_prg_mean=float(b["prg"][:2].mean()), **kw)
    torch.testing.assert_close(own, hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], **kw)[0])
    with pytest.raises(ValueError, match="rd_prg_mean: expected a finite number"):
        hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], rd_prg_mean=float("nan"), **kw)


@pytest.mark.parametrize("variant_range", [(0.0, 1.0), (-2.0, 2.0)])
def test_rd_weights_are_continuous_in_prg(rng, variant_range):
    """docs/math.md §6: equal PRGs give every trace weight 1 whatever their value, 0 included (the
    plain ratio PRG_i / (mean + ε) gave rd_weight_min = 0.2 at 0 and 1 just above it); a small
    change of the PRGs moves the weights by a bounded amount, at 0 and across it: at most 6/δ times
    the change in max-norm (|m| + δ >= δ; ∂w_i/∂PRG_i contributes 1/δ, the mean's share 5/δ, as
    unclamped weights have |PRG_i − m| <= 4·(|m| + δ)); and a higher PRG never weighs less. The second range holds variants that go below 0 (net, mean_gain, min_gain)."""
    cfg = HyTuningConfig()
    is_rd = torch.tensor([True, True, True, False])
    weights = lambda prg: rd_sequence_weights(prg.double(), is_rd, cfg)[:3]  # noqa: E731
    lo, hi = variant_range
    for value in (0.0, 1e-9, 1e-3, 0.5, hi, lo):
        torch.testing.assert_close(weights(torch.full((4,), value)), torch.ones(3, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    step = 1e-6
    for _ in range(200):
        prg = lo + (hi - lo) * torch.rand(4, generator=rng, dtype=torch.float64)
        prg[:3][torch.rand(3, generator=rng) < 0.3] = 0.0  # some exactly at 0, where the jump was
        moved = prg + step * (2 * torch.rand(4, generator=rng, dtype=torch.float64) - 1)
        assert (weights(moved) - weights(prg)).abs().max() <= 6 / cfg.rd_weight_smoothing * step
        w = weights(prg)
        order = prg[:3].argsort()
        assert (w[order].diff() >= -1e-12).all()
    assert (rd_sequence_weights(torch.rand(4, generator=rng), is_rd, cfg)[3] == 0).all()
    with pytest.raises(ValueError, match="rd_weight_smoothing: expected a number > 0"):
        HyTuningConfig(rd_weight_smoothing=0.0)


def test_prg_loss_takes_batched_tokens(rng):
    """[B, T] tokens (a padded batch, as a Trainer gives) equal the same tokens flattened."""
    b = batch(rng)
    n = b["y"].numel() - b["y"].numel() % 2
    kw = dict(prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"], group_ids=b["group_ids"])
    flat, _ = hk.prg_loss(b["h"][:n], b["w"], b["y"][:n], b["seq_ids"][:n], **kw)
    batched, out = hk.prg_loss(b["h"][:n].reshape(2, n // 2, -1), b["w"], b["y"][:n].reshape(2, -1),
                               b["seq_ids"][:n].reshape(2, -1), **kw)
    torch.testing.assert_close(batched, flat)
    assert out.stats.logp.shape == (2, n // 2)


def test_hytuning_loss_ema_state(rng):
    cfg = HyTuningConfig(ema=0.8)
    module = HyTuningLoss(cfg)
    lam = cfg.lambda0
    for _ in range(3):
        b = batch(rng)
        step = min(max(cfg.lambda0 + cfg.kappa * (b["prg"][:2].mean() - b["prg"][2:].mean()).item(), 0.1), 0.9)
        lam = 0.8 * lam + 0.2 * step
        loss, out = module(b["h"], b["w"], b["y"], b["seq_ids"], prg=b["prg"], is_rd=b["is_rd"],
                           rewards=b["rewards"], group_ids=b["group_ids"])
        assert out.lam == pytest.approx(lam) and torch.isfinite(loss)
    rd_only = batch(rng, (True, True))
    _, out = module(rd_only["h"], rd_only["w"], rd_only["y"], rd_only["seq_ids"], prg=rd_only["prg"],
                    is_rd=rd_only["is_rd"])
    assert out.lam == 1.0 and float(module.lam) == pytest.approx(lam)  # one kind: EMA untouched
    module.eval()
    module(b["h"], b["w"], b["y"], b["seq_ids"], prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"],
           group_ids=b["group_ids"])
    assert float(module.lam) == pytest.approx(lam)  # eval: no update
    restored = HyTuningLoss(cfg)
    restored.load_state_dict(module.state_dict())
    assert float(restored.lam) == pytest.approx(lam)


def test_group_advantages():
    u = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 1, 2, 2])
    a = group_advantages(u, g)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)  # singleton, equal: 0
    torch.testing.assert_close(group_advantages(u, g, std_normalize=False), torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="^rewards: contains non-finite"):
        group_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="^group_ids: expected shape"):
        group_advantages(u, g[:3])


def test_rewards_from_stats_means_over_rollout_tokens(rng):
    h, w = torch.randn(9, 6, generator=rng), torch.randn(30, 6, generator=rng)
    st = hk.token_stats(h, w)
    seq = torch.tensor([0, 0, 0, -1, 1, 1, -1, 2, 2])
    for kind, values in (("self_certainty", st.self_certainty), ("neg_entropy", -st.entropy), ("logp", st.logp)):
        u = rewards_from_stats(st, seq, 3, kind=kind)
        want = torch.stack([values[seq == i].mean() for i in range(3)])
        torch.testing.assert_close(u, want)
    with pytest.raises(ValueError, match="^seq_ids: sequence 3 has no tokens"):
        rewards_from_stats(st, seq, 4)


def test_sequences_without_targets_give_finite_loss(rng):
    b = batch(rng)
    b["y"][b["seq_ids"] == 0] = IGN  # an RD trace with no target tokens
    b["y"][b["seq_ids"] >= 2] = IGN  # and no RLIF targets at all
    loss, _ = hk.prg_loss(b["h"], b["w"], b["y"], b["seq_ids"], prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"],
                          group_ids=b["group_ids"])
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(b["h"].grad).all()


@pytest.mark.parametrize("change,message", [
    (dict(prg=torch.rand(5), is_rd=torch.tensor([True, True, False, False, False])),
     "seq_ids: expected ids in \\[-1, 5\\)"),
    (dict(prg=torch.rand(5)), "is_rd: expected a bool tensor of shape \\[5\\]"),
    (dict(is_rd=torch.tensor([1, 1, 0, 0, 0, 0])), "is_rd: expected a bool tensor"),
    (dict(rewards=None), "advantages: RLIF sequences need advantages"),
    (dict(rewards=torch.tensor([1.0, 2, math.nan, 0, 0, 0], dtype=torch.float64)), "rewards: contains non-finite"),
    (dict(prg=torch.tensor([0.5, math.nan, 0.1, 0.2, 0.3, 0.4])), "prg: contains non-finite"),
    (dict(advantages=torch.zeros(6)), "rewards: pass either advantages or rewards"),
    (dict(seq_ids=torch.zeros(3, dtype=torch.long)), "seq_ids: expected shape"),
])
def test_bad_sequence_inputs(rng, change, message):
    b = batch(rng)
    kwargs = dict(prg=b["prg"], is_rd=b["is_rd"], rewards=b["rewards"], group_ids=b["group_ids"])
    seq_ids = change.pop("seq_ids", b["seq_ids"])
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match="^" + message):
        hk.prg_loss(b["h"], b["w"], b["y"], seq_ids, **kwargs)
