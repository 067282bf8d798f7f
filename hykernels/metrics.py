"""Confidence-faithfulness metrics (docs/math.md §7).

Every function takes, per answered question, a confidence c_i in [0, 1] and a correctness
o_i in {0, 1} (bool or 0/1 numbers) as 1-D array-likes or torch tensors of the same length, and
returns Python floats. Bad input raises ``ValueError``/``TypeError`` whose message starts with the
argument's name.

Binning (``ece``, ``reliability_bins``, ``reliability_diagram``): a bin is the half-open interval
[lower, upper); the last bin is closed, so a confidence of exactly 1.0 falls in the last bin and
0.0 in the first.

- ``strategy="uniform"``: ``n_bins`` equal-width bins with edges k / n_bins. Every bin is
  reported, empty ones included.
- ``strategy="quantile"``: equal-mass bins. Sort the confidences and cut them into ``n_bins``
  nearly equal groups as ``np.array_split`` would (the first ``n % n_bins`` groups one larger).
  **Ties are never split**: a cut that falls inside a run of equal confidences moves to the end of
  that run, so the whole run joins the lower bin; cuts that then coincide merge. So the bins
  depend only on the set of (confidence, correctness) pairs, not on their order, and there may be
  fewer than ``n_bins`` of them (always when n < n_bins). A bin's lower edge is its smallest
  confidence, its upper edge the next bin's lower edge (the last bin's: the largest confidence);
  only non-empty bins are reported.
"""
from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path
from typing import List, NamedTuple, Optional

import numpy as np
import torch

__all__ = ["ece", "brier", "auroc", "aurc", "overconfidence_rate", "reliability_bins", "reliability_diagram",
           "summary", "ReliabilityBin"]

STRATEGIES = ("uniform", "quantile")


class ReliabilityBin(NamedTuple):
    """One bin of a reliability diagram.

    Attributes:
        lower: The bin's lower edge (inclusive).
        upper: The bin's upper edge (exclusive, except for the last bin).
        count: Answers in the bin.
        confidence: Their mean confidence (nan when empty).
        accuracy: Their share correct (nan when empty).
    """

    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence in the bin (nan when empty)
    accuracy: float    # share correct in the bin (nan when empty)


# ---------------------------------------------------------------------------------------------
# Input handling


def _array(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype == torch.bool or not x.is_floating_point() else x.double().numpy()
    else:
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as e:  # ragged nested lists and the like
            raise TypeError(f"{name}: expected a 1-D array of numbers, got {type(x).__name__} ({e})") from None
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers or bools, got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{name}: is empty; need at least one answer")
    return x


def _inputs(confidence, correct):
    """(confidence float64 [n], correct float64 [n] of 0.0/1.0), validated."""
    c = _array("confidence", confidence)
    if c.dtype.kind == "b":
        raise TypeError("confidence: expected numbers in [0, 1], got bools (arguments swapped?)")
    c = c.astype(np.float64)
    if not np.isfinite(c).all():
        raise ValueError("confidence: contains non-finite values (NaN or Inf)")
    if c.min() < 0.0 or c.max() > 1.0:
        raise ValueError(f"confidence: values must lie in [0, 1], got min {c.min():g}, max {c.max():g}")
    o = _array("correct", correct).astype(np.float64)
    if o.size != c.size:
        raise ValueError(f"correct: expected the same length as confidence ({c.size}), got {o.size}")
    if not np.isin(o, (0.0, 1.0)).all():
        bad = o[~np.isin(o, (0.0, 1.0))][0]
        raise ValueError(f"correct: values must be 0/1 or bool, got {bad:g}")
    return c, o


def _check_bins(n_bins, strategy) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral):
        raise TypeError(f"n_bins: expected a positive int, got {n_bins!r}")
    if n_bins < 1:
        raise ValueError(f"n_bins: expected a positive int, got {n_bins}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected 'uniform' or 'quantile', got {strategy!r}")


