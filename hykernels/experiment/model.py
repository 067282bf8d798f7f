"""The base model of the ablation: a tiny Llama, trained to partial competence by a short
supervised warm-up, and the batch layout every loss of the experiment uses.

Every sequence is a prompt followed by a response; sequences are right-padded and all start at
position 0, so one [B, T] batch with an attention mask serves training, rewards and scoring.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import torch

from .. import fused_loss
from ..integrations.transformers import last_hidden_states, lm_head
from . import task


@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    warmup_steps: int = 400
    warmup_batch: int = 32
    warmup_lr: float = 2e-3
    # "cosine": 20 steps of linear ramp, then the rate decays along a half cosine to warmup_floor ·
    # warmup_lr (1e-4, the post-training rate), so the warm-up ends settled and post-training goes
    # on at the rate it ended at; "constant" (the first version) ends at the full 2e-3, where every
    # step still moves accuracy by points and where it stops is chaotic (docs/experiment.md)
    warmup_schedule: str = "cosine"
    warmup_floor: float = 0.05


def tiny_model(tok: task.CharTokenizer, config: ModelConfig, seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=config.hidden, intermediate_size=2 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


@dataclass
class Batch:
    """Right-padded sequences: ids, attention mask [B, T]; next-token targets [B, T] on response
    tokens only (−100 elsewhere, the last position included); seq_ids [B, T], the row for tokens
    with a target, −1 for the others."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor

    def hidden(self, model) -> torch.Tensor:
        return last_hidden_states(model, self.ids, attention_mask=self.mask)


def make_batch(prompts: list, responses: list, pad: int) -> Batch:
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    pos = torch.arange(width)
    lengths = torch.tensor([len(s) for s in seqs])
    starts = torch.tensor([len(p) for p in prompts])
    mask = (pos[None] < lengths[:, None]).long()
    # position t predicts token t+1, a response token when starts <= t+1 < length
    learn = (pos[None] + 1 >= starts[:, None]) & (pos[None] + 1 < lengths[:, None])
    targets = torch.where(learn, ids.roll(-1, 1), -100)
    seq_ids = torch.where(learn, torch.arange(len(seqs))[:, None], -1)
    return Batch(ids, mask, targets, seq_ids)


def gold_batch(tok: task.CharTokenizer, problems: list) -> Batch:
    """Prompt + gold trace + answer + end of sequence, the target on every response token."""
    return make_batch([tok.encode(p.prompt) for p in problems],
                      [tok.encode(p.completion) + [tok.eos_token_id] for p in problems], tok.pad_token_id)


def cross_entropy(model, batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over the batch's targets, through hykernels' fused loss."""
    hidden = batch.hidden(model)
    head = lm_head(model)
    count = int((batch.targets != -100).sum())
    loss, _ = fused_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, batch.targets.reshape(-1),
                         rd_weight=1.0 / count, **head.kwargs())
    return loss


def warm_up(model, tok: task.CharTokenizer, splits: task.Splits, config: ModelConfig, seed: int) -> list:
    """Supervised warm-up on fresh problems outside every split; returns the losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, weight_decay=0.0)
    if config.warmup_schedule not in ("cosine", "constant"):
        raise ValueError(f"warmup_schedule: expected 'cosine' or 'constant', got {config.warmup_schedule!r}")
    steps = config.warmup_steps

    def rate(s: int) -> float:
        ramp = min(1.0, (s + 1) / 20)
        if config.warmup_schedule == "constant":
            return ramp
        return ramp * (config.warmup_floor + (1 - config.warmup_floor) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    held = splits.held()
    losses = []
    model.train()
    for _ in range(config.warmup_steps):
        loss = cross_entropy(model, gold_batch(tok, task.sample(rng, config.warmup_batch, held)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
