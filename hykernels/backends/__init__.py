"""Backend registry and the one dispatch point.

Every backend module offers the same small interface:
    NAME
    DTYPES                                          input dtypes it computes exactly enough
    availability(device) -> None | str            (None: usable; str: why not)
    token_stats(hidden, weight, bias, targets, opts) -> (TokenStats, lse_lo)
    token_partials(hidden, weight, bias, targets, opts) -> _partials.Partials (vocab-parallel use)
    token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, coefs, needs) -> (dH, dW, db)
    fused_loss(hidden, weight, bias, targets, opts, terms, needs) -> (loss, TokenStats, dH, dW, db)
    segment_sum(values [R], segment_ids [R] int64, num_segments) -> [num_segments]
    prg_scores(support [S], probe_offsets [T+1] int64, variant, eps, tau_g) -> (gains [S-T], scores [T])
``needs`` is (hidden, weight, bias) booleans: gradients not needed are not computed (None).
``lse_lo`` is lse's rounding remainder (lse + lse_lo ≈ the exact log-normaliser, see
_dense.row_stats); the backward needs it so large-magnitude logits keep fp32 accuracy.
The segment ops (docs/math.md §3) return fp32 (fp64 for fp64 inputs) and take validated inputs:
segment ids in range, probe offsets starting at 0, strictly increasing, ending at S. prg_scores'
``variant`` is one of _types.PRG_VARIANTS; trace t's probes are support[off[t]:off[t+1]] and its
gains are concatenated trace by trace.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module path; modules are imported on first use so a missing optional
# dependency of one backend never breaks the others.
_MODULES = {
    "reference": "hykernels.backends.reference",
    "torch_chunked": "hykernels.backends.torch_chunked",
    "triton": "hykernels.backends.triton",
    "cuda": "hykernels.backends.cuda",
}
NAMES = tuple(_MODULES)
BACKENDS = tuple(_MODULES) + ("auto",)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def availability(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    try:
        module = _load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"importing the {name} backend failed: {exc}"
    return module.availability(device)


def resolve(name: str, device: torch.device, dtype: torch.dtype, arg: str = "hidden") -> ModuleType:
    """The backend module for ``name`` ("auto" picks the fastest usable one for the inputs).
    ``arg`` names the input whose ``dtype`` a backend may refuse."""
    if name == "auto":
        order = ("cuda", "triton", "torch_chunked") if device.type == "cuda" else ("torch_chunked",)
        for candidate in order:
            if candidate in _MODULES and availability(candidate, device) is None and dtype in _load(candidate).DTYPES:
                return _load(candidate)
        raise BackendUnavailableError(f"no backend can run on device {device}")  # unreachable today
    if name not in _MODULES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    reason = availability(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device}: {reason}")
    module = _load(name)
    if dtype not in module.DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in module.DTYPES)
        raise TypeError(f"{arg}: backend {name!r} takes {names} inputs, got {str(dtype).replace('torch.', '')}")
    return module
