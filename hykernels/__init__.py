"""hykernels: fused kernels for HyTuning post-training (hytuning.md is the math contract)."""
from ._checks import set_checks
from ._types import TokenStats
from .backends import BackendUnavailableError
from .functional import fused_loss, token_stats

__version__ = "0.1.0"

__all__ = ["token_stats", "fused_loss", "TokenStats", "set_checks", "BackendUnavailableError", "__version__"]
