"""GRPO loss normalisations by name, as per-token weights for `fused_loss`.

TRL's GRPOTrainer (and Liger's chunked GRPO loss) reduce per-token losses ℓ_t with one of a few
normalisations selected by ``loss_type``. Each is a per-token weight w_t fixed before the kernels
(it needs token counts only, not log-probs), so Σ_t w_t·ℓ_t is that reduction: pass w as
rlif_weight (and beta·w as kl_weight) to fused_loss.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from .._checks import check_seq_ids

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""TRL's GRPOTrainer loss_type values that grpo_token_weights reproduces."""


def grpo_token_weights(mask: torch.Tensor, loss_type: str = "dapo", *, seq_ids: Optional[torch.Tensor] = None,
                       num_seqs: Optional[int] = None, max_completion_length: Optional[int] = None,
                       num_items_in_batch=None) -> torch.Tensor:
    """Per-token weights w (shaped like ``mask``, fp32; fp64 for an fp64 mask) with Σ_t w_t·ℓ_t
    equal to TRL's GRPOTrainer._compute_loss reduction of per-token losses ℓ (before TRL divides
    by the gradient-accumulation steps, which the caller applies the same way).

    ``mask``: 1 where a token is in the loss (TRL's completion_mask·tool_mask), [B, T] with one
    sequence per row, or any shape with ``seq_ids`` (like mask, −1 = no sequence) and
    ``num_seqs`` = B (default 1 + the largest id). With |o_i| = tokens of sequence i in the mask:

    - ``grpo``: (1/B) Σ_i (1/max(|o_i|, 1)) Σ_{t∈o_i} ℓ_t  (sequence mean, then batch mean)
    - ``bnpo``: Σ_t ℓ_t / max(Σ_i |o_i|, 1)  (token mean over the micro-batch)
    - ``dr_grpo``: Σ_t ℓ_t / (B · max_completion_length)
    - ``dapo``: Σ_t ℓ_t / num_items_in_batch, the token count of the whole (global, generation)
      batch; TRL divides its num_items_in_batch by the number of processes and, in training,
      multiplies by accumulation steps / steps_per_generation (examples/trl_grpo.py shows how).
      Default: the mask's own count, i.e. bnpo.
    - ``luspo``: (1/B) Σ_i Σ_{t∈o_i} ℓ_t

    Args:
        mask: 1 (or True) where a token is in the loss: [B, T], or any shape with seq_ids.
        loss_type: One of LOSS_TYPES: "grpo", "bnpo", "dr_grpo", "dapo" (default), "luspo".
        seq_ids: Integer tensor shaped like mask: each token's sequence, −1 for none.
        num_seqs: B with seq_ids (default: 1 + the largest id).
        max_completion_length: A positive int, needed by "dr_grpo".
        num_items_in_batch: A number > 0 or a tensor: "dapo"'s token count.

    Returns:
        Per-token weights shaped like mask (0 outside it), fp32 (fp64 for an fp64 mask):
        pass them as fused_loss's rlif_weight (and beta times them as kl_weight).

    Raises:
        ValueError: An unknown loss_type, a missing or invalid max_completion_length
            ("dr_grpo") or num_items_in_batch ("dapo"), a 1-D mask without seq_ids, or seq_ids
            of the wrong shape or (value checks on) out of range.
        TypeError: mask is not a tensor of at least one dimension.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
        raise TypeError(f"mask: expected a tensor [B, T] (or any shape with seq_ids), got {mask!r}")
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    m = (mask != 0).to(dtype)
    if loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if isinstance(num_items_in_batch, torch.Tensor):
            return m / num_items_in_batch.to(dtype)
        n = num_items_in_batch
        if isinstance(n, bool) or not isinstance(n, Real) or not n > 0:
            raise ValueError(f"num_items_in_batch: expected a number > 0, got {num_items_in_batch!r}")
        return m / float(num_items_in_batch)
    seq, num = _sequences(m, seq_ids, num_seqs)
    if loss_type == "dr_grpo":
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length < 1:
            raise ValueError(f"max_completion_length: expected a positive int for dr_grpo, "
                             f"got {max_completion_length!r}")
        return m / (num * max_completion_length)
    if loss_type == "luspo":
        return m / num
    # grpo: 1/|o_i| per sequence, then the mean over the B sequences
    flat, ids = m.reshape(-1), seq.reshape(-1)
    in_seq = (ids >= 0) & (ids < num)  # out-of-range ids (value checks off) count in no sequence
    safe = torch.where(in_seq, ids, torch.zeros_like(ids))
    counts = torch.zeros(num, dtype=dtype, device=m.device).index_add_(0, safe, flat * in_seq)
    per_token = torch.where(in_seq, 1.0 / counts.clamp(min=1.0)[safe], torch.zeros_like(flat))
    return (flat * per_token / num).reshape(m.shape)


def _sequences(mask: torch.Tensor, seq_ids, num_seqs) -> tuple[torch.Tensor, int]:
    """(sequence id per token, −1 for none; B)."""
    if seq_ids is None:
        if mask.dim() < 2:
            raise ValueError(f"seq_ids: required when mask is 1-D (shape {list(mask.shape)}, packed); "
                             "or pass mask as [B, T]")
        rows = math.prod(mask.shape[:-1])
        return torch.arange(rows, device=mask.device)[:, None].expand(rows, mask.shape[-1]), rows
    if num_seqs is None:
        num_seqs = int(seq_ids.max()) + 1
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs: expected a positive int, got {num_seqs!r}")
    return check_seq_ids(seq_ids, num_seqs, tuple(mask.shape), mask.device).reshape(mask.shape), num_seqs