# ---------------------------------------------------------------------------------------------
# Binning: the one place both ece and the diagram get their bins from


def _edges(c: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.arange(n_bins + 1) / n_bins  # k / n_bins, correctly rounded (0.3 is 0.3)
    s = np.sort(c)
    n = s.size
    k = np.arange(1, n_bins)
    cuts = k * (n // n_bins) + np.minimum(k, n % n_bins)  # np.array_split's group boundaries
    cuts = cuts[(cuts > 0) & (cuts < n)]
    cuts = np.searchsorted(s, s[cuts - 1], side="right")  # a cut inside a tie run -> the run's end
    cuts = np.unique(cuts[cuts < n])
    return np.concatenate((s[:1], s[cuts], s[-1:]))


def _bin_sums(c: np.ndarray, o: np.ndarray, n_bins: int, strategy: str):
    """(edges [B+1], count [B], sum of confidence [B], sum of correct [B])."""
    _check_bins(n_bins, strategy)
    edges = _edges(c, n_bins, strategy)
    nb = edges.size - 1
    idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, nb - 1)  # [lower, upper); 1.0 -> last
    return (edges, np.bincount(idx, minlength=nb), np.bincount(idx, weights=c, minlength=nb),
            np.bincount(idx, weights=o, minlength=nb))


def reliability_bins(confidence, correct, *, n_bins: int = 15, strategy: str = "uniform") -> List[ReliabilityBin]:
    """Per-bin (lower, upper, count, mean confidence, accuracy); see the module doc for binning.
    Uniform bins are all reported (empty ones with nan confidence and accuracy); quantile bins
    are the non-empty ones."""
    c, o = _inputs(confidence, correct)
    edges, count, sum_c, sum_o = _bin_sums(c, o, n_bins, strategy)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, acc = sum_c / count, sum_o / count
    return [ReliabilityBin(float(edges[b]), float(edges[b + 1]), int(count[b]), float(conf[b]), float(acc[b]))
            for b in range(count.size)]


# ---------------------------------------------------------------------------------------------
# Metrics


def ece(confidence, correct, *, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error Σ_b (|B_b|/n)·|acc(B_b) − conf(B_b)|."""
    c, o = _inputs(confidence, correct)
    _, _, sum_c, sum_o = _bin_sums(c, o, n_bins, strategy)
    # (|B|/n)·|acc − conf| = |Σ_B o − Σ_B c| / n; empty bins add 0.
    return float(np.abs(sum_o - sum_c).sum() / c.size)


def brier(confidence, correct) -> float:
    """Brier score: mean (c − o)²."""
    c, o = _inputs(confidence, correct)
    return float(np.mean((c - o) ** 2))


def auroc(confidence, correct) -> float:
    """P(c of a random correct answer > c of a random wrong one), ties counting ½ (Mann–Whitney U
    / (n_correct·n_wrong)). Raises ValueError when only one class is present."""
    c, o = _inputs(confidence, correct)
    n_pos = int(o.sum())
    n_neg = o.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "wrong" if n_pos == 0 else "correct"
        raise ValueError(f"correct: AUROC needs both correct and wrong answers, got only {only} ones (n={o.size})")
    values, group = np.unique(c, return_inverse=True)  # ascending distinct confidences
    pos = np.bincount(group, weights=o, minlength=values.size)
    neg = np.bincount(group, weights=1.0 - o, minlength=values.size)
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def aurc(confidence, correct) -> float:
    """Area under the risk–coverage curve: answers sorted by confidence, most confident first;
    risk(k) = errors among the top k / k; AURC = mean of risk(k) over k = 1..n (lower is better).

    Ties: the expectation over all orders of equal confidences. Within a run of equal
    confidences the expected error count grows linearly, so the cumulative error count is
    interpolated linearly across the run. The result does not depend on input order.
    """
    c, o = _inputs(confidence, correct)
    values, group = np.unique(-c, return_inverse=True)  # distinct confidences, descending
    errors = np.bincount(group, weights=1.0 - o, minlength=values.size)
    sizes = np.bincount(group, minlength=values.size)
    knots = np.concatenate(([0], np.cumsum(sizes)))          # coverage at the end of each run
    cum_errors = np.concatenate(([0.0], np.cumsum(errors)))  # errors among the top `knot` answers
    k = np.arange(1, c.size + 1)
    return float(np.mean(np.interp(k, knots, cum_errors) / k))


def overconfidence_rate(confidence, correct, *, threshold: float = 0.9) -> float:
    """Share of wrong answers with c ≥ threshold; 0.0 when no answer is wrong."""
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    c, o = _inputs(confidence, correct)
    wrong = o == 0.0
    return float(np.mean(c[wrong] >= threshold)) if wrong.any() else 0.0


def summary(confidence, correct) -> dict:
    """All docs/math.md §7 numbers in one dict (defaults: 15 bins, threshold 0.9).

    Keys: n, accuracy, mean_confidence, ece, ece_quantile, brier, auroc, aurc,
    overconfidence_rate. Never raises for a single class: ``auroc`` is None then.
    """
    c, o = _inputs(confidence, correct)
    return {
        "n": int(c.size),
        "accuracy": float(o.mean()),
        "mean_confidence": float(c.mean()),
        "ece": ece(c, o),
        "ece_quantile": ece(c, o, strategy="quantile"),
        "brier": brier(c, o),
        "auroc": auroc(c, o) if 0.0 < o.sum() < o.size else None,
        "aurc": aurc(c, o),
        "overconfidence_rate": overconfidence_rate(c, o),
    }


# ---------------------------------------------------------------------------------------------
# Reliability diagram


def reliability_diagram(confidence, correct, path, *, n_bins: int = 15, strategy: str = "uniform",
                        title: Optional[str] = None) -> Path:
    """Write a reliability diagram PNG to ``path`` and return it as a Path: accuracy per bin
    against the diagonal (with the gap to the bin's mean confidence), a histogram of
    confidences below, ECE in the title. Needs matplotlib (``pip install matplotlib``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title: expected a str or None, got {type(title).__name__}")
    c, o = _inputs(confidence, correct)
    bins = [b for b in reliability_bins(c, o, n_bins=n_bins, strategy=strategy) if b.count > 0]
    score = ece(c, o, n_bins=n_bins, strategy=strategy)
    try:
        import matplotlib  # noqa: F401  (optional extra, imported only here)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib "
                          "(or pip install 'hykernels[plots]')") from e

    width = np.maximum([b.upper - b.lower for b in bins], 0.01)  # a bin of tied confidences stays visible
    lower = np.minimum([b.lower for b in bins], 1.0 - width)
    conf = np.array([b.confidence for b in bins])
    acc = np.array([b.accuracy for b in bins])

    fig = Figure(figsize=(5.5, 6.5), layout="constrained")  # no pyplot: no global state, no GUI backend
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lower, acc, width=width, align="edge", color="#4C72B0", edgecolor="white", label="Accuracy")
    top.bar(lower, conf - acc, bottom=acc, width=width, align="edge", color="#DD8452", alpha=0.45,
            edgecolor="#C44E52", hatch="//", label="Gap to mean confidence")
    top.plot([0, 1], [0, 1], "--", color="0.3", label="Perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy")
    top.legend(loc="upper left", frameon=False)
    kind = f"{n_bins} equal-width" if strategy == "uniform" else f"{len(bins)} equal-mass"
    top.set_title(f"{title or 'Reliability diagram'}\nECE = {score:.4f}  ({kind} bins, n = {c.size})")

    # Histogram of confidences over n_bins equal widths (for "uniform", the diagram's own bins).
    edges, count, _, _ = _bin_sums(c, o, n_bins, "uniform")
    bottom.stairs(count, edges, fill=True, color="0.55")
    bottom.set(xlim=(0, 1), xlabel="Confidence", ylabel="Count")
    fig.savefig(path, format="png", dpi=120)
    return Path(path)
