"""RLIF rewards and GRPO advantages (docs/math.md §4), from the fused statistics.

Rollout rewards are means of per-token statistics over each rollout's response tokens, so they
come from `token_stats` (no [N, V] logits) computed with the current policy, without gradient.
"""
from __future__ import annotations

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
    """Rollout rewards u_i from per-token statistics (docs/math.md §4), without gradient.

    u_i is the mean over rollout i's tokens (the rows with seq_ids == i) of self-certainty,
    −entropy or logp. A row without a target has logp = 0: for kind="logp" give seq_ids only to
    rows with a target.

    Args:
        stats: TokenStats of the rollouts' rows (token_stats' output).
        seq_ids: Integer tensor shaped like stats.logp: each row's rollout in [0, num_seqs),
            −1 for none.
        num_seqs: The number of rollouts.
        kind: "self_certainty" (default), "neg_entropy" or "logp".

    Returns:
        [num_seqs] rewards (the statistics' dtype), detached.

    Raises:
        ValueError: An unknown kind, seq_ids of the wrong shape, or (value checks on) ids out of
            range or a rollout without rows.
        TypeError: seq_ids is not an integer tensor.
    """
    if kind not in REWARDS:
        raise ValueError(f"kind: expected one of {REWARDS}, got {kind!r}")
    seq_ids = check_seq_ids(seq_ids, num_seqs, tuple(stats.logp.shape), stats.logp.device, require_tokens=True)
    values = {"self_certainty": stats.self_certainty, "neg_entropy": -stats.entropy, "logp": stats.logp}[kind]
    return _segment_mean(values.detach().reshape(-1), seq_ids, num_seqs)


def rollout_rewards(hidden, weight, targets, seq_ids, num_seqs, *, kind="self_certainty", **logit_kwargs):
    """Rewards of rollouts straight from hidden states and the lm_head (docs/math.md §4).

    token_stats under torch.no_grad() (the current policy, no gradient), then
    rewards_from_stats.

    Args:
        hidden: [..., D] hidden states of the rollouts' rows.
        weight: [V, D] lm_head weight.
        targets: [...] next-token ids (ignore_index = no target).
        seq_ids: Integer tensor shaped like targets: each row's rollout, −1 for none.
        num_seqs: The number of rollouts.
        kind: "self_certainty" (default), "neg_entropy" or "logp".
        **logit_kwargs: bias, temperature, softcap, ignore_index, backend, chunk_size,
            process_group, as for token_stats.

    Returns:
        [num_seqs] rewards, fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: As token_stats and rewards_from_stats.
        TypeError: As token_stats and rewards_from_stats.
    """
    with torch.no_grad():
        stats = F.token_stats(hidden, weight, targets, **logit_kwargs)
    return rewards_from_stats(stats, seq_ids, num_seqs, kind=kind)


def gate_rewards(rewards: torch.Tensor, prg: torch.Tensor) -> torch.Tensor:
    """PRG gating, u′_i = PRG_i·u_i: confidence counts only as far as the reasoning earned it.

    Args:
        rewards: [S] floating rewards u.
        prg: [S] floating PRG scores, meant to lie in [0, 1] ("progressive", "monotone").

    Returns:
        [S] gated rewards, detached.

    Raises:
        ValueError: Not 1-D, different shapes or devices, or (value checks on) NaN/Inf.
        TypeError: Not floating tensors.
    """
    rewards, prg = check_rewards("rewards", rewards), check_rewards("prg", prg, like=rewards)
    return prg * rewards


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO group advantages, A_i = (u_i − mean_g) / (std_g + ε) within each group (docs/math.md §4).

    std_g is the population standard deviation of the group's rewards (TRL divides by the
    sample one). A group of one rollout has A = 0: it carries no relative signal (and no NaN).

    Args:
        rewards: [S] floating rewards.
        group_ids: [S] integer group labels (any values; rollouts of one query share one).
        std_normalize: Divide by std_g + ε (GRPO); False gives Dr. GRPO's A_i = u_i − mean_g.
        eps: ε added to the standard deviation.

    Returns:
        [S] advantages, the rewards' dtype.

    Raises:
        ValueError: Shapes or devices that do not match, or (value checks on) NaN/Inf rewards.
        TypeError: rewards not floating or group_ids not an integer tensor.
    """
    rewards = check_rewards("rewards", rewards)
    groups, inverse = check_group_ids(group_ids, rewards)
    count = torch.bincount(inverse, minlength=groups).to(rewards.dtype)
    mean = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if not std_normalize:
        return centred
    var = torch.zeros_like(mean).index_add_(0, inverse, centred.square()) / count
    return centred / (var.sqrt()[inverse] + eps)
