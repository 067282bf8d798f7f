"""Reference backend: the whole [N, V] logits materialised in fp32 (fp64 for fp64 inputs).

Slow and memory-hungry by design; it is the oracle for tests and the baseline for bench/.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import target_mask
from .._grad import loss_coefficients
from .._partials import Partials
from .._types import LogitOptions, LossTerms, RowCoefs, TokenStats
from . import _dense
from ._segments import prg_scores, segment_sum  # noqa: F401  (segment ops: the shared torch implementation)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAME = "reference"


def availability(device: torch.device) -> Optional[str]:
    """None when usable on ``device``, else the reason it is not."""
    return None


def _upcast(hidden, weight, bias):
    dt = _dense.stat_dtype(hidden.dtype)
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt), dt


def token_stats(hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
    h, w, b, dt = _upcast(hidden, weight, bias)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    return _dense.row_stats(_dense.logits(h, w, b, opts, dt), safe, valid)


def token_partials(hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
    h, w, b, dt = _upcast(hidden, weight, bias)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    return _dense.row_partials(_dense.logits(h, w, b, opts, dt), safe, valid)


def _apply_grad(g, hidden, weight, bias, h, w, needs):
    """(dH, dW, db) from the full logits gradient, each in its input's dtype."""
    dh = (g @ w).to(hidden.dtype) if needs[0] else None
    dw = (g.T @ h).to(weight.dtype) if needs[1] else None
    db = g.sum(0).to(bias.dtype) if bias is not None and needs[2] else None
    return dh, dw, db


def token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
    h, w, b, dt = _upcast(hidden, weight, bias)
    _, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    g = _dense.logits_grad(_dense.logits(h, w, b, opts, dt), lse, lse_lo, coefs, safe, opts)
    return _apply_grad(g, hidden, weight, bias, h, w, needs)


def fused_loss(hidden, weight, bias, targets, opts, terms: LossTerms, needs):
    h, w, b, dt = _upcast(hidden, weight, bias)
    valid, safe = target_mask(targets, weight.shape[0], opts.ignore_index)
    z = _dense.logits(h, w, b, opts, dt)
    stats, lse_lo = _dense.row_stats(z, safe, valid)
    loss, coefs = loss_coefficients(stats, valid, terms)
    grads = (None, None, None)
    if any(needs):
        g = _dense.logits_grad(z, stats.lse, lse_lo, coefs, safe, opts)
        grads = _apply_grad(g, hidden, weight, bias, h, w, needs)
    return loss.sum(), stats, *grads
