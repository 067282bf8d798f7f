"""HyTuning in TRL: ``HyTuningTrainer``, a ``trl.GRPOTrainer`` whose every optimisation step mixes
curated traces (RD) with the policy's own rollouts (RLIF), weighed by PRG (docs/math.md §3–§6).

Written against TRL 1.16's private hooks (``_generate_and_score_completions``, ``_prepare_inputs``,
``_compute_loss``, ``_get_per_token_logps_and_entropies``, ``_calculate_rewards``, ``_generate``,
``_save_checkpoint``, ``_load_optimizer_and_scheduler``): check them when upgrading TRL.
The lm_head never forms logits: log-probs, rewards, PRG and the loss come from hidden states and
the lm_head weight through hykernels. Guide: docs/guides/trl.md.
"""
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Optional

import torch

try:
    from accelerate.utils import gather_object
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # TRL is an optional extra
    raise ImportError('hykernels.integrations.trl needs TRL (trl >= 1.16, Python >= 3.11): '
                      'pip install "hykernels[trl]"') from e
from torch.nn.utils.rnn import pad_sequence

from .. import prg_gains, token_stats
from .._types import PRG_VARIANTS
from ..hytuning import (LOSS_TYPES, HyTuningConfig, HyTuningLoss, ProbeTrace, build_probes, encode_answer,
                        gate_rewards, group_advantages, grpo_token_weights, majority_answers, prg_loss,
                        rollout_rewards, step_delimiters)
from ..hytuning.probes import DEFAULT_MAX_STEPS
from ..hytuning.rewards import GATED_VARIANTS
from ._trl_formulas import trl_group_advantages, trl_health_metrics
from ._trl_rows import TRACE_COLUMNS, TraceSampler, find_answer, merge_rows, trace_row, trace_rows
from .transformers import call_through, hidden_states_and_aux_loss, last_hidden_states, lm_head, probe_support

__all__ = ["HyTuningTrainerConfig", "HyTuningTrainer"]

logger = logging.getLogger(__name__)

STATE_FILE = "hytuning_state.json"  # λ and the trace sampler, in every checkpoint directory
ANSWERED_WINDOW = 10  # generation batches over which a lack of answers is warned about
_DEFAULTS = HyTuningConfig()
PRG_ANSWERS = ("own", "majority")  # whose answer a rollout's PRG measures support for
# HyTuningConfig fields that GRPOConfig already has a knob for (hytuning_config maps them)
_MAPPED = ("kl_coef", "entropy_coef", "clip_eps", "std_normalize")

# GRPOConfig settings the trainer does not reproduce: (refused?, why), checked by name
_REFUSED = {
    "loss_type": (lambda c: c.loss_type not in LOSS_TYPES,
                  f"supported: {', '.join(LOSS_TYPES)}; cispo, sapo and vespo weigh tokens otherwise"),
    "delta": (lambda c: c.delta is not None, "two-sided clipping is not a fused_loss term"),
    "off_policy_mask_threshold": (lambda c: c.off_policy_mask_threshold is not None, "the off-policy sequence mask"),
    "use_adaptive_entropy": (lambda c: c.use_adaptive_entropy, "adaptive entropy control; a fixed entropy_coef works"),
    "scale_rewards": (lambda c: c.scale_rewards == "batch",
                      "advantages are normalised within each prompt's group ('group') or not at all ('none')"),
    "multi_objective_aggregation": (lambda c: c.multi_objective_aggregation != "sum_then_normalize",
                                    "PRG gates the weighted sum of the rewards ('sum_then_normalize')"),
    "cast_lm_head_to_fp32": (lambda c: c.cast_lm_head_to_fp32,
                             "hykernels keeps the lm_head's statistics in fp32 already: leave it False"),
}


def bf16_supported() -> bool:
    """Whether this machine's accelerator runs bf16 (CUDA from Ampere, XPU, NPU, ...); False on a CPU."""
    from transformers.utils import is_torch_bf16_gpu_available

    return bool(is_torch_bf16_gpu_available())


def _help(text: str, default=None) -> dict:
    return dict(default=default, metadata={"help": text})


