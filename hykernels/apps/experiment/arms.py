"""The arms of the ablation and one post-training step of each, every loss through `prg_loss`.

All arms start from the same warm-up model and use the same optimiser, learning rate, number of
steps and number of sequences per step (``sequences``). What differs is what those sequences are
and how they are weighed:

- ``rd``: cross-entropy on curated traces only (prg_loss with every sequence RD and PRG = 1, so
  every trace weighs the same: plain RD).
- ``rd_many``: the same on ten times as many curated traces (the "more" of "less approximates
  more": what labelling 10× the traces would buy).
- ``rlif``: GRPO on the model's own rollouts of unlabelled queries, rewarded by self-certainty,
  no labels and no PRG.
- ``mix``: half curated traces, half rollouts, λ fixed at 0.5, PRG = 1 (no PRG weighting, no
  gating): RD + RLIF without PRG.
- ``hytuning``: the same half/half batch with `HyTuningLoss` defaults: PRG-weighted RD,
  PRG-gated self-certainty rewards, λ adapted to the PRG gap and smoothed across steps.
- ``hytuning_majority``: HyTuning with a label-free PRG variant: each rollout's support is
  measured toward its group's majority answer instead of its own (the consensus test-time RL
  methods reward), so reasoning that leads away from what most samples answer scores low.
- ``grpo_correct``: GRPO on rollouts rewarded by the true correctness: a ceiling that uses the
  labels RLIF does not have.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from ... import functional as F
from ...hytuning import (HyTuningConfig, HyTuningLoss, ProbeTrace, build_probes, majority_answers, prg_loss,
                        rollout_rewards)
from ...integrations.transformers import lm_head, probe_support
from . import task
from .evaluate import correctness, generate
from ..batching import make_batch


@dataclass(frozen=True)
class Arm:
    name: str
    rd_share: float  # share of each step's sequences that are curated traces
    reward: Optional[str]  # "self_certainty", "correct" or None (no rollouts)
    use_prg: bool = False  # HyTuningLoss with measured PRG; else prg = 1
    lam: Optional[float] = None  # a fixed λ (mixed arms without PRG)
    label: str = ""
    traces: str = "curated"  # the pool RD draws from: "curated" or "many" (Splits.many, 10×)
    prg_answer: str = "own"  # PRG's answer for a rollout: "own" or "majority" (its group's)


ARMS = {
    "rd": Arm("rd", 1.0, None, label="RD only"),
    "rd_many": Arm("rd_many", 1.0, None, traces="many", label="RD only, 10× the curated traces"),
    "rlif": Arm("rlif", 0.0, "self_certainty", label="RLIF only"),
    "mix": Arm("mix", 0.5, "self_certainty", lam=0.5, label="RD + RLIF 50/50, no PRG"),
    "hytuning": Arm("hytuning", 0.5, "self_certainty", use_prg=True, label="HyTuning"),
    "hytuning_majority": Arm("hytuning_majority", 0.5, "self_certainty", use_prg=True, prg_answer="majority",
                             label="HyTuning, PRG toward the group's majority answer"),
    "grpo_correct": Arm("grpo_correct", 0.0, "correct", label="GRPO, correctness reward (ceiling)"),
}


@dataclass
class TrainConfig:
    steps: int = 40
    sequences: int = 32  # sequences per step, in every arm
    group: int = 8  # rollouts per query
    lr: float = 1e-4  # the rate the warm-up ends at (ModelConfig): post-training goes on at it
    max_new: int = 40


def rollout_traces(tok: task.CharTokenizer, problems: list, responses: list, toward: list = None) -> list:
    """A ProbeTrace per rollout: its own reasoning (the text before the cue) and the answer whose
    support PRG measures: its own (after the cue), or ``toward[i]`` where given and not None.
    A rollout without an answer of its own has all its text as reasoning; with no answer to
    measure at all, its last token stands in as the answer so that every rollout has a PRG."""
    out = []
    for i, (p, r) in enumerate(zip(problems, responses)):
        text = tok.decode(r)
        reasoning, answer = task.parse_answer(text)
        prompt = tok.encode(p.prompt)
        target = toward[i] if toward is not None and toward[i] is not None else answer
        body = r[:-1] if r and r[-1] == tok.eos_token_id else r
        if target is None:
            out.append(ProbeTrace(prompt, body[:-1], body[-1:] or [tok.eos_token_id]))
        else:
            out.append(ProbeTrace(prompt, tok.encode(reasoning) if answer is not None else body, tok.encode(target)))
    return out


def measure_prg(model, tok: task.CharTokenizer, traces: list) -> torch.Tensor:
    """Progressive PRG of each trace from one packed forward pass of its probes."""
    batch = build_probes(traces, cue=tok.encode(task.CUE), delimiters=[tok.encode(task.STEP_SEPARATOR)],
                         pad_id=tok.pad_token_id)
    with torch.no_grad():
        support = probe_support(model, batch)
    return F.prg_gains(support, batch.probe_offsets).scores


class ArmTrainer:
    """One arm's post-training: ``step()`` draws its batch, scores it and takes one optimiser
    step; returns what it logged."""

    def __init__(self, arm: Arm, model, tok: task.CharTokenizer, splits: task.Splits, config: TrainConfig,
                 seed: int):
        self.arm, self.model, self.tok, self.splits, self.config = arm, model, tok, splits, config
        self.rng = random.Random(seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        self.objective = HyTuningLoss(**lm_head(model).kwargs())

    def _draw(self):
        c = self.config
        n_rd = round(c.sequences * self.arm.rd_share)
        n_queries = (c.sequences - n_rd) // c.group
        pool = self.splits.many if self.arm.traces == "many" else self.splits.curated
        curated = [self.rng.choice(pool) for _ in range(n_rd)]
        queries = self.rng.sample(self.splits.queries, n_queries)
        return curated, queries

    def step(self) -> dict:
        tok, model, c = self.tok, self.model, self.config
        curated, queries = self._draw()
        model.eval()
        responses = generate(model, tok, queries, sample=True, max_new=c.max_new, num_return_sequences=c.group) \
            if queries else []
        rolled = [q for q in queries for _ in range(c.group)]
        prompts = [tok.encode(p.prompt) for p in curated + rolled]
        gold = [tok.encode(p.completion) + [tok.eos_token_id] for p in curated]
        batch = make_batch(prompts, gold + responses, tok.pad_token_id)
        n_rd, n = len(curated), len(prompts)
        is_rd = torch.arange(n) < n_rd
        groups = torch.tensor([-1] * n_rd + [g for g in range(len(queries)) for _ in range(c.group)])
        correct = correctness(tok, rolled, responses).float()
        signal = None
        if self.arm.use_prg:  # PRG toward each rollout's own answer and toward its group's majority, one pass
            answers = [task.parse_answer(tok.decode(r))[1] for r in responses]
            traces = [ProbeTrace(tok.encode(p.prompt), tok.encode(p.reasoning), tok.encode(p.answer))
                      for p in curated]
            traces += rollout_traces(tok, rolled, responses)
            traces += rollout_traces(tok, rolled, responses, majority_answers(answers, c.group))
            scores = measure_prg(model, tok, traces)
            own, majority = scores[n_rd:n], scores[n:]
            prg = torch.cat([scores[:n_rd], majority if self.arm.prg_answer == "majority" else own])
            signal = dict(prg_traces=scores[:n_rd], prg_own=own, prg_majority=majority, correct=correct,
                          answered=torch.tensor([a is not None for a in answers]))
        else:
            prg = torch.ones(n)

        model.train()
        hidden = batch.hidden(model)
        head = lm_head(model)
        flat = hidden.reshape(-1, hidden.shape[-1])
        rewards = torch.zeros(n)
        if self.arm.reward == "self_certainty":  # the current policy's self-certainty, no labels
            rl_ids = torch.where(batch.seq_ids >= n_rd, batch.seq_ids - n_rd, -1).reshape(-1)
            rewards[n_rd:] = rollout_rewards(flat.detach(), head.weight, batch.targets.reshape(-1), rl_ids, n - n_rd,
                                             **head.kwargs())
        elif self.arm.reward == "correct":
            rewards[n_rd:] = correct
        args = (flat, head.weight, batch.targets.reshape(-1), batch.seq_ids.reshape(-1))
        kwargs = dict(prg=prg, is_rd=is_rd, rewards=rewards, group_ids=groups)
        if self.arm.use_prg:
            loss, out = self.objective(*args, **kwargs)
        else:  # no PRG: nothing gated, every RD trace weighs the same, λ fixed (or one kind only)
            loss, out = prg_loss(*args, **kwargs, lam=self.arm.lam, config=HyTuningConfig(gate_rewards=False),
                                 **head.kwargs())
        if signal is not None:
            signal["self_certainty"] = rewards[n_rd:]
            signal = {k: [round(float(x), 5) for x in v] for k, v in signal.items()}
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        model.eval()
        rl = slice(n_rd, n)
        rd_tokens = is_rd[batch.seq_ids.clamp(min=0).reshape(-1)] & (batch.seq_ids.reshape(-1) >= 0)
        rd_nll = float(-out.stats.logp.reshape(-1)[rd_tokens].mean()) if n_rd else None
        return dict(loss=loss.item(), rd_nll=rd_nll, lam=out.lam, tokens=int((batch.targets != -100).sum()),
                    rollout_accuracy=float(correct.mean()) if len(responses) else None,
                    reward=float(rewards[rl].mean()) if len(responses) else None,
                    prg_rd=float(prg[:n_rd].mean()) if self.arm.use_prg and n_rd else None,
                    prg_rollouts=float(prg[rl].mean()) if self.arm.use_prg and len(responses) else None,
                    signal=signal)


