"""§7 confidence-faithfulness metrics: hand-computed cases, scikit-learn cross-checks, validation,
torch inputs and the reliability diagram."""
import itertools
import math
import sys

import numpy as np
import pytest
import torch

from hykernels import metrics as m


@pytest.fixture
def nrng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_ece_uniform_by_hand():
    # 5 equal-width bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]:
    #   bin 0: {0.1 wrong}                  conf .1,   acc 0   -> (1/6)·0.1
    #   bin 1: {0.3 right, 0.35 wrong}      conf .325, acc 1/2 -> (2/6)·0.175
    #   bin 4: {0.9 r, 0.95 r, 1.0 w}       conf .95,  acc 2/3 -> (3/6)·(.95 − 2/3)
    # ECE = (0.1 + 0.35 + 0.85) / 6 = 1.3 / 6
    c = [0.1, 0.3, 0.35, 0.9, 0.95, 1.0]
    o = [0, 1, 0, 1, 1, 0]
    assert m.ece(c, o, n_bins=5) == pytest.approx(1.3 / 6, abs=1e-12)
    bins = m.reliability_bins(c, o, n_bins=5)
    assert [b.count for b in bins] == [1, 2, 0, 0, 3]
    assert [(b.lower, b.upper) for b in bins] == [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]
    assert bins[1].confidence == pytest.approx(0.325) and bins[1].accuracy == 0.5
    assert math.isnan(bins[2].confidence) and math.isnan(bins[2].accuracy)  # empty bin


def test_uniform_bin_edges():
    # [lower, upper) bins, the last closed: 0.0 -> first, 0.2 -> second, 0.3 -> [0.3, 0.4), 1.0 -> last.
    counts = [b.count for b in m.reliability_bins([0.0, 0.2, 0.3, 1.0], [1, 1, 1, 1], n_bins=10)]
    assert counts == [1, 0, 1, 1, 0, 0, 0, 0, 0, 1]
    assert len(m.reliability_bins([0.5], [1])) == 15  # the default: 15 bins, all reported


def test_ece_quantile_differs_from_uniform():
    # c = .1 .2 .3 .4 .45 .9, o = 0 0 0 1 1 1, 2 bins.
    # Equal width: [0,.5): five answers, conf 1.45/5 = .29, acc 2/5 -> (5/6)·.11 = .55/6
    #              [.5,1]: {.9 right}                         -> (1/6)·.1  = .1/6     ECE = .65/6
    # Equal mass:  {.1 .2 .3}: conf .2, acc 0                 -> (3/6)·.2  = .6/6
    #              {.4 .45 .9}: conf 1.75/3, acc 1            -> (3/6)·(1.25/3) = 1.25/6   ECE = 1.85/6
    c = [0.1, 0.2, 0.3, 0.4, 0.45, 0.9]
    o = [0, 0, 0, 1, 1, 1]
    assert m.ece(c, o, n_bins=2) == pytest.approx(0.65 / 6, abs=1e-12)
    assert m.ece(c, o, n_bins=2, strategy="quantile") == pytest.approx(1.85 / 6, abs=1e-12)
    bins = m.reliability_bins(c, o, n_bins=2, strategy="quantile")
    assert [(b.lower, b.upper, b.count) for b in bins] == [(0.1, 0.4, 3), (0.4, 0.9, 3)]


def test_quantile_bins_keep_ties_together_and_ignore_order(nrng):
    # Sorted .5 .5 .5 .5 .9 .9 into 3 groups of 2: the cut after the 2nd answer falls inside the
    # run of .5s and moves to its end (after the 4th), where the next cut already is -> 2 bins.
    c = np.array([0.5, 0.5, 0.5, 0.5, 0.9, 0.9])
    o = np.array([1, 0, 0, 1, 1, 1])
    bins = m.reliability_bins(c, o, n_bins=3, strategy="quantile")
    assert [b.count for b in bins] == [4, 2]
    # ECE = (4/6)·|.5 − .5| + (2/6)·|1 − .9| = .2/6
    assert m.ece(c, o, n_bins=3, strategy="quantile") == pytest.approx(0.2 / 6, abs=1e-12)
    # Many ties at random: bins and ECE do not depend on the order of the answers.
    c = nrng.integers(0, 6, 200) / 5
    o = nrng.random(200) < c
    ref = m.ece(c, o, n_bins=7, strategy="quantile")
    for _ in range(5):
        p = nrng.permutation(200)
        assert m.ece(c[p], o[p], n_bins=7, strategy="quantile") == pytest.approx(ref, abs=1e-12)
    # Fewer answers than bins: one bin per distinct confidence.
    assert [b.count for b in m.reliability_bins([0.2, 0.7, 0.4], [1, 0, 1], strategy="quantile")] == [1, 1, 1]


