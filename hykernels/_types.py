"""Small value types shared by the public API and every backend."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch


class TokenStats(NamedTuple):
    """Per-row statistics of the logits z_r (docs/math.md §2), each shaped like the targets.

    Floating fields are fp32 (fp64 when the inputs are fp64). ``logp``, ``entropy``,
    ``self_certainty`` and ``lse`` are differentiable w.r.t. hidden, weight and bias;
    ``confidence`` and ``argmax`` are read-outs without gradient.

    Attributes:
        logp: log p(y) = z_y − lse; 0 (and no gradient) on a row without a target.
        entropy: H = lse − Σ_v p_v·z_v.
        self_certainty: KL(U ‖ p) = lse − mean_v z_v − log V ≥ 0.
        confidence: max_v p_v.
        argmax: argmax_v z_v (int64).
        lse: log Σ_v exp(z_v).
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    self_certainty: torch.Tensor
    confidence: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor

    def detach(self) -> "TokenStats":
        """The same statistics, detached from the autograd graph."""
        return TokenStats(*(t.detach() for t in self))

    def reshape(self, shape) -> "TokenStats":
        """Every field reshaped to ``shape``."""
        return TokenStats(*(t.reshape(shape) for t in self))


class LossStats(NamedTuple):
    """fused_loss's detached per-token read-outs (docs/math.md §5), each shaped like the targets.

    Attributes:
        logp: As TokenStats.logp, detached.
        entropy: As TokenStats.entropy, detached.
        self_certainty: As TokenStats.self_certainty, detached.
        confidence: As TokenStats.confidence.
        argmax: As TokenStats.argmax (int64).
        lse: As TokenStats.lse, detached.
        z_loss: Each token's z-loss term a_t·z_loss·lse_t² as it enters the returned loss
            (after ``reduction``), so ``z_loss.sum()`` is the part of a reduced loss that is
            z-loss (Liger's ``return_z_loss`` value); zeros when z_loss is off.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    self_certainty: torch.Tensor
    confidence: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor
    z_loss: torch.Tensor

    def reshape(self, shape) -> "LossStats":
        """Every field reshaped to ``shape``."""
        return LossStats(*(t.reshape(shape) for t in self))


# PRG variants of docs/math.md §3, in the order the Triton kernel numbers them.
PRG_VARIANTS = ("progressive", "monotone", "net", "mean_gain", "min_gain")


class PRGResult(NamedTuple):
    """Per-trace PRG (docs/math.md §3) of a packed batch of T traces with S probes, all detached.

    Attributes:
        gains: [S − T] Δ_k = c_k − c_{k−1}, trace by trace; trace t's are
            ``gains[gain_offsets[t]:gain_offsets[t + 1]]``.
        gain_offsets: [T + 1] int64 offsets into ``gains`` (probe_offsets[t] − t).
        scores: [T] the chosen variant's value per trace.
    """

    gains: torch.Tensor
    gain_offsets: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed from hidden states: z = s(H·Wᵀ + b) / temperature, s(x) = c·tanh(x/c)
    (softcap first, then temperature: docs/math.md §1)."""

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
    """Per-token constants of the §5 loss, each an [N] tensor or None (term off), and its options.

    Built and validated by the functional layer (_checks.check_loss_terms); backends only slice
    and read them. ``label_smoothing`` and ``z_loss`` modify the cross-entropy term (rd_weight);
    ``kl_ratio`` multiplies the k3 term by the importance ratio (TRL's use_bias_correction_kl).
    With ``seq_ids`` set (importance_sampling_level="sequence") the ratio is one per sequence:
    the coefficients need every row's log-prob first, so these terms are never split into chunks.
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
    vocab_size: int = 0  # V of the whole vocabulary (label smoothing's mean over it)
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    kl_ratio: bool = False
    seq_ids: Optional[torch.Tensor] = None  # [N] int64 in [0, num_seqs): sequence-level ratio
    num_seqs: int = 0

    @property
    def sequence_level(self) -> bool:
        return self.seq_ids is not None

    def rows(self, sl: slice) -> "LossTerms":
        """The same terms restricted to rows ``sl`` (a token chunk)."""
        if self.sequence_level:
            raise ValueError("LossTerms.rows: sequence-level terms need all rows at once (route them through "
                             "_grad.loss_by_recompute)")
        sliced = {
            f.name: getattr(self, f.name)[sl]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **sliced)
