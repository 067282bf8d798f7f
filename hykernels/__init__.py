"""hykernels: fused kernels for HyTuning post-training (the math: docs/math.md).

token_stats, fused_loss, answer_span_logprobs and prg_gains compute per-token statistics, the
weighted RD + RLIF loss and PRG straight from hidden states and the lm_head weight, without
holding the [tokens × vocab] logits; prg_loss and HyTuningLoss are the HyTuning recipe on top.
"""
from . import hytuning, metrics
from ._checks import set_checks
from ._types import PRGResult, TokenStats
from .backends import BackendUnavailableError
from .functional import answer_span_logprobs, fused_loss, prg_gains, token_stats
from .hytuning import HyTuningConfig, HyTuningLoss, prg_loss

__version__ = "0.1.0"

__all__ = ["token_stats", "fused_loss", "answer_span_logprobs", "prg_gains", "prg_loss", "HyTuningLoss",
           "HyTuningConfig", "TokenStats", "PRGResult", "set_checks", "BackendUnavailableError", "hytuning", "metrics",
           "__version__"]
