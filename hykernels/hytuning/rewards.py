"""RLIF rewards and GRPO advantages (hytuning.md §4), from the fused statistics.

Rollout rewards are means of per-token statistics over each rollout's response tokens, so they
come from `token_stats` (no [N, V] logits) computed with the current policy, without gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import functional as F
from .._checks import check_group_ids, check_rewards, check_seq_ids
from .._types import TokenStats

REWARDS = ("self_certainty", "neg_entropy", "logp")
GATED_VARIANTS = ("progressive", "monotone")  # PRG variants in [0, 1]: usable as a gate


def _segment_mean(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    member = seq_ids >= 0
    ids = seq_ids[member]
    total = torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add_(0, ids, values[member])
    count = torch.bincount(ids, minlength=num_seqs).to(values.dtype)
    return total / count


def rewards_from_stats(stats: TokenStats, seq_ids: torch.Tensor, num_seqs: int, *,
                       kind: str = "self_certainty") -> torch.Tensor:
    """u_i = mean over rollout i's tokens (seq_ids == i; −1 = no rollout) of self-certainty,
    −entropy or logp. Every rollout needs at least one token."""
    if kind not in REWARDS:
        raise ValueError(f"kind: expected one of {REWARDS}, got {kind!r}")
    seq_ids = check_seq_ids(seq_ids, num_seqs, tuple(stats.logp.shape), stats.logp.device, require_tokens=True)
    values = {"self_certainty": stats.self_certainty, "neg_entropy": -stats.entropy, "logp": stats.logp}[kind]
    return _segment_mean(values.detach().reshape(-1), seq_ids, num_seqs)


def rollout_rewards(hidden, weight, targets, seq_ids, num_seqs, *, kind="self_certainty", **logit_kwargs):
    """Rewards of rollouts straight from hidden states and the lm_head (current policy, no grad)."""
    with torch.no_grad():
        stats = F.token_stats(hidden, weight, targets, **logit_kwargs)
    return rewards_from_stats(stats, seq_ids, num_seqs, kind=kind)


def gate_rewards(rewards: torch.Tensor, prg: torch.Tensor) -> torch.Tensor:
    """u′_i = PRG_i · u_i: confidence counts only as far as the reasoning earned it."""
    rewards, prg = check_rewards("rewards", rewards), check_rewards("prg", prg, like=rewards)
    return prg * rewards


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (u_i − mean_g) / (std_g + ε) within each group (population std);
    ``std_normalize=False`` gives Dr. GRPO's A_i = u_i − mean_g. A group of one rollout has
    A = 0: it carries no relative signal (and no NaN)."""
    rewards = check_rewards("rewards", rewards)
    groups, inverse = check_group_ids(group_ids, rewards)
    count = torch.bincount(inverse, minlength=groups).to(rewards.dtype)
    mean = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if not std_normalize:
        return centred
    var = torch.zeros_like(mean).index_add_(0, inverse, centred.square()) / count
    return centred / (var.sqrt()[inverse] + eps)
