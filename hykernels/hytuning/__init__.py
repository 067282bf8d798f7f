"""The HyTuning method on top of the kernels (docs/math.md §3, §4, §6).

PRG probes (build_probes and the step helpers), RLIF rewards and GRPO advantages, TRL's GRPO
normalisations as per-token weights (grpo_token_weights), and the HyTuning objective (prg_loss,
HyTuningLoss, HyTuningConfig).
"""
from .grpo import LOSS_TYPES, grpo_token_weights
from .objective import HyTuningConfig, HyTuningLoss, HyTuningOutput, prg_loss
from .probes import (ProbeBatch, ProbeTrace, build_probes, encode_answer, find_step_ends, majority_answers, merge_steps,
                     separate_probes, step_delimiters)
from .rewards import gate_rewards, group_advantages, rewards_from_stats, rollout_rewards

__all__ = ["grpo_token_weights", "LOSS_TYPES", "HyTuningConfig", "HyTuningLoss", "HyTuningOutput", "prg_loss", "ProbeBatch", "ProbeTrace",
           "build_probes", "encode_answer", "find_step_ends", "majority_answers", "merge_steps", "separate_probes", "step_delimiters",
           "gate_rewards", "group_advantages", "rewards_from_stats", "rollout_rewards"]
