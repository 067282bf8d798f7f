"""The arms of the ablation and one post-training step of each, every loss through `prg_loss`.

All arms start from the same warm-up model and use the same optimiser, learning rate, number of
steps and number of sequences per step (``sequences``). What differs is what those sequences are
and how they are weighed:

- ``rd``: cross-entropy on curated traces only (prg_loss with every sequence RD and PRG = 1, so
  every trace weighs the same: plain RD).
- ``rlif``: GRPO on the model's own rollouts of unlabelled queries, rewarded by self-certainty,
  no labels and no PRG.
- ``mix``: half curated traces, half rollouts, λ fixed at 0.5, PRG = 1 (no PRG weighting, no
  gating): RD + RLIF without PRG.
- ``hytuning``: the same half/half batch with `HyTuningLoss` defaults: PRG-weighted RD,
  PRG-gated self-certainty rewards, λ adapted to the PRG gap and smoothed across steps.
- ``grpo_correct``: GRPO on rollouts rewarded by the true correctness: a ceiling that uses the
  labels RLIF does not have.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from .. import functional as F
from ..hytuning import HyTuningConfig, HyTuningLoss, ProbeTrace, build_probes, prg_loss, rollout_rewards
from ..integrations.transformers import lm_head, probe_support
from . import task
from .evaluate import correctness, generate
from .model import make_batch


@dataclass(frozen=True)
class Arm:
    name: str
    rd_share: float  # share of each step's sequences that are curated traces
    reward: Optional[str]  # "self_certainty", "correct" or None (no rollouts)
    use_prg: bool = False  # HyTuningLoss with measured PRG; else prg = 1
    lam: Optional[float] = None  # a fixed λ (mixed arms without PRG)
    label: str = ""


ARMS = {
    "rd": Arm("rd", 1.0, None, label="RD only"),
    "rlif": Arm("rlif", 0.0, "self_certainty", label="RLIF only"),
    "mix": Arm("mix", 0.5, "self_certainty", lam=0.5, label="RD + RLIF 50/50, no PRG"),
    "hytuning": Arm("hytuning", 0.5, "self_certainty", use_prg=True, label="HyTuning"),
    "grpo_correct": Arm("grpo_correct", 0.0, "correct", label="GRPO, correctness reward (ceiling)"),
}


@dataclass
class TrainConfig:
    steps: int = 40
    sequences: int = 32  # sequences per step, in every arm
    group: int = 8  # rollouts per query
    lr: float = 1e-4
    max_new: int = 40


def rollout_traces(tok: task.CharTokenizer, problems: list, responses: list) -> list:
    """A ProbeTrace per rollout: its own reasoning and its own answer (after the cue; without a
    cue, the last token stands in as the answer so that every rollout has a PRG)."""
    out = []
    for p, r in zip(problems, responses):
        text = tok.decode(r)
        reasoning, answer = task.parse_answer(text)
        prompt = tok.encode(p.prompt)
        if answer is None:
            body = r[:-1] if r and r[-1] == tok.eos_token_id else r
            out.append(ProbeTrace(prompt, body[:-1], body[-1:] or [tok.eos_token_id]))
        else:
            out.append(ProbeTrace(prompt, tok.encode(reasoning), tok.encode(answer)))
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
        curated = [self.rng.choice(self.splits.curated) for _ in range(n_rd)]
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
        if self.arm.use_prg:
            traces = [ProbeTrace(tok.encode(p.prompt), tok.encode(p.reasoning), tok.encode(p.answer))
                      for p in curated] + rollout_traces(tok, rolled, responses)
            prg = measure_prg(model, tok, traces)
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
                    prg_rollouts=float(prg[rl].mean()) if self.arm.use_prg and len(responses) else None)