@dataclass
class HyTuningTrainerConfig(GRPOConfig):
    """GRPOConfig plus the HyTuning fields (docs/math.md §6) and the trace/probe settings.

    HyTuningConfig fields with the same names and defaults: ``lambda0``, ``kappa``,
    ``lambda_min``, ``lambda_max``, ``ema``, ``rd_weight_min``, ``rd_weight_max``, ``rd_weight_smoothing``, ``eps``,
    ``prg_variant``, ``gate_rewards``. The others are GRPOConfig's own knobs, which
    ``hytuning_config()`` maps:

    | HyTuningConfig | GRPOConfig |
    |---|---|
    | `kl_coef` | `beta` (k3 KL to the reference, on rollout tokens) |
    | `clip_eps` | `(epsilon, epsilon_high or epsilon)` |
    | `std_normalize` | `scale_rewards`: "group" → True, "none" → False ("batch" is refused) |
    | `entropy_coef` | `entropy_coef`, with TRL's meaning: the mean entropy of the rollout tokens, times 1 − λ |

    Attributes:
        traces_per_step: Curated traces per optimisation step **on each process**, as
            per_device_train_batch_size counts rollouts (a step of N processes trains on
            N · traces_per_step distinct traces: every process draws from one shared order and
            keeps its own share). Each of the gradient_accumulation_steps micro-batches holds
            traces_per_step / gradient_accumulation_steps of them beside its
            per_device_train_batch_size rollouts, so a generation batch (steps_per_generation
            micro-batches) draws traces_per_step · steps_per_generation /
            gradient_accumulation_steps per process. Must divide by
            gradient_accumulation_steps; 0: RLIF only. Default: as many as rollouts
            (per_device_train_batch_size · gradient_accumulation_steps).
        answer_cue: The text that precedes the final answer. A trace's RD row is the encoding
            of reasoning + cue + answer as one text, then end of sequence (encode_answer: the
            answer's tokens are those the tokenizer gives it after the cue); each probe puts
            the same cue and answer tokens after its steps. A rollout's answer follows its first
            cue, or the cue without its surrounding whitespace, to the end of that line.
        trl_advantages: TRL's GRPO advantages instead of §4's: (u − group mean) / (sample
            std + 1e-4), NaN-aware, as GRPOTrainer computes them (scale_rewards "group"; "none":
            no division). With traces_per_step=0 and gate_rewards=False the advantages and the
            loss are GRPOTrainer's.
        step_delimiter: The text that ends a reasoning step (step_delimiters(tokenizer, text)).
        max_probe_steps: Steps beyond this many are merged evenly in the probes (build_probes).
        max_prompt_length: With max_completion_length, the longest curated trace accepted:
            prompt + reasoning + cue + answer ≤ max_prompt_length + max_completion_length tokens
            (rollout prompts are not truncated).
    """

    lambda0: float = field(**_help("λ₀, the base RD share of the loss.", _DEFAULTS.lambda0))
    kappa: float = field(**_help("κ: how strongly the PRG gap between traces and rollouts moves λ.", _DEFAULTS.kappa))
    lambda_min: float = field(**_help("Lower clamp of λ.", _DEFAULTS.lambda_min))
    lambda_max: float = field(**_help("Upper clamp of λ.", _DEFAULTS.lambda_max))
    ema: float = field(**_help("λ's smoothing across generation batches: λ ← ema·λ + (1 − ema)·λ_batch.",
                               _DEFAULTS.ema))
    rd_weight_min: float = field(**_help("Lower clamp of a trace's weight (PRG_i + δ) / (mean PRG + δ).",
                                         _DEFAULTS.rd_weight_min))
    rd_weight_max: float = field(**_help("Upper clamp of a trace's weight.", _DEFAULTS.rd_weight_max))
    rd_weight_smoothing: float = field(**_help(
        "δ > 0 of a trace's weight: keeps it continuous in PRG, and 1 for equal PRGs whatever their value.",
        _DEFAULTS.rd_weight_smoothing))
    eps: float = field(**_help("ε of the group advantages.", _DEFAULTS.eps))
    prg_variant: str = field(**_help(f"The PRG variant, one of {PRG_VARIANTS}; rewards are gated only by "
                                     f"{GATED_VARIANTS}.", _DEFAULTS.prg_variant))
    gate_rewards: bool = field(**_help("Gate rollout rewards by PRG, u' = PRG·u.", _DEFAULTS.gate_rewards))
    prg_answer: str = field(**_help(
        "Whose answer a rollout's PRG measures support for: 'own', or 'majority', the answer given most often in "
        "its group (over every process; label-free).", "own"))
    traces_per_step: int | None = field(**_help(
        "Curated traces per optimisation step on each process, as per_device_train_batch_size counts rollouts "
        "(divisible by gradient_accumulation_steps); 0: RLIF only; default: per_device_train_batch_size · "
        "gradient_accumulation_steps."))
    answer_cue: str = field(**_help("The text before the final answer, in traces, probes and rollouts.", "\nAnswer: "))
    step_delimiter: str = field(**_help("The text that ends a reasoning step.", "\n\n"))
    max_probe_steps: int = field(**_help("Steps beyond this many are merged in the PRG probes.", DEFAULT_MAX_STEPS))
    max_prompt_length: int = field(**_help(
        "With max_completion_length, the longest curated trace (prompt + reasoning + cue + answer tokens).", 512))
    trl_advantages: bool = field(**_help(
        "TRL's advantages: (u − group mean)/(sample std + 1e-4) as GRPOTrainer computes them, instead of the "
        "population std + eps of docs/math.md §4.", False))

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:  # TRL's default (bf16) stops a CPU run: bf16 only where it runs
            self.bf16 = bf16_supported()
        super().__post_init__()
        if self.traces_per_step is None:
            self.traces_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self._check_values()
        self.check_supported()

    def _check_values(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"{name}: expected {what}, got {getattr(self, name)!r}")

        def number(name: str, lo=-math.inf, hi=math.inf) -> bool:
            x = getattr(self, name)
            return isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi

        def positive_int(name: str) -> bool:
            x = getattr(self, name)
            return isinstance(x, int) and not isinstance(x, bool) and x > 0

        need(number("lambda_min", 0.0, 1.0), "lambda_min", "a number in [0, 1]")
        need(number("lambda_max", self.lambda_min, 1.0), "lambda_max",
             f"a number in [lambda_min, 1] = [{self.lambda_min}, 1]")
        need(number("lambda0", self.lambda_min, self.lambda_max), "lambda0",
             f"a number in [lambda_min, lambda_max] = [{self.lambda_min}, {self.lambda_max}]")
        need(number("kappa"), "kappa", "a finite number")
        need(number("ema", 0.0, 1.0), "ema", "a number in [0, 1]")
        need(number("rd_weight_min", 0.0), "rd_weight_min", "a number >= 0")
        need(number("rd_weight_max", self.rd_weight_min), "rd_weight_max",
             f"a number >= rd_weight_min = {self.rd_weight_min}")
        need(number("rd_weight_smoothing") and self.rd_weight_smoothing > 0, "rd_weight_smoothing", "a number > 0")
        need(number("eps") and self.eps > 0, "eps", "a number > 0")
        need(self.prg_variant in PRG_VARIANTS, "prg_variant", f"one of {PRG_VARIANTS}")
        need(isinstance(self.gate_rewards, bool), "gate_rewards", "a bool")
        need(self.prg_answer in PRG_ANSWERS, "prg_answer", f"one of {PRG_ANSWERS}")
        need(isinstance(self.trl_advantages, bool), "trl_advantages", "a bool")
        ga = self.gradient_accumulation_steps
        need(isinstance(self.traces_per_step, int) and not isinstance(self.traces_per_step, bool)
             and self.traces_per_step >= 0 and self.traces_per_step % ga == 0, "traces_per_step",
             f"an int >= 0 divisible by gradient_accumulation_steps = {ga} (each micro-batch holds the same share)")
        for name in ("answer_cue", "step_delimiter"):
            need(isinstance(getattr(self, name), str) and getattr(self, name) != "", name, "a non-empty string")
        for name in ("max_probe_steps", "max_prompt_length"):
            need(positive_int(name), name, "a positive int")

    def check_supported(self):
        """Raise NotImplementedError naming every GRPOConfig setting HyTuningTrainer does not
        reproduce (HyTuningTrainer checks again at construction)."""
        refused = [f"{name}={getattr(self, name)!r} ({why})" for name, (bad, why) in _REFUSED.items() if bad(self)]
        if refused:
            raise NotImplementedError("HyTuningTrainer does not support " + "; ".join(refused))

    @property
    def traces_per_micro_batch(self) -> int:
        """Curated traces in each micro-batch: traces_per_step / gradient_accumulation_steps."""
        return self.traces_per_step // self.gradient_accumulation_steps

    def hytuning_config(self) -> HyTuningConfig:
        """The HyTuningConfig of this configuration: its own HyTuning fields, and beta, epsilon /
        epsilon_high, scale_rewards and entropy_coef mapped as the class docstring says."""
        own = {f.name: getattr(self, f.name) for f in fields(HyTuningConfig) if f.name not in _MAPPED}
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return HyTuningConfig(**own, kl_coef=self.beta, entropy_coef=self.entropy_coef, clip_eps=(self.epsilon, high),
                              std_normalize=self.scale_rewards != "none")


