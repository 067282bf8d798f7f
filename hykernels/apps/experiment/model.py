"""The base model of the ablation: a tiny Llama, trained to partial competence by a short
supervised warm-up. Every loss of the experiment uses the applications' batch layout
(hykernels/apps/batching.py)."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import torch

from ... import fused_loss
from ...integrations.transformers import lm_head
from ..batching import Batch, make_batch
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