def test_quantile_bins_are_equal_mass(nrng):
    c = nrng.random(1003)  # no ties: groups of 67 or 66 as np.array_split makes them
    bins = m.reliability_bins(c, c > 0.5, n_bins=15, strategy="quantile")
    assert [b.count for b in bins] == [len(g) for g in np.array_split(np.sort(c), 15)]
    assert bins[0].lower == c.min() and bins[-1].upper == c.max()


def test_perfect_calibration_gives_zero_ece():
    # conf .25 with 1 of 4 right, .75 with 3 of 4 right, 1.0 always right, 0.0 always wrong.
    c = [0.25] * 4 + [0.75] * 4 + [1.0] * 2 + [0.0] * 2
    o = [1, 0, 0, 0] + [1, 1, 1, 0] + [1, 1] + [0, 0]
    for strategy in ("uniform", "quantile"):
        for n_bins in (1, 4, 15):
            assert m.ece(c, o, n_bins=n_bins, strategy=strategy) == 0.0
    assert m.ece([0.3, 0.8], [0, 1], n_bins=1) == pytest.approx(0.05)  # one bin: |mean c − mean o|


def test_brier_by_hand():
    # (0.9 − 1)² + (0.2 − 0)² + (0.6 − 0)² = .01 + .04 + .36 = .41, mean .41/3
    assert m.brier([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx(0.41 / 3, abs=1e-12)
    assert m.brier([1.0, 0.0], [True, False]) == 0.0


def test_auroc_by_hand():
    # Right: .9, .8; wrong: .8, .3. Pairs (right, wrong): (.9,.8)=1 (.9,.3)=1 (.8,.8)=½ (.8,.3)=1 -> 3.5/4
    assert m.auroc([0.9, 0.8, 0.8, 0.3], [1, 1, 0, 0]) == pytest.approx(0.875, abs=1e-12)
    assert m.auroc([0.1, 0.9], [0, 1]) == 1.0
    assert m.auroc([0.1, 0.9], [1, 0]) == 0.0
    assert m.auroc([0.5] * 4, [1, 0, 1, 0]) == 0.5  # all tied


def test_auroc_matches_pairwise_count(nrng):
    c = nrng.integers(0, 20, 300) / 19  # plenty of ties
    o = nrng.random(300) < c
    pos, neg = c[o], c[~o]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0) + 0.5 * (diff == 0)).mean()
    assert m.auroc(c, o) == pytest.approx(expected, abs=1e-12)


def test_aurc_by_hand():
    # Most confident first: o = 1, 0, 1, 0 -> errors among top k: 0, 1, 1, 2
    # risk = 0, 1/2, 1/3, 2/4 -> AURC = (0 + .5 + 1/3 + .5) / 4 = 1/3
    assert m.aurc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(1 / 3, abs=1e-12)
    # Ties: c = .9 (right), .5 (right), .5 (wrong). The tied pair has ½ expected error at k = 2:
    # risk = 0, .5/2, 1/3 -> AURC = (0 + .25 + 1/3) / 3 = 7/36,
    # = the mean of the two tie orders: right first (0, 0, 1/3) -> 1/9; wrong first (0, 1/2, 1/3) -> 5/18.
    assert m.aurc([0.9, 0.5, 0.5], [1, 1, 0]) == pytest.approx(7 / 36, abs=1e-12)
    assert m.aurc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(7 / 36, abs=1e-12)  # order-free
    # All tied: every coverage has the overall error rate.
    assert m.aurc([0.7] * 5, [1, 1, 0, 1, 0]) == pytest.approx(0.4, abs=1e-12)
    assert m.aurc([0.9, 0.1], [1, 1]) == 0.0


