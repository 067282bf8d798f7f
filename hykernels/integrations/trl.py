"""HyTuning in TRL: ``HyTuningTrainer``, a ``trl.GRPOTrainer`` whose every optimisation step mixes
curated traces (RD) with the policy's own rollouts (RLIF), weighed by PRG (docs/math.md §3–§6).

Written against TRL 1.16's private hooks (``_generate_and_score_completions``, ``_prepare_inputs``,
``_compute_loss``, ``_get_per_token_logps_and_entropies``, ``_calculate_rewards``, ``_generate``,
``_save_checkpoint``, ``_load_optimizer_and_scheduler``): check them when upgrading TRL.
The lm_head never forms logits: log-probs, rewards, PRG and the loss come from hidden states and
the lm_head weight through hykernels. Guide: docs/guides/trl.md.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields, replace

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
from ..hytuning import (LOSS_TYPES, HyTuningConfig, HyTuningLoss, ProbeTrace, build_probes, gate_rewards,
                        group_advantages, grpo_token_weights, majority_answers, prg_loss, rollout_rewards,
                        step_delimiters)
from ..hytuning.probes import DEFAULT_MAX_STEPS
from ..hytuning.rewards import GATED_VARIANTS
from ._trl_rows import TRACE_COLUMNS, TraceSampler, merge_rows, split_completion, trace_row, trace_rows
from .transformers import last_hidden_states, lm_head, probe_support

__all__ = ["HyTuningTrainerConfig", "HyTuningTrainer"]

STATE_FILE = "hytuning_state.json"  # λ and the trace sampler, in every checkpoint directory
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


def _help(text: str, default=None) -> dict:
    return dict(default=default, metadata={"help": text})


@dataclass
class HyTuningTrainerConfig(GRPOConfig):
    """GRPOConfig plus the HyTuning fields (docs/math.md §6) and the trace/probe settings.

    HyTuningConfig fields with the same names and defaults: ``lambda0``, ``kappa``,
    ``lambda_min``, ``lambda_max``, ``ema``, ``rd_weight_min``, ``rd_weight_max``, ``eps``,
    ``prg_variant``, ``gate_rewards``. The others are GRPOConfig's own knobs, which
    ``hytuning_config()`` maps:

    | HyTuningConfig | GRPOConfig |
    |---|---|
    | `kl_coef` | `beta` (k3 KL to the reference, on rollout tokens) |
    | `clip_eps` | `(epsilon, epsilon_high or epsilon)` |
    | `std_normalize` | `scale_rewards`: "group" → True, "none" → False ("batch" is refused) |
    | `entropy_coef` | `entropy_coef`, with TRL's meaning: the mean entropy of the rollout tokens, times 1 − λ |

    Attributes:
        traces_per_step: Curated traces per optimisation step on each process; each of the
            gradient_accumulation_steps micro-batches holds traces_per_step /
            gradient_accumulation_steps of them beside its per_device_train_batch_size rollouts,
            so a generation batch (steps_per_generation micro-batches) draws
            traces_per_step · steps_per_generation / gradient_accumulation_steps. Must divide
            by gradient_accumulation_steps; 0: RLIF only. Default: as many as rollouts
            (per_device_train_batch_size · gradient_accumulation_steps).
        answer_cue: The text that precedes the final answer. A trace's RD row is reasoning,
            cue, answer and end of sequence, each encoded with the tokenizer on its own; the
            probes put the same cue tokens before each answer copy; a rollout's answer is the
            text after its first cue, stripped.
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
    rd_weight_min: float = field(**_help("Lower clamp of a trace's weight PRG_i / mean PRG.", _DEFAULTS.rd_weight_min))
    rd_weight_max: float = field(**_help("Upper clamp of a trace's weight.", _DEFAULTS.rd_weight_max))
    eps: float = field(**_help("ε of the trace weights and of the group advantages.", _DEFAULTS.eps))
    prg_variant: str = field(**_help(f"The PRG variant, one of {PRG_VARIANTS}; rewards are gated only by "
                                     f"{GATED_VARIANTS}.", _DEFAULTS.prg_variant))
    gate_rewards: bool = field(**_help("Gate rollout rewards by PRG, u' = PRG·u.", _DEFAULTS.gate_rewards))
    prg_answer: str = field(**_help(
        "Whose answer a rollout's PRG measures support for: 'own', or 'majority', the answer given most often in "
        "its group (over every process; label-free).", "own"))
    traces_per_step: int | None = field(**_help(
        "Curated traces per optimisation step on each process (divisible by gradient_accumulation_steps); "
        "0: RLIF only; default: per_device_train_batch_size · gradient_accumulation_steps."))
    answer_cue: str = field(**_help("The text before the final answer, in traces, probes and rollouts.", "\nAnswer: "))
    step_delimiter: str = field(**_help("The text that ends a reasoning step.", "\n\n"))
    max_probe_steps: int = field(**_help("Steps beyond this many are merged in the PRG probes.", DEFAULT_MAX_STEPS))
    max_prompt_length: int = field(**_help(
        "With max_completion_length, the longest curated trace (prompt + reasoning + cue + answer tokens).", 512))

    def __post_init__(self):
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
        need(number("eps") and self.eps > 0, "eps", "a number > 0")
        need(self.prg_variant in PRG_VARIANTS, "prg_variant", f"one of {PRG_VARIANTS}")
        need(isinstance(self.gate_rewards, bool), "gate_rewards", "a bool")
        need(self.prg_answer in PRG_ANSWERS, "prg_answer", f"one of {PRG_ANSWERS}")
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