def _trace_dataset(traces, traces_per_step: int, name: str = "trace_dataset"):
    """The curated traces, checked: a datasets.Dataset (or a list of dicts) with prompt, reasoning, answer."""
    if traces is None or (isinstance(traces, list) and not traces):
        if traces_per_step:
            raise ValueError(f"{name}: required, and not empty, when traces_per_step > 0 "
                             "(traces_per_step=0 trains on rollouts only)")
        return []
    if isinstance(traces, list):
        from datasets import Dataset

        traces = Dataset.from_list(traces)
    columns = getattr(traces, "column_names", None)
    if columns is None:
        raise TypeError(f"{name}: expected a datasets.Dataset, got {type(traces).__name__}")
    missing = [c for c in TRACE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{name}: missing column {', '.join(missing)} (it needs {', '.join(TRACE_COLUMNS)})")
    if traces_per_step and len(traces) == 0:
        raise ValueError(f"{name}: required, and not empty, when traces_per_step > 0")
    return traces


def refuse_zero3(accelerator) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter outside its own module's forward, and hykernels
    reads the lm_head weight directly (it never calls the lm_head): refuse it by name."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise NotImplementedError("deepspeed: ZeRO-3 partitions the lm_head weight, which hykernels reads outside "
                                  "the lm_head's forward; use FSDP2 (fsdp_config version 2), which HyTuningTrainer "
                                  "runs, or ZeRO stage 1 or 2")


class RDBatch(NamedTuple):
    """The traces of one generation batch on every process: their target tokens, and their mean
    PRG (None: no traces), which normalise every micro-batch's RD term and trace weights."""

    tokens: float = 0.0
    prg_mean: Optional[float] = None


class HyTuningTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, each step HyTuning's mix of curated traces and rollouts (docs/math.md §3–§6).

    Per generation batch (TRL generates once per steps_per_generation × num_iterations
    micro-batches; with TRL's defaults that is once per optimisation step):

    1. TRL samples the rollouts of ``train_dataset``'s prompts (transformers or vLLM), computes
       old/reference log-probs (hykernels ``token_stats``) and the rewards: ``reward_funcs``,
       default the policy's self-certainty (§4).
    2. Each rollout's answer follows its first ``answer_cue`` (or the cue without its
       surrounding whitespace) up to the end of that line, or is ``answer_fn``'s. Curated
       traces come from ``trace_dataset`` in one seeded order shared by every process (without
       replacement, reshuffled each pass); each process takes its own share, so no trace is
       used twice in a step while others are unused. PRG of traces and answered rollouts comes
       from packed probes (§3: build_probes, one forward of the policy per
       per_device_train_batch_size probed sequences, in eval mode, without gradient; every
       process runs as many forwards as the busiest, as FSDP's gathers need). A rollout's
       probes end with its own answer, or with prg_answer="majority" the answer its group gave
       most often (label-free); cue and answer are encoded together (encode_answer). A rollout
       without an answer has PRG 0, so its gated reward is 0; when most rollouts of the recent
       generation batches have none, a warning names the cue.
    3. Rewards u = TRL's weighted sum of the reward functions; u′ = PRG·u when gate_rewards and
       prg_variant is in [0, 1]; the advantages are §4's group advantages of u′ (population
       std + eps, or none for scale_rewards="none"), or TRL's (trl_advantages); a rollout every
       reward function scored None has advantage 0, as in TRL.
    4. In training, λ ← ema·λ + (1 − ema)·clamp(λ₀ + κ·(mean PRG of traces − mean PRG of
       rollouts), λ_min, λ_max) over the whole (all-process) generation batch.

    Per micro-batch, the traces (teacher-forced prompt + reasoning + cue + answer + EOS) join
    the rollouts as extra rows, and ONE forward of the Trainer's model (through its DDP / FSDP
    wrapper, which then all-reduces or reduce-scatters the gradients) feeds ONE ``prg_loss``
    call: RD tokens of trace i weigh λ·w_i/T_RD (w_i = clamp((PRG_i + δ) / (mean PRG of the
    generation batch's traces on every process + δ)), docs/math.md §6); T_RD: the trace tokens of one optimisation
    step on every process, so the RD term is the cross-entropy over all of them, as a single
    process computes it); rollout tokens weigh (1 − λ) times TRL's ``loss_type``
    normalisation (÷ G as TRL divides, G the gradient accumulation steps), times the vLLM
    importance-sampling ratio and the top-entropy mask on the PPO term only, with beta·that
    weight on the k3 KL and, for entropy_coef, (1 − λ)·entropy_coef on the mean entropy of the
    rollout tokens; for a MoE model, router_aux_loss_coef times the model's router auxiliary
    loss ÷ G, as TRL adds it. With no traces, gate_rewards=False and trl_advantages=True, the
    advantages and the loss are TRL's own GRPO's.

    Logged (averaged per logging step): ``lambda``, ``prg_traces``, ``prg_rollouts``,
    ``answered`` (share of rollouts with an answer), ``reward`` (TRL's, ungated),
    ``reward_gated``, ``rd_nll`` (mean −log p of trace tokens), ``entropy`` (of rollout tokens),
    ``rd_tokens``, ``rlif_tokens``, and as GRPOTrainer logs them ``policy_loss`` (the rollout
    term before λ), ``clip_ratio/low_mean``, ``low_min``, ``high_mean``, ``high_max``,
    ``region_mean``, ``kl`` when beta > 0 and ``aux_loss`` for a MoE model. λ and the trace
    sampler's position are saved in each checkpoint (hytuning_state.json) and restored by
    resume_from_checkpoint.

    Evaluation (``evaluate``) never touches the training traces or their sampler: its
    micro-batches hold traces from ``eval_trace_dataset`` (in the same order at every
    evaluation), or none.

    Args:
        model: A model id or path, or a transformers CausalLM (as GRPOTrainer takes it).
        args: HyTuningTrainerConfig.
        train_dataset: Unlabelled prompts: a ``prompt`` column, plain text or conversational.
        trace_dataset: Curated traces: ``prompt``, ``reasoning``, ``answer`` columns (a Dataset or
            a list of dicts); None only with traces_per_step = 0.
        processing_class: The tokenizer (vision-language processors are refused).
        reward_funcs: TRL reward functions (or one), the string "self_certainty" standing for the
            default; None: self-certainty (``self_certainty``) alone.
        answer_fn: ``answer_fn(completion_text) -> str | None``, replacing the cue parsing of
            rollout answers.
        peft_config: A peft config (LoRA), as GRPOTrainer takes it.
        eval_trace_dataset: Held-out curated traces for ``evaluate``'s RD rows (as trace_dataset);
            None: evaluation scores rollouts only.
        **kwargs: Further GRPOTrainer arguments (eval_dataset, callbacks, ...).

    Raises:
        NotImplementedError: A setting it does not reproduce, named (see
            HyTuningTrainerConfig.check_supported), environment_factory, a vision-language
            processor, DeepSpeed ZeRO-3.
        ValueError: trace_dataset without a required column, or a trace that is too long or
            has an empty answer (naming its row).
        TypeError: args is not a HyTuningTrainerConfig.
    """

    def __init__(self, model, args: HyTuningTrainerConfig, train_dataset, trace_dataset=None, processing_class=None,
                 reward_funcs=None, answer_fn=None, peft_config=None, eval_trace_dataset=None, **kwargs):
        if not isinstance(args, HyTuningTrainerConfig):
            raise TypeError(f"args: expected a HyTuningTrainerConfig, got {type(args).__name__}")
        args.check_supported()  # again: fields may have changed since the config was made
        if kwargs.get("environment_factory") is not None:
            raise NotImplementedError("environment_factory: curated traces have no environment")
        traces = _trace_dataset(trace_dataset, args.traces_per_step)
        eval_traces = _trace_dataset(eval_trace_dataset, 0, "eval_trace_dataset")
        self.answer_fn = answer_fn
        self.hytuning = HyTuningLoss(args.hytuning_config())  # λ's state
        self._rd_chunks = {"train": [None], "eval": [None]}
        self._rd_batch = {"train": RDBatch(), "eval": RDBatch()}
        self._answered_window = deque(maxlen=ANSWERED_WINDOW)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs] if reward_funcs else ["self_certainty"]
        funcs = [self.self_certainty if f == "self_certainty" else f for f in funcs]  # a name for the default reward
        super().__init__(model=model, reward_funcs=funcs, args=args,
                         train_dataset=train_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        if self._is_vlm:
            raise NotImplementedError("processing_class: vision-language models (their image inputs do not reach "
                                      "the hidden states hykernels computes)")
        refuse_zero3(self.accelerator)
        self._cue = self._encode(args.answer_cue)
        self._delimiters = step_delimiters(self._tokenizer, args.step_delimiter)
        self._trace_rows = self._tokenize_traces(traces, "trace_dataset")
        self._eval_trace_rows = self._tokenize_traces(eval_traces, "eval_trace_dataset")
        self._sampler = TraceSampler(len(self._trace_rows), args.seed)  # the same on every process
        self._eval_sampler = TraceSampler(len(self._eval_trace_rows), args.seed)

    def _encode(self, text: str) -> list:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _tokenize_traces(self, traces, name: str) -> list:
        """Every trace as token ids (its prompt as TRL tokenizes prompts, reasoning + cue + answer
        as one text), checked once."""
        if len(traces) == 0:
            return []
        cap = self.args.max_prompt_length + self.args.max_completion_length
        prompts = self._tokenize_prompts(list(traces["prompt"]))[0]
        rows = []
        for i, (prompt, reasoning, answer) in enumerate(zip(prompts, traces["reasoning"], traces["answer"])):
            if not answer.strip():
                raise ValueError(f"{name}: row {i} has an empty answer")
            try:
                parts = encode_answer(self._tokenizer, reasoning, self.args.answer_cue, answer.strip())
            except ValueError as e:
                raise ValueError(f"{name}: row {i}: {e}") from None
            row = trace_row(prompt, *parts, self._tokenizer.eos_token_id)
            if len(row.prompt) + len(row.completion) - 1 > cap:  # the count leaves out the end of sequence
                raise ValueError(f"{name}: row {i} holds {len(row.prompt) + len(row.completion) - 1} tokens "
                                 f"(prompt, reasoning, answer cue, answer), more than max_prompt_length + "
                                 f"max_completion_length = {cap}")
            rows.append(row)
        return rows

    # --- every forward goes through the Trainer's model --------------------------------------------

    def _forward(self, model, input_ids, attention_mask, n, fn, aux_loss=False):
        """``fn(hidden, targets, weight, logit_kwargs, aux)`` inside ONE forward of ``model``.

        ``model`` is what TRL passes (the DDP/FSDP-wrapped model in the loss, ``self.model`` for
        log-probs, rewards and probes); call_through runs the trunk and fn as its forward, so DDP
        readies its gradient all-reduce and FSDP2 gathers the lm_head weight fn reads. hidden:
        the states predicting the last n tokens; targets: those tokens (-100 on padding); the
        lm_head weight and its options at TRL's sampling temperature; aux: the MoE router
        auxiliary loss when ``aux_loss``, else None.
        """
        inner = self.accelerator.unwrap_model(model)

        def run():
            with self.accelerator.autocast():  # as TRL runs the model (bf16 where configured)
                if aux_loss:
                    hidden, aux = hidden_states_and_aux_loss(inner, input_ids, attention_mask=attention_mask)
                else:
                    hidden, aux = last_hidden_states(inner, input_ids, attention_mask=attention_mask), None
            targets = input_ids[:, -n:].masked_fill(attention_mask[:, -n:] == 0, -100)
            head = lm_head(inner)
            kwargs = dict(head.kwargs(), temperature=head.temperature * self.temperature)
            return fn(hidden[:, -n - 1:-1], targets, head.weight, kwargs, aux)

        return call_through(model, inner, run)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False, **_):
        def stats(hidden, targets, weight, kwargs, aux):
            with self.accelerator.autocast():
                return token_stats(hidden, weight, targets, **kwargs), aux

        size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), size):  # TRL's chunks bound the activations
            out, chunk_aux = self._forward(model, input_ids[start:start + size], attention_mask[start:start + size],
                                           logits_to_keep, stats, aux_loss=compute_aux_loss)
            logps.append(out.logp)
            entropies.append(out.entropy)
            aux.append(chunk_aux)
        return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)

    # --- rewards ---------------------------------------------------------------------------------

    def _generate(self, prompts):
        out = super()._generate(prompts)
        self._prompt_ids = out[0]  # one per completion, for self_certainty
        return out

    def self_certainty(self, prompts, completion_ids, **_):
        """The default reward (a TRL reward function): u_i, the policy's mean self-certainty over
        rollout i's completion tokens (docs/math.md §4), without gradient."""
        def padded(seqs, side):
            return pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_side=side, padding_value=-1)

        def rewards(hidden, targets, weight, kwargs, aux):
            rows = torch.arange(len(prompts), device=targets.device)[:, None]
            with self.accelerator.autocast():
                return rollout_rewards(hidden, weight, targets, torch.where(targets != -100, rows, -1), len(prompts),
                                       **kwargs)

        prompt, completion = padded(self._prompt_ids, "left"), padded(completion_ids, "right")
        ids = torch.cat([prompt, completion], 1).to(self.accelerator.device)
        with torch.no_grad():
            return self._forward(self.model, ids.clamp(min=0), (ids >= 0).long(), completion.shape[1], rewards).tolist()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func  # [all processes' rollouts, reward functions]

    def _advantages(self, prg: torch.Tensor, mode: str):
        """(advantages, gated rewards of the scorable rollouts) of the whole generation batch."""
        rewards, config = self._rewards_per_func, self.hytuning.config
        scorable = ~torch.isnan(rewards).all(1)  # as TRL: every reward function returned None → advantage 0
        u = (rewards * self.reward_weights.to(rewards.device)).nansum(1)
        if config.gate_rewards and config.prg_variant in GATED_VARIANTS:
            u = gate_rewards(u, prg.to(u))
        size = self.num_generations if mode == "train" else self.num_generations_eval
        if self.args.trl_advantages:
            return trl_group_advantages(u, scorable, size, config.std_normalize), u[scorable]
        groups = torch.arange(len(u), device=u.device) // size  # TRL's sampler: each prompt's rollouts in a row
        adv = torch.zeros_like(u)
        if bool(scorable.any()):
            adv[scorable] = group_advantages(u[scorable], groups[scorable], std_normalize=config.std_normalize,
                                             eps=config.eps)
        return adv, u[scorable]

    # --- PRG, traces and λ, once per generation batch -------------------------------------------

    def measure_prg(self, traces: list) -> torch.Tensor:
        """PRG (args.prg_variant) of each ProbeTrace from packed probes (docs/math.md §3): one
        forward of the policy, in eval mode and without gradient, per per_device_train_batch_size
        traces, the lm_head only on the answer rows. With several processes, each runs as many
        forwards as the process with the most traces (repeating its last batch, or one trace of
        its own when it has none, results dropped): under FSDP every forward gathers parameters
        on all of them, and unequal counts would leave some waiting for ever.

        Args:
            traces: ProbeTraces (token ids), answers not empty.

        Returns:
            [len(traces)] fp32 scores on the trainer's device.
        """
        device, size = self.accelerator.device, self.args.per_device_train_batch_size
        batches = [traces[start:start + size] for start in range(0, len(traces), size)]
        calls = len(batches)
        if self.accelerator.num_processes > 1:
            calls = int(self.accelerator.reduce(torch.tensor(calls, device=device), reduction="max"))
        filler = batches[-1:] or [[ProbeTrace([self._tokenizer.eos_token_id], [], [self._tokenizer.eos_token_id],
                                               cue=self._cue or [self._tokenizer.eos_token_id])]]
        scores = [torch.zeros(0, device=device)]
        model, was_training = self.model, self.model.training
        inner = self.accelerator.unwrap_model(model)
        model.eval()  # no dropout: PRG is a measurement
        try:
            with torch.no_grad(), disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
                for call in range(calls):
                    batch = build_probes(batches[call] if call < len(batches) else filler[0], cue=self._cue,
                                         delimiters=self._delimiters, max_steps=self.args.max_probe_steps,
                                         pad_id=self._tokenizer.pad_token_id, device=device)

                    def support():
                        with self.accelerator.autocast():
                            return probe_support(inner, batch)

                    c = call_through(model, inner, support)
                    if call < len(batches):
                        scores.append(prg_gains(c.float(), batch.probe_offsets, variant=self.args.prg_variant).scores)
        finally:
            model.train(was_training)
        return torch.cat(scores).float()

    def _probe(self, prompt: list, reasoning: str, answer: str) -> Optional[ProbeTrace]:
        """A rollout's ProbeTrace, cue and answer encoded together with its reasoning; None when
        the answer leaves the cue no token of its own (an answer cue that is not one)."""
        try:
            reasoning_ids, cue, answer_ids = encode_answer(self._tokenizer, reasoning, self.args.answer_cue, answer)
        except ValueError:
            return None
        return ProbeTrace(prompt, reasoning_ids, answer_ids, cue=cue)

    def _rollout_probes(self, out: dict, mode: str) -> list:
        """Each rollout's ProbeTrace: its own reasoning, and its own answer or (prg_answer
        "majority") the one its group gave most often, gathered over every process; None for a
        rollout without an answer (PRG 0)."""
        prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
        found = [find_answer(self._tokenizer.decode(c[m.bool()].tolist(), skip_special_tokens=True),
                             self.args.answer_cue, self.answer_fn)
                 for c, m in zip(out["completion_ids"], out["completion_mask"])]
        answers = [f.answer if f else None for f in found]
        if self.args.prg_answer == "majority":
            size = self.num_generations if mode == "train" else self.num_generations_eval
            everyone = gather_object(answers)  # TRL's sampler: each prompt's rollouts in a row, over processes
            rank = self.accelerator.process_index
            answers = majority_answers(everyone, size)[rank * len(answers):(rank + 1) * len(answers)]
        return [self._probe(prompt, f.reasoning, answer) if f and answer else None
                for prompt, f, answer in zip(prompts, found, answers)]

    def _needs_prg(self, traces: list) -> bool:
        """PRG is measured where it acts: to gate rewards, or to weigh traces and move λ."""
        config = self.hytuning.config
        return bool(traces) or (config.gate_rewards and config.prg_variant in GATED_VARIANTS)

    def _draw_traces(self, mode: str, count: int) -> list:
        """This process's share of ``count`` traces per process: training from trace_dataset's
        shared order, evaluation from eval_trace_dataset's (never the training sampler)."""
        rows, sampler = ((self._trace_rows, self._sampler) if mode == "train" else
                         (self._eval_trace_rows, self._eval_sampler))
        if not count or not rows:
            return []
        return [rows[i] for i in sampler.share(count, self.accelerator.process_index, self.accelerator.num_processes)]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode, device = "train" if self.model.training else "eval", self.accelerator.device
        rollouts = self._rollout_probes(out, mode)
        answered = torch.tensor([r is not None for r in rollouts], device=device)
        chunks, per_chunk = (self.args.steps_per_generation if mode == "train" else 1), self.args.traces_per_micro_batch
        traces = self._draw_traces(mode, chunks * per_chunk)
        per_chunk = per_chunk if traces else 0
        if self._needs_prg(traces):
            prg = self.measure_prg([r for r in rollouts if r is not None] + [t.probe for t in traces])
        else:
            prg = torch.zeros(int(answered.sum()) + len(traces), device=device)
        n_answered = int(answered.sum())
        prg_rollouts = torch.zeros(len(rollouts), device=device).masked_scatter(answered, prg[:n_answered])
        prg_traces = prg[n_answered:]

        gather = self.accelerator.gather  # advantages, λ and trace weights see every process's sequences
        all_rollouts, all_answered = gather(prg_rollouts), gather(answered)
        all_traces = gather(prg_traces) if traces else prg_traces
        adv, gated = self._advantages(all_rollouts, mode)
        rank = self.accelerator.process_index
        mine = slice(rank * len(rollouts), (rank + 1) * len(rollouts))
        out.update(advantages=adv[mine], prg=prg_rollouts, is_rd=torch.zeros(len(rollouts), dtype=torch.bool,
                                                                               device=device))
        if mode == "train" and traces:
            is_rd = torch.arange(len(all_traces) + len(all_rollouts), device=device) < len(all_traces)
            self.hytuning.update_lambda(torch.cat([all_traces, all_rollouts]), is_rd)
        tokens = torch.tensor(float(sum(len(t.completion) for t in traces)), device=device)
        self._rd_batch[mode] = RDBatch(tokens=float(self.accelerator.reduce(tokens, reduction="sum")),
                                       prg_mean=float(all_traces.mean()) if traces else None)
        self._rd_chunks[mode] = [trace_rows(traces[k * per_chunk:(k + 1) * per_chunk],
                                            prg_traces[k * per_chunk:(k + 1) * per_chunk],
                                            self._tokenizer.pad_token_id, device) if per_chunk else None
                                 for k in range(chunks)]
        metrics = self._metrics[mode]
        share = all_answered.float().mean().item()
        metrics["answered"].append(share)
        if self._needs_prg(traces):
            metrics["prg_rollouts"].append(all_rollouts.mean().item())
        if len(all_traces):
            metrics["prg_traces"].append(all_traces.mean().item())
        if len(gated):
            metrics["reward_gated"].append(gated.mean().item())
        if mode == "train":
            self._watch_answers(share)
        return out

    def _watch_answers(self, share: float):
        """Warn, naming the cue, when most rollouts of the last ANSWERED_WINDOW generation
        batches had no answer: their PRG and gated reward are 0, so they train nothing."""
        self._answered_window.append(share)
        window = self._answered_window
        if len(window) == window.maxlen and sum(window) / len(window) < 0.5:
            if self.accelerator.is_main_process:
                how = "answer_fn" if self.answer_fn is not None else f"the answer cue {self.args.answer_cue!r}"
                logger.warning(
                    "HyTuningTrainer: %.0f%% of the rollouts of the last %d generation batches had no answer found "
                    "by %s; their PRG and gated reward are 0, so they train nothing. Set answer_cue to the text the "
                    "model writes before its answer, or pass answer_fn.", 100 * (1 - sum(window) / len(window)),
                    len(window), how)
            window.clear()  # warn again only after another full window

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)  # TRL's micro-batch of rollouts (buffered in training)
        mode = "train" if self.model.training else "eval"
        chunk = self._step % self.args.steps_per_generation if mode == "train" else 0  # the slice TRL just took
        return merge_rows(inputs, self._rd_chunks[mode][chunk], self._tokenizer.pad_token_id)

    def evaluate(self, *args, **kwargs):
        """Trainer.evaluate, its RD rows from eval_trace_dataset, the same ones at every evaluation
        (the training traces, their sampler and λ stay untouched)."""
        self._eval_sampler.drawn = 0
        return super().evaluate(*args, **kwargs)

    # --- the loss: one forward, one prg_loss ------------------------------------------------------

    def _accumulation(self, training: bool) -> int:
        """The gradient-accumulation steps a training micro-batch's loss is divided by (1 in eval)."""
        return self.current_gradient_accumulation_steps if training else 1

    def _loss_type_weights(self, mask, inputs, training):
        """TRL's loss_type normalisation of rollout tokens ([rollouts, C]) as per-token weights,
        its division by the gradient-accumulation steps included."""
        accumulation = self._accumulation(training)
        if self.loss_type == "dapo":  # num_items_in_batch counts the generation batch's rollout tokens
            tokens = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
            if training:  # the generation batch is split over steps_per_generation micro-batches
                tokens = tokens * accumulation / self.args.steps_per_generation
            return grpo_token_weights(mask, "dapo", num_items_in_batch=tokens)
        return grpo_token_weights(mask, self.loss_type, max_completion_length=self.max_completion_length) / accumulation

    def _token_norm(self, rd_on, rl_on, is_rd, inputs, training):
        """prg_loss's token_norm. RD tokens: processes / T_RD, T_RD the trace tokens of one
        optimisation step on every process (the generation batch's count scaled to one
        accumulation window, as TRL scales dapo's), so that, DDP and FSDP averaging the processes'
        gradients, the step's RD term is the cross-entropy over all its trace tokens, as one
        process computes it. Rollout tokens: TRL's loss_type weights (÷ the accumulation steps)."""
        tokens = max(self._rd_batch["train" if training else "eval"].tokens, 1.0) / self.accelerator.num_processes
        if training:
            tokens = tokens * self._accumulation(training) / self.args.steps_per_generation
        norm = rd_on / tokens
        if bool((~is_rd).any()):
            norm[~is_rd] = self._loss_type_weights(rl_on[~is_rd].long(), inputs, training).to(norm)
        return norm

    def _rlif_factors(self, hidden, weight, targets, kwargs, rl_on, inputs, training):
        """(ppo_scale, entropy_norm, entropy mask) of prg_loss, as TRL's _compute_loss weighs
        rollout tokens: the vLLM importance-sampling ratio and the top-entropy mask multiply the
        PPO term only; the entropy bonus is the mean entropy over the (masked) rollout tokens."""
        scale, entropy_mask = None, None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            scale = inputs["importance_sampling_ratio"].expand(rl_on.shape).float()  # truncated/masked as TRL made it
        if self.top_entropy_quantile < 1.0:
            with torch.no_grad():  # the threshold needs every entropy first: one more lm_head pass, no model forward
                entropy = token_stats(hidden.detach(), weight, targets, **kwargs).entropy
            entropy_mask = self.get_high_entropy_mask(entropy, rl_on, 1 - self.top_entropy_quantile)
            scale = entropy_mask.float() if scale is None else scale * entropy_mask
        entropy_norm = None
        if self._entropy_bonus_enabled:
            on = rl_on if entropy_mask is None else rl_on & entropy_mask
            accumulation = self._accumulation(training)
            entropy_norm = on / (on.sum().clamp(min=1) * accumulation)
        return scale, entropy_norm

    def _compute_loss(self, model, inputs):
        training = self.model.training
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        rows, width = completion_ids.shape
        mask = completion_mask * inputs.get("tool_mask", 1)  # tool output is attended to, not trained on
        device = completion_ids.device
        is_rd = inputs.get("is_rd", torch.zeros(rows, dtype=torch.bool, device=device))  # TRL's own batches: rollouts
        rd_on, rl_on = (mask != 0) & is_rd[:, None], (mask != 0) & ~is_rd[:, None]
        # the loss reads TRL's attributes where TRL's _compute_loss does
        config = replace(self.hytuning.config, kl_coef=self.beta, clip_eps=(self.epsilon_low, self.epsilon_high),
                         entropy_coef=self.entropy_coef)

        def loss_fn(hidden, targets, weight, kwargs, aux):
            targets = targets.masked_fill(mask == 0, -100)
            with self.accelerator.autocast():
                ppo_scale, entropy_norm = self._rlif_factors(hidden, weight, targets, kwargs, rl_on, inputs, training)
                loss, out = prg_loss(
                    hidden, weight, targets, torch.arange(rows, device=device)[:, None].expand(rows, width),
                    prg=inputs.get("prg", torch.zeros(rows, device=device)), is_rd=is_rd,
                    advantages=inputs["advantages"].float(), old_logp=inputs.get("old_per_token_logps"),
                    ref_logp=inputs.get("ref_per_token_logps"), lam=float(self.hytuning.lam), config=config,
                    token_norm=self._token_norm(rd_on, rl_on, is_rd, inputs, training), ppo_scale=ppo_scale,
                    entropy_norm=entropy_norm, importance_sampling_level=self.importance_sampling_level,
                    use_bias_correction_kl=self.args.use_bias_correction_kl,
                    rd_prg_mean=self._rd_batch["train" if training else "eval"].prg_mean, **kwargs)
            if aux is not None:  # TRL: router_aux_loss_coef · aux ÷ the accumulation steps
                loss = loss + self.router_aux_loss_coef * aux / self._accumulation(training)
            return loss, out, ppo_scale, aux

        loss, out, ppo_scale, aux = self._forward(model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
                                                  torch.cat([inputs["prompt_mask"], completion_mask], 1), width,
                                                  loss_fn, aux_loss=self.aux_loss_enabled)
        self._log_loss("train" if training else "eval", out, rd_on, rl_on, inputs, ppo_scale, aux)
        return loss

    def _global_mean(self, values, on):
        """The mean of ``values`` where ``on`` over every process, None where there is none."""
        values = torch.where(on, values, torch.zeros_like(values))  # not a product: padding rows may hold inf
        totals = self.accelerator.reduce(torch.stack([values.sum(), on.sum()]).float(), reduction="sum")
        return None if totals[1] == 0 else (totals[0] / totals[1]).item()

    def _log_loss(self, mode, out, rd_on, rl_on, inputs, ppo_scale, aux):
        stats = out.stats
        logged = {"lambda": float(out.lam), "entropy": self._global_mean(stats.entropy, rl_on),
                  "rd_nll": self._global_mean(-stats.logp, rd_on)}
        for name, on in (("rd_tokens", rd_on), ("rlif_tokens", rl_on)):
            logged[name] = self.accelerator.reduce(on.sum().float(), reduction="sum").item()
        rollouts = ~inputs.get("is_rd", torch.zeros(len(rl_on), dtype=torch.bool, device=rl_on.device))
        training = mode == "train"
        # policy_loss as TRL logs it: before the ÷ accumulation, except for dapo, whose normaliser holds it
        undo = self._accumulation(training) if self.loss_type != "dapo" else 1
        health = trl_health_metrics(
            logp=stats.logp[rollouts], old_logp=_rows_of(inputs.get("old_per_token_logps"), rollouts),
            ref_logp=_rows_of(inputs.get("ref_per_token_logps"), rollouts) if self.beta else None,
            advantages=inputs["advantages"][rollouts].float(), mask=rl_on[rollouts],
            level=self.importance_sampling_level, clip=(self.epsilon_low, self.epsilon_high), beta=self.beta,
            bias_correction_kl=self.args.use_bias_correction_kl, ppo_scale=_rows_of(ppo_scale, rollouts),
            loss_weights=self._loss_type_weights(rl_on[rollouts].long(), inputs, training).float() * undo)
        reduce, gather = self.accelerator.reduce, self.accelerator.gather
        for name, (total, count) in health.means.items():
            totals = reduce(torch.stack([total, count]).float(), reduction="sum")
            logged[name] = (totals[0] / totals[1].clamp(min=1.0)).item()
        for name, (values, pick) in health.extremes.items():
            logged[name] = pick(gather(values)).item()
        logged["policy_loss"] = gather(health.policy_loss).nanmean().item()
        if aux is not None:
            logged["aux_loss"] = self.accelerator.gather_for_metrics(aux.detach()).mean().item()
        for name, value in logged.items():
            if value is not None:
                self._metrics[mode][name].append(value)

    # --- λ in checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"lambda": float(self.hytuning.lam), "traces_drawn": self._sampler.drawn}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.hytuning.lam.fill_(state["lambda"])
            self._sampler.drawn = state["traces_drawn"]


def _rows_of(x, rows):
    """The rollout rows of a per-row input (None stays None; a sequence-level [R, 1] ratio too)."""
    return None if x is None or not isinstance(x, torch.Tensor) else x[rows]
