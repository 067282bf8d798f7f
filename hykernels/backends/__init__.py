"""Backend registry, the backend interface (``Backend``) and the one dispatch point (``resolve``).

A backend is a module that satisfies ``Backend`` (tests/test_backend_protocol.py checks every
registered one, parameter names included). ``needs`` is (hidden, weight, bias) booleans:
gradients not needed are not computed (None). ``lse_lo`` is lse's rounding remainder
(lse + lse_lo ≈ the exact log-normaliser, see _dense.row_stats); the backward needs it so
large-magnitude logits keep fp32 accuracy. The segment ops (docs/math.md §3) return fp32 (fp64
for fp64 inputs) and take validated inputs: segment ids in range, probe offsets starting at 0,
strictly increasing, ending at S. prg_scores' ``variant`` is one of _types.PRG_VARIANTS; trace
t's probes are support[off[t]:off[t+1]] and its gains are concatenated trace by trace.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # annotations only: the value types import nothing from here
    from .._partials import Partials
    from .._types import LogitOptions, LossTerms, RowCoefs, TokenStats

Tensor = torch.Tensor
Needs = tuple  # (hidden, weight, bias) booleans


@runtime_checkable
class Backend(Protocol):
    """What every backend module offers. The registry imports modules, so a backend is a module
    with these names, not a class; typing.Protocol describes modules as well as classes."""

    NAME: str
    DTYPES: tuple  # input dtypes it computes exactly enough

    def availability(self, device: torch.device) -> Optional[str]:
        """None when usable on ``device``, else why not."""

    def token_stats(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    opts: LogitOptions) -> tuple[TokenStats, Tensor]:
        """Per-row statistics (docs/math.md §1) and lse_lo."""

    def token_partials(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       opts: LogitOptions) -> Partials:
        """Online-softmax partials of this vocabulary slice (vocab-parallel use)."""

    def token_stats_backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                             opts: LogitOptions, lse: Tensor, lse_lo: Tensor, coefs: RowCoefs,
                             needs: Needs) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(dH, dW, db) of the one backward (§2) from its row coefficients."""

    def fused_loss(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   opts: LogitOptions, terms: LossTerms, needs: Needs
                   ) -> tuple[Tensor, TokenStats, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(loss, TokenStats, dH, dW, db) of §5, gradients formed in the forward pass."""

    def segment_sum(self, values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
        """values [R] summed per segment id [R] (int64) into [num_segments]."""

    def prg_scores(self, support: Tensor, probe_offsets: Tensor, variant: str, eps: float,
                   tau_g: float) -> tuple[Tensor, Tensor]:
        """(gains [S - T], scores [T]) of §3 from probe supports [S] and offsets [T + 1]."""


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


def _load(name: str) -> Backend:
    return importlib.import_module(_MODULES[name])


def availability(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    try:
        module = _load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"importing the {name} backend failed: {exc}"
    return module.availability(device)


def resolve(name: str, device: torch.device, dtype: torch.dtype, arg: str = "hidden") -> Backend:
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
