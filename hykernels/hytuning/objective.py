"""The HyTuning recipe (docs/math.md §6): PRG-weighted RD + PRG-gated RLIF through one fused_loss.

prg_loss turns per-sequence PRG, kinds, rewards/advantages and a mix λ into the per-token
weights of §5 and calls `fused_loss` once; HyTuningLoss is its stateful form (λ smoothed by an
EMA across steps). Every constant is a HyTuningConfig field; callers wanting other weights pass
them to `fused_loss` directly.

The weights are constants whose validation, λ and token counts read host values, so they are
one custom op (hykernels::prg_token_weights, without gradient): torch.compile(fullgraph=True)
traces prg_loss without graph breaks. HyTuningLoss updates its λ on the host and is not traced
without breaks: pass its λ to prg_loss (``lam=``) in a compiled step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import functional as F
from .._checks import _per_token, check_sequence_inputs
from .._ops import build, distinct, flat, schema_of
from .._types import LossStats
from .rewards import GATED_VARIANTS, gate_rewards, group_advantages


@dataclass
class HyTuningConfig:
    """Every constant of the HyTuning recipe (docs/math.md §6), with its default.

    Attributes:
        lambda0: λ₀, the base RD share of the loss.
        kappa: κ, how strongly the PRG gap between RD and RLIF sequences moves λ.
        lambda_min: Lower clamp of λ.
        lambda_max: Upper clamp of λ.
        ema: λ's smoothing across steps in HyTuningLoss: λ ← ema·λ + (1 − ema)·λ_batch.
        rd_weight_min: Lower clamp of the RD sequence weight (PRG_i + δ) / (mean_RD PRG + δ).
        rd_weight_max: Upper clamp of the RD sequence weight.
        rd_weight_smoothing: δ > 0, the PRG added to every trace and to the mean in the RD
            weight, so that the weight is continuous in PRG (no jump where the mean reaches 0)
            and a batch of equal PRGs gets weight 1 whatever their value (docs/math.md §6).
        eps: ε of the group advantages.
        prg_variant: The PRG variant the ``prg`` tensor holds; rewards are gated only by
            variants in [0, 1] ("progressive", "monotone").
        gate_rewards: Gate rollout rewards by PRG, u′ = PRG·u (docs/math.md §4).
        std_normalize: GRPO advantages (True) or Dr. GRPO's, without the division by the std (False).
        kl_coef: Weight of the k3 KL to the reference on RLIF tokens, relative to their PPO
            weight (needs ref_logp).
        entropy_coef: Weight of the entropy bonus on RLIF tokens, relative to their PPO weight.
        clip_eps: (ε_lo, ε_hi) of the PPO clip.
    """

    lambda0: float = 0.5  # base RD share
    kappa: float = 1.0  # how strongly the PRG gap moves λ
    lambda_min: float = 0.1
    lambda_max: float = 0.9
    ema: float = 0.9  # λ smoothing across steps (HyTuningLoss)
    rd_weight_min: float = 0.2  # clamp of the per-sequence RD weight (PRG_i + δ) / (mean_RD PRG + δ)
    rd_weight_max: float = 5.0
    rd_weight_smoothing: float = 0.1  # δ: a tenth of a gated PRG's range [0, 1]
    eps: float = 1e-6
    prg_variant: str = "progressive"  # which PRG the prg tensor holds: gating needs one in [0, 1]
    gate_rewards: bool = True  # u′ = PRG·u for gated variants (§4)
    std_normalize: bool = True  # GRPO (True) or Dr. GRPO (False) advantages
    kl_coef: float = 0.0  # k3 KL to the reference on RLIF tokens (needs ref_logp)
    entropy_coef: float = 0.0  # entropy bonus on RLIF tokens
    clip_eps: tuple = (0.2, 0.2)

    def __post_init__(self):
        # δ = 0 would divide by |m| = 0 for a batch of traces with PRG 0: a NaN loss, silently
        if not (isinstance(self.rd_weight_smoothing, (int, float)) and self.rd_weight_smoothing > 0):
            raise ValueError(f"rd_weight_smoothing: expected a number > 0, got {self.rd_weight_smoothing!r}")


class HyTuningOutput(NamedTuple):
    """What prg_loss and HyTuningLoss return besides the loss.

    Attributes:
        stats: fused_loss's detached per-token statistics (LossStats).
        lam: The RD/RLIF mix λ used (a 0-dim fp64 CPU tensor when traced by torch.compile).
        rd_weights: [S] w_i of the RD sequences, 0 elsewhere.
        advantages: [S] A_i of the RLIF sequences, 0 elsewhere.
    """

    stats: LossStats  # detached per-token statistics (fused_loss's)
    lam: float  # the RD/RLIF mix used (a 0-dim fp64 CPU tensor when traced by torch.compile)
    rd_weights: torch.Tensor  # [S] w_i for RD sequences, 0 elsewhere
    advantages: torch.Tensor  # [S] A_i for RLIF sequences, 0 elsewhere


def mix_lambda(prg: torch.Tensor, is_rd: torch.Tensor, config: HyTuningConfig) -> Optional[float]:
    """λ = clamp(λ₀ + κ·(mean_RD PRG − mean_RLIF PRG), λ_min, λ_max); None when the batch holds
    only one kind (then only that term is used, see effective_lambda)."""
    if bool(is_rd.all()) or not bool(is_rd.any()):
        return None
    gap = float(prg[is_rd].mean() - prg[~is_rd].mean())
    return min(max(config.lambda0 + config.kappa * gap, config.lambda_min), config.lambda_max)


def effective_lambda(lam: Optional[float], is_rd: torch.Tensor) -> float:
    """The mix applied to a batch: 1 for RD only, 0 for RLIF only, else ``lam``."""
    if bool(is_rd.all()):
        return 1.0
    return 0.0 if not bool(is_rd.any()) else float(lam)


def rd_sequence_weights(prg: torch.Tensor, is_rd: torch.Tensor, config: HyTuningConfig,
                        rd_prg_mean: Optional[float] = None) -> torch.Tensor:
    """w_i = clamp(1 + (PRG_i − m) / (|m| + δ), min, max) for RD sequences, 0 for the others, with m
    the mean PRG of the RD sequences (``rd_prg_mean`` where given: a trainer's whole batch, else
    this batch's) and δ = config.rd_weight_smoothing. For m >= 0 that is (PRG_i + δ) / (m + δ).

    Why δ: the plain ratio PRG_i / (m + ε) jumps where m reaches 0 (a batch of traces that all have
    PRG 0, common for a weak model, got w = rd_weight_min and a fifth of the RD loss, while equal
    tiny positive PRGs got w = 1). With δ > 0, w is continuous in every PRG, a batch of equal PRGs
    gets w = 1 whatever their value, and |m| keeps it defined and increasing in PRG_i for the
    variants that go below 0 (net, mean_gain, min_gain)."""
    if not bool(is_rd.any()):
        return torch.zeros_like(prg)
    mean = prg[is_rd].mean() if rd_prg_mean is None else torch.as_tensor(rd_prg_mean, dtype=prg.dtype)
    w = (1 + (prg - mean) / (mean.abs() + config.rd_weight_smoothing)).clamp(config.rd_weight_min,
                                                                             config.rd_weight_max)
    return torch.where(is_rd, w, torch.zeros_like(w))


def rlif_advantages(prg, is_rd, config, advantages=None, rewards=None, group_ids=None) -> torch.Tensor:
    """A_i of RLIF sequences: given, or GRPO over (PRG-gated) rewards within groups."""
    if advantages is not None:
        return torch.where(is_rd, torch.zeros_like(advantages), advantages)
    rlif = ~is_rd
    out = torch.zeros_like(prg)
    if not bool(rlif.any()):
        return out
    u = rewards[rlif]
    if config.gate_rewards and config.prg_variant in GATED_VARIANTS:
        u = gate_rewards(u, prg[rlif])
    out[rlif] = group_advantages(u, group_ids[rlif], std_normalize=config.std_normalize, eps=config.eps)
    return out


def prg_loss(hidden, weight, targets, seq_ids, *, prg, is_rd, advantages=None, rewards=None, group_ids=None,
             old_logp=None, ref_logp=None, lam: Optional[float] = None, config: Optional[HyTuningConfig] = None,
             token_norm=None, ppo_scale=None, entropy_norm=None, rd_prg_mean: Optional[float] = None,
             **logit_kwargs):
    """HyTuning loss of one packed batch (docs/math.md §6), one `fused_loss` call.

    RD tokens of sequence i get a_t = λ·w_i/T_RD with w_i = clamp((PRG_i + δ) / (mean_RD PRG + δ),
    rd_weight_min, rd_weight_max) (rd_sequence_weights); RLIF tokens get b_t = (1 − λ)/T_RLIF with A_t = A_i (PPO-clip
    when old_logp is given), plus kl_coef·b_t and entropy_coef·b_t terms. T_* count target
    tokens; a kind with none contributes nothing. λ = clamp(λ₀ + κ·(mean_RD PRG − mean_RLIF PRG),
    λ_min, λ_max), or 1 (0) for a batch of RD (RLIF) sequences only.

    A trainer with its own normalisation (TRL's ``loss_type``, gradient accumulation) passes it
    per token: ``token_norm`` replaces 1/T_RD and 1/T_RLIF (a_t = λ·w_i·n_t, b_t = (1 − λ)·n_t),
    ``ppo_scale`` multiplies the PPO term of RLIF tokens only (an importance-sampling correction,
    an entropy mask; not the KL), and ``entropy_norm`` replaces b_t in the entropy bonus
    (e_t = entropy_coef·(1 − λ)·entropy_norm_t). When one batch of traces is spread over several
    calls (micro-batches, processes), ``rd_prg_mean`` gives the mean PRG of all its traces, so
    w_i does not depend on how the batch is split.

    Args:
        hidden: [..., D] hidden states, as for fused_loss.
        weight: [V, D] lm_head weight.
        targets: [...] next-token ids, ignore_index = no target.
        seq_ids: Integer tensor shaped like targets: each token's sequence in [0, S), −1 for none.
        prg: [S] floating PRG score per sequence.
        is_rd: [S] bool: RD trace (True) or RLIF rollout (False).
        advantages: [S] given advantages A_i of the RLIF sequences (entries of RD sequences are
            ignored); or pass rewards and group_ids instead.
        rewards: [S] rollout rewards u_i; the advantages are GRPO's within groups, over rewards
            gated by PRG for gated variants (config.gate_rewards, config.prg_variant).
        group_ids: [S] integer group label per sequence (rollouts of one query share one).
        old_logp: Sampling-policy log-probs shaped like targets (None: on-policy).
        ref_logp: Reference log-probs shaped like targets, for config.kl_coef.
        lam: A mix λ to use instead of the batch's own (HyTuningLoss passes its EMA).
        config: HyTuningConfig (default: HyTuningConfig()).
        token_norm: Per-token normalisation n_t (a number or a tensor shaped like targets)
            replacing 1/T_RD and 1/T_RLIF; None: those token means.
        ppo_scale: Per-token factor (a number or a tensor shaped like targets) on the PPO term
            of RLIF tokens only; None: 1.
        entropy_norm: Per-token normalisation of the entropy bonus replacing b_t:
            e_t = entropy_coef·(1 − λ)·entropy_norm_t; None: e_t = entropy_coef·b_t.
        rd_prg_mean: The mean_RD PRG that w_i divides by; None: over this call's RD sequences.
        **logit_kwargs: bias, temperature, softcap, ignore_index, backend, chunk_size and
            process_group (vocabulary-parallel weight), as for fused_loss; also fused_loss's
            importance_sampling_level and use_bias_correction_kl (sequences are the rows of
            targets there: lay out one sequence per row to use "sequence").

    Returns:
        A tuple (loss, HyTuningOutput(stats, lam, rd_weights, advantages)).

    Raises:
        ValueError: Per-sequence inputs of the wrong shape, is_rd not bool, seq_ids out of
            range, RLIF sequences without advantages or rewards + group_ids, both advantages
            and rewards given, non-finite prg/rewards/advantages; and fused_loss's errors.
        TypeError: As fused_loss.
    """
    config = config or HyTuningConfig()
    token_norm, ppo_scale, entropy_norm = (
        _per_token_factor(name, value, targets, prg) for name, value in
        (("token_norm", token_norm), ("ppo_scale", ppo_scale), ("entropy_norm", entropy_norm)))
    rd_tok, rlif_tok, adv_tok, lam, w_rd, adv = prg_token_weights(
        targets, seq_ids, prg, is_rd, advantages, rewards, group_ids, token_norm, lam,
        None if rd_prg_mean is None else float(rd_prg_mean), logit_kwargs.get("ignore_index", -100), *flat(config))
    terms = dict(rd_weight=rd_tok, rlif_weight=rlif_tok if ppo_scale is None else rlif_tok * ppo_scale,
                 advantages=adv_tok, old_logp=old_logp, clip_eps=config.clip_eps)
    if config.kl_coef:
        terms.update(kl_weight=config.kl_coef * rlif_tok, ref_logp=ref_logp)
    if config.entropy_coef:
        # (1 − λ) as a tensor op: λ is a 0-dim CPU tensor out of the op, and compiled steps must not read it
        per_token = rlif_tok if entropy_norm is None else (1.0 - lam).to(entropy_norm) * entropy_norm
        terms.update(entropy_weight=config.entropy_coef * per_token)
    loss, stats = F.fused_loss(hidden, weight, targets, **terms, **logit_kwargs)
    return loss, HyTuningOutput(stats, lam if torch.compiler.is_compiling() else float(lam), w_rd, adv)


def _per_token_factor(name: str, value, targets, prg) -> Optional[torch.Tensor]:
    """A per-token factor of prg_loss (None, a number or a tensor like targets) as a tensor shaped like targets."""
    if value is None:
        return None
    lead = tuple(targets.shape)
    return _per_token(name, value, math.prod(lead), lead, targets.device, prg.dtype).reshape(lead)


def token_weights(targets, seq_ids, *, prg, is_rd, advantages, rewards, group_ids, lam: Optional[float],
                  config: HyTuningConfig, ignore_index: int, token_norm: Optional[torch.Tensor] = None,
                  rd_prg_mean: Optional[float] = None):
    """prg_loss's constants, validated: (rd_weight, rlif_weight, advantages per token, shaped like
    targets; λ as a 0-dim fp64 CPU tensor; w [S]; A [S]). ``token_norm`` (like targets) replaces
    the token means 1/T_RD and 1/T_RLIF; ``rd_prg_mean`` the mean PRG w_i divides by."""
    seqs = check_sequence_inputs(targets, seq_ids, prg=prg, is_rd=is_rd, advantages=advantages,
                                 rewards=rewards, group_ids=group_ids)
    if lam is None:
        lam = mix_lambda(seqs.prg, seqs.is_rd, config)
    lam = effective_lambda(lam, seqs.is_rd)
    prg, is_rd, seq_ids = seqs.prg, seqs.is_rd, seqs.seq_ids.reshape(targets.shape)  # terms shaped like targets
    if rd_prg_mean is not None and not math.isfinite(rd_prg_mean):
        raise ValueError(f"rd_prg_mean: expected a finite number, got {rd_prg_mean}")
    w_rd = rd_sequence_weights(prg, is_rd, config, rd_prg_mean)
    adv = rlif_advantages(prg, is_rd, config, seqs.advantages, seqs.rewards, seqs.group_ids)
    seq = seq_ids.clamp(min=0)
    has_target = (seq_ids >= 0) & (targets.reshape(seq_ids.shape) != ignore_index)
    tok_rd, tok_rlif = has_target & is_rd[seq], has_target & ~is_rd[seq]
    if token_norm is None:
        norm_rd, norm_rlif = 1.0 / max(int(tok_rd.sum()), 1), 1.0 / max(int(tok_rlif.sum()), 1)
    else:
        norm_rd = norm_rlif = token_norm.reshape(seq_ids.shape).to(prg.dtype)
    zero = torch.zeros(seq_ids.shape, dtype=prg.dtype, device=prg.device)
    return (torch.where(tok_rd, lam * w_rd[seq] * norm_rd, zero), torch.where(tok_rlif, (1.0 - lam) * norm_rlif, zero),
            torch.where(tok_rlif, adv[seq], zero), torch.tensor(lam, dtype=torch.float64), w_rd, adv)


@torch.library.custom_op("hykernels::prg_token_weights", mutates_args=(),
                         schema="(Tensor targets, Tensor seq_ids, Tensor prg, Tensor is_rd, Tensor? advantages, "
                                "Tensor? rewards, Tensor? group_ids, Tensor? token_norm, float? lam, float? rd_prg_mean, "
                                "int ignore_index, "
                                f"{schema_of(HyTuningConfig)}) -> (Tensor rd_weight, Tensor rlif_weight, "
                                "Tensor token_advantages, Tensor lam, Tensor rd_weights, Tensor advantages)")
def prg_token_weights(targets, seq_ids, prg, is_rd, advantages, rewards, group_ids, token_norm, lam, rd_prg_mean,
                      ignore_index, *config):
    """token_weights as a custom op: torch.compile sees only its output shapes."""
    return distinct(token_weights(targets, seq_ids, prg=prg, is_rd=is_rd, advantages=advantages, rewards=rewards,
                                  group_ids=group_ids, lam=lam, config=build(HyTuningConfig, config),
                                  ignore_index=ignore_index, token_norm=token_norm, rd_prg_mean=rd_prg_mean))


@prg_token_weights.register_fake
def _(targets, seq_ids, prg, is_rd, advantages, rewards, group_ids, token_norm, lam, rd_prg_mean, ignore_index,
      *config):
    adv = prg.dtype if advantages is None else advantages.dtype
    tokens = [prg.new_empty(targets.shape, dtype=dtype) for dtype in (prg.dtype, prg.dtype,
                                                                        torch.promote_types(adv, prg.dtype))]
    return (*tokens, torch.empty((), dtype=torch.float64), prg.new_empty(prg.shape), prg.new_empty(prg.shape, dtype=adv))


class HyTuningLoss(torch.nn.Module):
    """Stateful prg_loss (docs/math.md §6): λ is smoothed across training steps.

    λ starts at config.lambda0 and lives in a buffer (saved with state_dict, so it resumes with
    the run). In training mode, each batch that holds both kinds first moves it,
    λ ← ema·λ + (1 − ema)·λ_batch, and the batch is then weighed with the updated λ; in eval mode
    λ stays. A batch of one kind uses λ = 1 (RD) or 0 (RLIF).

    Args:
        config: HyTuningConfig (default: HyTuningConfig()).
        **logit_kwargs: Passed to every prg_loss call: bias, temperature, softcap,
            ignore_index, backend, chunk_size, process_group.
    """

    def __init__(self, config: Optional[HyTuningConfig] = None, **logit_kwargs):
        super().__init__()
        self.config = config or HyTuningConfig()
        self.logit_kwargs = logit_kwargs
        self.register_buffer("lam", torch.tensor(self.config.lambda0, dtype=torch.float64))

    def forward(self, hidden, weight, targets, seq_ids, *, prg, is_rd, advantages=None, rewards=None,
                group_ids=None, old_logp=None, ref_logp=None):
        """The loss of one batch: prg_loss with this module's λ, config and logit options.

        Arguments as for prg_loss. Returns (loss, HyTuningOutput).
        """
        seqs = check_sequence_inputs(targets, seq_ids, prg=prg, is_rd=is_rd, advantages=advantages,
                                     rewards=rewards, group_ids=group_ids)
        self.update_lambda(seqs.prg, seqs.is_rd)
        return prg_loss(hidden, weight, targets, seq_ids, prg=prg, is_rd=is_rd, advantages=advantages,
                        rewards=rewards, group_ids=group_ids, old_logp=old_logp, ref_logp=ref_logp,
                        lam=float(self.lam), config=self.config, **self.logit_kwargs)

    def update_lambda(self, prg: torch.Tensor, is_rd: torch.Tensor) -> float:
        """Move λ by one batch's PRG gap, λ ← ema·λ + (1 − ema)·λ_batch, in training mode and when
        the batch holds both kinds (else λ stays); returns λ. forward calls it; a trainer that
        weighs several micro-batches with one λ calls it once per batch of sequences.

        Args:
            prg: [S] PRG per sequence.
            is_rd: [S] bool, RD trace (True) or RLIF rollout (False).
        """
        step_lam = mix_lambda(prg, is_rd, self.config)
        if self.training and step_lam is not None:
            self.lam.mul_(self.config.ema).add_((1.0 - self.config.ema) * step_lam)
        return float(self.lam)