def test_aurc_ties_are_the_mean_over_tie_orders(nrng):
    c = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2])
    o = nrng.random(6) < 0.5

    def stable_aurc(cc, oo):  # one fixed order: stable sort, most confident first
        order = np.argsort(-cc, kind="stable")
        errors = np.cumsum(1 - oo[order])
        return np.mean(errors / np.arange(1, len(cc) + 1))

    perms = [np.array(p) for p in itertools.permutations(range(6))]
    expected = np.mean([stable_aurc(c[p], o[p].astype(float)) for p in perms])
    assert m.aurc(c, o) == pytest.approx(expected, abs=1e-12)


def test_overconfidence_rate_by_hand():
    # Wrong answers: .95, .9, .5 -> two of three have c ≥ .9 (the threshold is inclusive).
    c, o = [0.95, 0.9, 0.5, 0.99], [0, 0, 0, 1]
    assert m.overconfidence_rate(c, o) == pytest.approx(2 / 3)
    assert m.overconfidence_rate(c, o, threshold=0.92) == pytest.approx(1 / 3)
    assert m.overconfidence_rate([0.99, 0.95], [1, 1]) == 0.0  # no wrong answers


def test_summary(nrng):
    c = nrng.random(100)
    o = nrng.random(100) < c
    s = m.summary(c, o)
    assert s == {
        "n": 100, "accuracy": pytest.approx(o.mean()), "mean_confidence": pytest.approx(c.mean()),
        "ece": m.ece(c, o), "ece_quantile": m.ece(c, o, strategy="quantile"), "brier": m.brier(c, o),
        "auroc": m.auroc(c, o), "aurc": m.aurc(c, o), "overconfidence_rate": m.overconfidence_rate(c, o),
    }
    one_class = m.summary([0.9, 0.6], [1, 1])  # must not raise
    assert one_class["auroc"] is None and one_class["accuracy"] == 1.0 and one_class["aurc"] == 0.0


