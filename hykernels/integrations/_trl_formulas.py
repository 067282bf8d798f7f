"""What TRL's GRPOTrainer computes outside its loss, transcribed in plain torch (no TRL import)
for HyTuningTrainer: its group advantages (``trl_advantages``) and the health metrics it logs.

``trl_group_advantages``: TRL 1.16's ``_generate_and_score_completions`` with
multi_objective_aggregation="sum_then_normalize" and scale_rewards "group" or "none".

``trl_health_metrics``: TRL 1.16's ``GRPOTrainer._compute_loss`` (its "Log the metrics" part),
recomputed from hykernels' detached per-token log-probs:
``clip_ratio/low_mean``, ``high_mean``, ``region_mean`` (token means over every process, or
sequence means at importance_sampling_level="sequence"), ``clip_ratio/low_min`` and
``high_max`` (the extreme per-sequence clip ratio over every process), ``kl`` (the k3 KL to the
reference, × the importance ratio with use_bias_correction_kl) and ``policy_loss`` (the rollout
loss as the loss type normalises it, before the division by the gradient-accumulation steps
except for dapo, whose normaliser holds it: TRL's own quirk, kept).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Health(NamedTuple):
    """This process's parts of the metrics; the trainer reduces them over the processes.

    Attributes:
        means: name → (sum, count): the metric is Σ sums / Σ counts over processes.
        extremes: name → (per-sequence values, reduction): the metric is the reduction
            (nanmin or nanmax) of every process's values.
        policy_loss: This process's rollout loss (0-dim); the metric is its nanmean over processes.
    """

    means: dict
    extremes: dict
    policy_loss: torch.Tensor


def nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sample standard deviation ignoring NaNs (Bessel-corrected; NaN for fewer than 2), as TRL's."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    return variance.sqrt().squeeze(dim)


def trl_group_advantages(rewards: torch.Tensor, scorable: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """GRPOTrainer's advantages: (u − the group's nanmean) / (the group's sample std + 1e-4)
    (no division when not ``scale``), over groups of ``group_size`` consecutive rollouts; an
    unscorable rollout (every reward function returned None) is left out of its group's
    statistics and gets advantage 0.

    Args:
        rewards: [N] the (gated) rewards u, N a multiple of group_size.
        scorable: [N] bool.
        group_size: Rollouts per prompt.
        scale: scale_rewards != "none".
    """
    u = torch.where(scorable, rewards, torch.full_like(rewards, float("nan")))
    grouped = u.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    adv = u - mean
    if scale:
        std = nanstd(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(u)
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def nanmin(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(float("nan"), device=x.device)


def nanmax(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.max() if x.numel() else torch.tensor(float("nan"), device=x.device)


def trl_health_metrics(*, logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                       advantages: torch.Tensor, mask: torch.Tensor, level: str, clip: tuple, beta: float,
                       bias_correction_kl: bool, ppo_scale: Optional[torch.Tensor],
                       loss_weights: torch.Tensor) -> Health:
    """TRL's logged metrics of R rollouts of width C.

    Args:
        logp: [R, C] the policy's log-probs (detached).
        old_logp: [R, C] the sampling policy's, or None (on-policy: the ratio is 1).
        ref_logp: [R, C] the reference's, or None (beta = 0).
        advantages: [R] per-rollout advantages.
        mask: [R, C] bool, the rollout tokens trained on.
        level: importance_sampling_level, "token" or "sequence".
        clip: (epsilon_low, epsilon_high).
        beta: The KL coefficient.
        bias_correction_kl: Multiply the k3 KL by the importance ratio, as TRL does.
        ppo_scale: [R, C] the factor on the PPO term (vLLM importance sampling, entropy mask), or None.
        loss_weights: [R, C] each token's weight in policy_loss (the loss type's normalisation).
    """
    m = mask.float()
    log_ratio = logp - (logp if old_logp is None else old_logp)
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    adv = advantages[:, None]

    def mean_parts(x):  # TRL's global_masked_mean, before its reduction over processes
        if x.shape[1] == 1:
            return x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        return (x * m).sum(), m.sum()

    def seq_mean(x):  # TRL's masked_seq_mean (NaN for a rollout without tokens)
        return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

    low, high = (coef_1 < 1 - clip[0]) & (adv < 0), (coef_1 > 1 + clip[1]) & (adv > 0)
    means = {"clip_ratio/low_mean": mean_parts(low.float()), "clip_ratio/high_mean": mean_parts(high.float()),
             "clip_ratio/region_mean": mean_parts((low | high).float())}
    extremes = {"clip_ratio/low_min": (seq_mean(low.float()), nanmin),
                "clip_ratio/high_max": (seq_mean(high.float()), nanmax)}
    coef_2 = coef_1.clamp(1 - clip[0], 1 + clip[1])
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if ppo_scale is not None:
        per_token = per_token * ppo_scale
    if beta:
        d = ref_logp - logp
        kl = d.exp() - d - 1
        if bias_correction_kl:
            kl = kl * coef_1
        kl = torch.where(mask, kl, torch.zeros_like(kl))  # padding may hold inf
        means["kl"] = mean_parts(kl)
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token.expand_as(logp), torch.zeros_like(logp))
    return Health(means, extremes, (per_token * loss_weights).sum())

