"""Small value types shared by the public API and every backend."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch


class TokenStats(NamedTuple):
    """Per-row statistics of the logits z_r (hytuning.md §2), each of shape [N].

    Floating fields are fp32 (fp64 when the inputs are fp64). ``logp``, ``entropy``,
    ``self_certainty`` and ``lse`` are differentiable w.r.t. hidden, weight and bias;
    ``confidence`` and ``argmax`` are read-outs without gradient.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    self_certainty: torch.Tensor
    confidence: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor

    def detach(self) -> "TokenStats":
        return TokenStats(*(t.detach() for t in self))

    def reshape(self, shape) -> "TokenStats":
        return TokenStats(*(t.reshape(shape) for t in self))


# PRG variants of hytuning.md §3, in the order the Triton kernel numbers them.
PRG_VARIANTS = ("progressive", "monotone", "net", "mean_gain", "min_gain")


class PRGResult(NamedTuple):
    """Per-trace PRG (hytuning.md §3) of a packed batch of traces, all detached.

    ``gains`` [S − T] are Δ_k = c_k − c_{k−1}, trace by trace; trace t's are
    ``gains[gain_offsets[t]:gain_offsets[t + 1]]`` (gain_offsets [T + 1] int64).
    ``scores`` [T] is the chosen variant's value per trace.
    """

    gains: torch.Tensor
    gain_offsets: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed from hidden states: z = s((H·Wᵀ + b) / temperature)."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    chunk_size: Optional[int] = None  # rows per chunk for chunked backends; None = automatic


class RowCoefs(NamedTuple):
    """The four per-row scalars of the §2 backward, each [N], in lse-relative form:

    dL/dz_v = p_v·(A + B·(z_v − lse)) + C·[v = y] + D   (see _grad.py for why).
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor

    def rows(self, sl: slice) -> "RowCoefs":
        return RowCoefs(*(t[sl] for t in self))


@dataclass(frozen=True)
class LossTerms:
    """Per-token constants of the §5 loss, each an [N] tensor or None (term off).

    Built and validated by the functional layer; backends only slice and read them.
    """

    rd_weight: Optional[torch.Tensor] = None
    rlif_weight: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    kl_weight: Optional[torch.Tensor] = None
    entropy_weight: Optional[torch.Tensor] = None
    clip_low: float = 0.2
    clip_high: float = 0.2

    def rows(self, sl: slice) -> "LossTerms":
        """The same terms restricted to rows ``sl`` (a token chunk)."""
        sliced = {
            f.name: getattr(self, f.name)[sl]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **sliced)