def test_loop_reference_ece(nrng):
    # A per-sample loop over the textbook definition, on random data.
    c = nrng.random(500)
    o = nrng.random(500) < c ** 2
    n_bins = 15
    idx = [min(int(x * n_bins), n_bins - 1) for x in c]
    total = 0.0
    for b in range(n_bins):
        members = [i for i in range(len(c)) if idx[i] == b]
        if members:
            total += len(members) / len(c) * abs(np.mean(o[members]) - np.mean(c[members]))
    assert m.ece(c, o) == pytest.approx(total, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# scikit-learn cross-checks


@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn(nrng, ties):
    sk = pytest.importorskip("sklearn.metrics")
    for n in (2, 17, 1000):
        c = nrng.random(n)
        if ties:
            c = np.round(c, 1)
        o = nrng.random(n) < c
        o[:2] = [True, False]  # both classes present
        assert m.auroc(c, o) == pytest.approx(sk.roc_auc_score(o, c), abs=1e-12)
        assert m.brier(c, o) == pytest.approx(sk.brier_score_loss(o, c), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Torch inputs


def test_torch_inputs(nrng):
    c = nrng.random(64)
    o = nrng.random(64) < c
    expected = m.summary(c, o)
    ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    for conf in (ct, ct.float()):
        for corr in (torch.tensor(o), torch.tensor(o, dtype=torch.int64), torch.tensor(o, dtype=torch.float32)):
            got = m.summary(conf, corr)
            assert got == pytest.approx(expected, abs=1e-6)
            assert all(v is None or type(v) in (int, float) for v in got.values())
    c16 = ct.bfloat16()  # bf16 reads as its exact float64 value (rounding can move answers across bins)
    assert m.ece(c16, torch.tensor(o)) == m.ece(c16.double().tolist(), o.tolist())
    bins = m.reliability_bins(ct, torch.tensor(o))
    assert type(bins[0].count) is int and type(bins[0].lower) is float


# ---------------------------------------------------------------------------------------------
# Bad inputs: each message starts with the argument's name


@pytest.mark.parametrize("call, exc, start", [
    (lambda: m.ece([0.5, 0.2], [1]), ValueError, "correct: expected the same length"),
    (lambda: m.brier([], []), ValueError, "confidence: is empty"),
    (lambda: m.brier([0.5], []), ValueError, "correct: is empty"),
    (lambda: m.brier([[0.5]], [1]), ValueError, "confidence: expected a 1-D"),
    (lambda: m.brier(0.5, 1), ValueError, "confidence: expected a 1-D"),
    (lambda: m.brier([0.5], [[1]]), ValueError, "correct: expected a 1-D"),
    (lambda: m.brier([1.2, 0.5], [1, 0]), ValueError, "confidence: values must lie in [0, 1]"),
    (lambda: m.brier([-0.1], [1]), ValueError, "confidence: values must lie in [0, 1]"),
    (lambda: m.brier([float("nan")], [1]), ValueError, "confidence: contains non-finite"),
    (lambda: m.brier([float("inf")], [1]), ValueError, "confidence: contains non-finite"),
    (lambda: m.brier(torch.tensor([0.5, float("nan")]), [1, 0]), ValueError, "confidence: contains non-finite"),
    (lambda: m.brier([0.5, 0.5], [1, 2]), ValueError, "correct: values must be 0/1"),
    (lambda: m.brier([0.5], [0.5]), ValueError, "correct: values must be 0/1"),
    (lambda: m.brier([0.5], [float("nan")]), ValueError, "correct: values must be 0/1"),
    (lambda: m.brier(["a"], [1]), TypeError, "confidence: expected real numbers"),
    (lambda: m.brier([0.5], ["yes"]), TypeError, "correct: expected real numbers"),
    (lambda: m.brier([True], [0.5]), TypeError, "confidence: expected numbers in [0, 1], got bools"),
    (lambda: m.brier([0.5, [0.1, 0.2]], [1, 0]), TypeError, "confidence: expected a 1-D array of numbers"),
    (lambda: m.ece([0.5], [1], n_bins=0), ValueError, "n_bins: expected a positive int"),
    (lambda: m.ece([0.5], [1], n_bins=2.0), TypeError, "n_bins: expected a positive int"),
    (lambda: m.ece([0.5], [1], n_bins=True), TypeError, "n_bins: expected a positive int"),
    (lambda: m.reliability_bins([0.5], [1], n_bins=-3), ValueError, "n_bins: expected a positive int"),
    (lambda: m.ece([0.5], [1], strategy="equal"), ValueError, "strategy: expected 'uniform' or 'quantile'"),
    (lambda: m.auroc([0.5, 0.7], [1, 1]), ValueError, "correct: AUROC needs both correct and wrong"),
    (lambda: m.auroc([0.5, 0.7], [0, 0]), ValueError, "correct: AUROC needs both correct and wrong"),
    (lambda: m.overconfidence_rate([0.5], [0], threshold=1.5), ValueError, "threshold: expected a number in [0, 1]"),
    (lambda: m.overconfidence_rate([0.5], [0], threshold="0.9"), ValueError, "threshold: expected a number in [0, 1]"),
    (lambda: m.reliability_diagram([0.5], [1], 42), TypeError, "path: expected a str or os.PathLike"),
    (lambda: m.reliability_diagram([0.5], [1], "x.png", title=3), TypeError, "title: expected a str or None"),
])
def test_bad_inputs(call, exc, start):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(start), str(info.value)


def test_auroc_single_class_message():
    with pytest.raises(ValueError, match=r"got only correct ones \(n=2\)"):
        m.auroc([0.5, 0.7], [True, True])
    with pytest.raises(ValueError, match=r"got only wrong ones \(n=3\)"):
        m.auroc([0.5, 0.7, 0.1], torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Reliability diagram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_diagram_writes_png(tmp_path, nrng, strategy):
    pytest.importorskip("matplotlib")
    c = nrng.beta(5, 2, 500)
    o = nrng.random(500) < c ** 1.5
    path = tmp_path / f"reliability-{strategy}.png"
    got = m.reliability_diagram(c, o, path, strategy=strategy, title="test")
    assert got == path
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    # str paths, torch inputs, a single class and all-tied confidences work as well
    out = m.reliability_diagram(torch.full((4,), 1.0), torch.ones(4, dtype=torch.bool), str(tmp_path / "tied.png"),
                                n_bins=3, strategy=strategy)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_reliability_diagram_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        m.reliability_diagram([0.5], [1], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