def _trace_dataset(traces, traces_per_step: int):
    """The curated traces, checked: a datasets.Dataset (or a list of dicts) with prompt, reasoning, answer."""
    if traces is None or (isinstance(traces, list) and not traces):
        if traces_per_step:
            raise ValueError("trace_dataset: required, and not empty, when traces_per_step > 0 "
                             "(traces_per_step=0 trains on rollouts only)")
        return []
    if isinstance(traces, list):
        from datasets import Dataset

        traces = Dataset.from_list(traces)
    columns = getattr(traces, "column_names", None)
    if columns is None:
        raise TypeError(f"trace_dataset: expected a datasets.Dataset, got {type(traces).__name__}")
    missing = [c for c in TRACE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"trace_dataset: missing column {', '.join(missing)} (it needs {', '.join(TRACE_COLUMNS)})")
    if traces_per_step and len(traces) == 0:
        raise ValueError("trace_dataset: required, and not empty, when traces_per_step > 0")
    return traces


class HyTuningTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, each step HyTuning's mix of curated traces and rollouts (docs/math.md §3–§6).

    Per generation batch (TRL generates once per steps_per_generation × num_iterations
    micro-batches; with TRL's defaults that is once per optimisation step):

    1. TRL samples the rollouts of ``train_dataset``'s prompts (transformers or vLLM), computes
       old/reference log-probs (hykernels ``token_stats``) and the rewards: ``reward_funcs``,
       default the policy's self-certainty (§4).
    2. Each rollout's answer is the text after its first ``answer_cue`` (or ``answer_fn``'s);
       curated traces are drawn from ``trace_dataset`` (without replacement, reshuffled each
       pass). PRG of traces and answered rollouts comes from packed probes (§3: build_probes,
       one forward of the policy per per_device_train_batch_size traces, in eval mode, without
       gradient; the FlexAttention block mask for attn_implementation="flex_attention", else the
       dense mask). A rollout's probes end with its own answer, or with prg_answer="majority" the
       answer its group gave most often (label-free). A rollout without an answer has PRG 0, so
       its gated reward is 0.
    3. Rewards u = TRL's weighted sum of the reward functions; u′ = PRG·u when gate_rewards and
       prg_variant is in [0, 1]; the advantages are §4's group advantages of u′ (population
       std + eps, or none for scale_rewards="none"); a rollout every reward function scored
       None has advantage 0, as in TRL.
    4. In training, λ ← ema·λ + (1 − ema)·clamp(λ₀ + κ·(mean PRG of traces − mean PRG of
       rollouts), λ_min, λ_max) over the whole (all-process) generation batch.

    Per micro-batch, the traces (teacher-forced prompt + reasoning + cue + answer + EOS) join
    the rollouts as extra rows, and ONE model forward feeds ONE ``prg_loss`` call: RD tokens of
    trace i weigh λ·w_i/(T_RD·G) (w_i = clamp(PRG_i / mean PRG of the micro-batch's traces));
    rollout tokens weigh (1 − λ) times TRL's ``loss_type`` normalisation (÷ G as TRL divides),
    times the vLLM importance-sampling ratio and the top-entropy mask on the PPO term only, with
    beta·that weight on the k3 KL and, for entropy_coef, (1 − λ)·entropy_coef on the mean entropy
    of the rollout tokens (G: gradient accumulation steps, T_RD: the micro-batch's trace tokens).
    With λ = 0 (no traces) the loss is TRL's own GRPO loss.

    Logged (TRL's metrics, averaged per logging step): ``lambda``, ``prg_traces``,
    ``prg_rollouts``, ``answered`` (share of rollouts with an answer), ``reward`` (TRL's, ungated),
    ``reward_gated``, ``rd_nll`` (mean −log p of trace tokens), ``entropy`` (of rollout tokens),
    ``rd_tokens``, ``rlif_tokens``, and ``kl`` when beta > 0. λ and the trace sampler's position
    are saved in each checkpoint (hytuning_state.json) and restored by resume_from_checkpoint.

    Args:
        model: A model id or path, or a transformers CausalLM (as GRPOTrainer takes it).
        args: HyTuningTrainerConfig.
        train_dataset: Unlabelled prompts: a ``prompt`` column, plain text or conversational.
        trace_dataset: Curated traces: ``prompt``, ``reasoning``, ``answer`` columns (a Dataset or
            a list of dicts); None only with traces_per_step = 0.
        processing_class: The tokenizer (vision-language processors are refused).
        reward_funcs: TRL reward functions; None: self-certainty (``self_certainty``).
        answer_fn: ``answer_fn(completion_text) -> str | None``, replacing the cue parsing of
            rollout answers.
        peft_config: A peft config (LoRA), as GRPOTrainer takes it.
        **kwargs: Further GRPOTrainer arguments (eval_dataset, callbacks, ...).

    Raises:
        NotImplementedError: A setting it does not reproduce, named (see
            HyTuningTrainerConfig.check_supported),
            environment_factory, a vision-language processor, a MoE router aux loss.
        ValueError: trace_dataset without a required column, or a trace that is too long or
            has an empty answer (naming its row).
        TypeError: args is not a HyTuningTrainerConfig.
    """

    def __init__(self, model, args: HyTuningTrainerConfig, train_dataset, trace_dataset=None, processing_class=None,
                 reward_funcs=None, answer_fn=None, peft_config=None, **kwargs):
        if not isinstance(args, HyTuningTrainerConfig):
            raise TypeError(f"args: expected a HyTuningTrainerConfig, got {type(args).__name__}")
        args.check_supported()  # again: fields may have changed since the config was made
        if kwargs.get("environment_factory") is not None:
            raise NotImplementedError("environment_factory: curated traces have no environment")
        traces = _trace_dataset(trace_dataset, args.traces_per_step)
        self.answer_fn = answer_fn
        self.hytuning = HyTuningLoss(args.hytuning_config())  # λ's state
        self._rd_chunks = {"train": [None], "eval": [None]}
        super().__init__(model=model, reward_funcs=reward_funcs or [self.self_certainty], args=args,
                         train_dataset=train_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        if self._is_vlm:
            raise NotImplementedError("processing_class: vision-language models (their image inputs do not reach "
                                      "the hidden states hykernels computes)")
        if self.aux_loss_enabled:
            raise NotImplementedError("router_aux_loss_coef: the MoE router aux loss; set router_aux_loss_coef=0.0")
        self._cue = self._encode(args.answer_cue)
        self._delimiters = step_delimiters(self._tokenizer, args.step_delimiter)
        self._trace_rows = self._tokenize_traces(traces)
        self._sampler = TraceSampler(len(self._trace_rows), args.seed + self.accelerator.process_index)

    def _encode(self, text: str) -> list:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _tokenize_traces(self, traces) -> list:
        """Every trace as token ids (its prompt as TRL tokenizes prompts), checked once."""
        if len(traces) == 0:
            return []
        cap = self.args.max_prompt_length + self.args.max_completion_length
        prompts = self._tokenize_prompts(list(traces["prompt"]))[0]
        rows = []
        for i, (prompt, reasoning, answer) in enumerate(zip(prompts, traces["reasoning"], traces["answer"])):
            answer_ids = self._encode(answer)
            if not answer_ids:
                raise ValueError(f"trace_dataset: row {i} has an empty answer")
            row = trace_row(prompt, self._encode(reasoning), self._cue, answer_ids, self._tokenizer.eos_token_id)
            if len(row.prompt) + len(row.completion) - 1 > cap:  # the count leaves out the end of sequence
                raise ValueError(f"trace_dataset: row {i} holds {len(row.prompt) + len(row.completion) - 1} tokens "
                                 f"(prompt, reasoning, answer cue, answer), more than max_prompt_length + "
                                 f"max_completion_length = {cap}")
            rows.append(row)
        return rows

    # --- the hidden states, and the log-probs TRL asks for -------------------------------------

    def _rows(self, model, input_ids, attention_mask, n):
        """Hidden states predicting the last n tokens, their targets (-100 on padding), the lm_head
        weight and its options at TRL's sampling temperature."""
        with self.accelerator.autocast():  # as TRL runs the model (bf16 where configured)
            hidden = last_hidden_states(model, input_ids, attention_mask=attention_mask)[:, -n - 1:-1]
        targets = input_ids[:, -n:].masked_fill(attention_mask[:, -n:] == 0, -100)
        head = lm_head(self.accelerator.unwrap_model(model))
        return hidden, targets, head.weight, dict(head.kwargs(), temperature=head.temperature * self.temperature)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False, **_):
        size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), size):  # TRL's chunks bound the activations
            hidden, targets, weight, kwargs = self._rows(model, input_ids[start:start + size],
                                                         attention_mask[start:start + size], logits_to_keep)
            with self.accelerator.autocast():
                stats = token_stats(hidden, weight, targets, **kwargs)
            logps.append(stats.logp)
            entropies.append(stats.entropy)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

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

        prompt, completion = padded(self._prompt_ids, "left"), padded(completion_ids, "right")
        ids = torch.cat([prompt, completion], 1).to(self.accelerator.device)
        with torch.no_grad():
            hidden, targets, weight, kwargs = self._rows(self.model, ids.clamp(min=0), (ids >= 0).long(),
                                                         completion.shape[1])
            rows = torch.arange(len(prompts), device=ids.device)[:, None]
            with self.accelerator.autocast():
                return rollout_rewards(hidden, weight, targets, torch.where(targets != -100, rows, -1), len(prompts),
                                       **kwargs).tolist()

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
        traces, the lm_head only on the answer rows.

        Args:
            traces: ProbeTraces (token ids), answers not empty.

        Returns:
            [len(traces)] fp32 scores on the trainer's device.
        """
        device, size = self.accelerator.device, self.args.per_device_train_batch_size
        scores = [torch.zeros(0, device=device)]
        model, was_training = self.model, self.model.training
        model.eval()  # no dropout: PRG is a measurement
        try:
            with torch.no_grad(), disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
                for start in range(0, len(traces), size):
                    batch = build_probes(traces[start:start + size], cue=self._cue, delimiters=self._delimiters,
                                         max_steps=self.args.max_probe_steps, pad_id=self._tokenizer.pad_token_id,
                                         device=device)
                    with self.accelerator.autocast():
                        support = probe_support(model, batch)
                    scores.append(prg_gains(support.float(), batch.probe_offsets, variant=self.args.prg_variant).scores)
        finally:
            model.train(was_training)
        return torch.cat(scores).float()

    def _rollout_probes(self, out: dict, mode: str) -> list:
        """Each rollout's ProbeTrace: its own reasoning, and its own answer or (prg_answer
        "majority") the one its group gave most often, gathered over every process; None for a
        rollout without an answer (PRG 0)."""
        prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
        splits = [split_completion(self._tokenizer.decode(c[m.bool()].tolist(), skip_special_tokens=True),
                                   self.args.answer_cue, self.answer_fn)
                  for c, m in zip(out["completion_ids"], out["completion_mask"])]
        answers = [split[1] if split and split[1] else None for split in splits]
        if self.args.prg_answer == "majority":
            size = self.num_generations if mode == "train" else self.num_generations_eval
            everyone = gather_object(answers)  # TRL's sampler: each prompt's rollouts in a row, over processes
            rank = self.accelerator.process_index
            answers = majority_answers(everyone, size)[rank * len(answers):(rank + 1) * len(answers)]
        probes = []
        for prompt, split, answer in zip(prompts, splits, answers):
            ids = self._encode(answer) if split and answer else []
            probes.append(ProbeTrace(prompt, self._encode(split[0]), ids) if ids else None)
        return probes

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode, device = "train" if self.model.training else "eval", self.accelerator.device
        rollouts = self._rollout_probes(out, mode)
        answered = torch.tensor([r is not None for r in rollouts], device=device)
        chunks, per_chunk = (self.args.steps_per_generation if mode == "train" else 1), self.args.traces_per_micro_batch
        traces = [self._trace_rows[i] for i in self._sampler.draw(chunks * per_chunk)]
        prg = self.measure_prg([r for r in rollouts if r is not None] + [t.probe for t in traces])
        n_answered = int(answered.sum())
        prg_rollouts = torch.zeros(len(rollouts), device=device).masked_scatter(answered, prg[:n_answered])
        prg_traces = prg[n_answered:]

        gather = self.accelerator.gather  # advantages and λ see every process's rollouts and traces
        all_rollouts, all_answered = gather(prg_rollouts), gather(answered)
        all_traces = gather(prg_traces) if per_chunk else prg_traces
        adv, gated = self._advantages(all_rollouts, mode)
        rank = self.accelerator.process_index
        mine = slice(rank * len(rollouts), (rank + 1) * len(rollouts))
        out.update(advantages=adv[mine], prg=prg_rollouts, is_rd=torch.zeros(len(rollouts), dtype=torch.bool,
                                                                               device=device))
        if mode == "train":
            is_rd = torch.arange(len(all_traces) + len(all_rollouts), device=device) < len(all_traces)
            self.hytuning.update_lambda(torch.cat([all_traces, all_rollouts]), is_rd)
        self._rd_chunks[mode] = [trace_rows(traces[k * per_chunk:(k + 1) * per_chunk],
                                            prg_traces[k * per_chunk:(k + 1) * per_chunk],
                                            self._tokenizer.pad_token_id, device) if per_chunk else None
                                 for k in range(chunks)]
        metrics = self._metrics[mode]
        metrics["prg_rollouts"].append(all_rollouts.mean().item())
        metrics["answered"].append(all_answered.float().mean().item())
        if len(all_traces):
            metrics["prg_traces"].append(all_traces.mean().item())
        if len(gated):
            metrics["reward_gated"].append(gated.mean().item())
        return out

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)  # TRL's micro-batch of rollouts (buffered in training)
        mode = "train" if self.model.training else "eval"
        chunk = self._step % self.args.steps_per_generation if mode == "train" else 0  # the slice TRL just took
        return merge_rows(inputs, self._rd_chunks[mode][chunk], self._tokenizer.pad_token_id)

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
        """prg_loss's token_norm: RD tokens the micro-batch's token mean (SFT's cross-entropy),
        rollout tokens TRL's loss_type weights; both ÷ the accumulation steps in training."""
        accumulation = self._accumulation(training)
        norm = rd_on / (rd_on.sum().clamp(min=1) * accumulation)
        if bool((~is_rd).any()):
            norm[~is_rd] = self._loss_type_weights(rl_on[~is_rd].long(), inputs, training).to(norm)
        return norm

    def _rlif_factors(self, hidden, weight, targets, kwargs, rl_on, inputs, training):
        """(ppo_scale, entropy_norm) of prg_loss, as TRL's _compute_loss weighs rollout tokens: the
        vLLM importance-sampling ratio and the top-entropy mask multiply the PPO term only; the
        entropy bonus is the mean entropy over the (masked) rollout tokens."""
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
        hidden, targets, weight, kwargs = self._rows(
            model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), width)
        mask = completion_mask * inputs.get("tool_mask", 1)  # tool output is attended to, not trained on
        targets = targets.masked_fill(mask == 0, -100)
        device = targets.device
        is_rd = inputs.get("is_rd", torch.zeros(rows, dtype=torch.bool, device=device))  # TRL's own batches: rollouts
        rd_on, rl_on = (mask != 0) & is_rd[:, None], (mask != 0) & ~is_rd[:, None]
        # the loss reads TRL's attributes where TRL's _compute_loss does
        config = replace(self.hytuning.config, kl_coef=self.beta, clip_eps=(self.epsilon_low, self.epsilon_high),
                         entropy_coef=self.entropy_coef)
        with self.accelerator.autocast():
            ppo_scale, entropy_norm = self._rlif_factors(hidden, weight, targets, kwargs, rl_on, inputs, training)
            loss, out = prg_loss(
                hidden, weight, targets, torch.arange(rows, device=device)[:, None].expand(rows, width),
                prg=inputs.get("prg", torch.zeros(rows, device=device)), is_rd=is_rd,
                advantages=inputs["advantages"].float(), old_logp=inputs.get("old_per_token_logps"),
                ref_logp=inputs.get("ref_per_token_logps"), lam=float(self.hytuning.lam), config=config,
                token_norm=self._token_norm(rd_on, rl_on, is_rd, inputs, training), ppo_scale=ppo_scale,
                entropy_norm=entropy_norm, importance_sampling_level=self.importance_sampling_level,
                use_bias_correction_kl=self.args.use_bias_correction_kl, **kwargs)
        self._log_loss("train" if training else "eval", out, rd_on, rl_on, inputs)
        return loss

    def _global_mean(self, values, on):
        """The mean of ``values`` where ``on`` over every process, None where there is none."""
        values = torch.where(on, values, torch.zeros_like(values))  # not a product: padding rows may hold inf
        totals = self.accelerator.reduce(torch.stack([values.sum(), on.sum()]).float(), reduction="sum")
        return None if totals[1] == 0 else (totals[0] / totals[1]).item()

    def _log_loss(self, mode, out, rd_on, rl_on, inputs):
        stats = out.stats
        logged = {"lambda": float(out.lam), "entropy": self._global_mean(stats.entropy, rl_on),
                  "rd_nll": self._global_mean(-stats.logp, rd_on)}
        for name, on in (("rd_tokens", rd_on), ("rlif_tokens", rl_on)):
            logged[name] = self.accelerator.reduce(on.sum().float(), reduction="sum").item()
        if self.beta:  # the k3 KL per rollout token, as TRL logs it
            d = inputs["ref_per_token_logps"] - stats.logp
            kl = d.exp() - d - 1
            if self.args.use_bias_correction_kl:
                kl = kl * self._ratio(stats.logp, inputs.get("old_per_token_logps"), rl_on)
            logged["kl"] = self._global_mean(kl, rl_on)
        for name, value in logged.items():
            if value is not None:
                self._metrics[mode][name].append(value)

    def _ratio(self, logp, old, mask):
        """The importance ratio TRL uses (detached, for logging): per token or per sequence."""
        if old is None:
            return torch.ones_like(logp)
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return log_ratio.exp().expand_as(logp)

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
