"""transformers CausalLMs: last hidden states and the lm_head, so hykernels never needs logits.

Works for any model whose logits are ``lm_head(hidden)`` up to the scalings HF models apply:
Gemma-2/3's final logit softcap, Granite's ``logits_scaling`` (a divisor: our temperature) and
Cohere's ``logit_scale`` (a multiplier: 1/temperature). Tied embeddings need nothing special:
the output embedding *is* the input embedding's weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import functional as F
from ..hytuning.probes import ProbeBatch


@dataclass
class LMHead:
    """What ``fused_loss``/``token_stats`` need besides the hidden states."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    temperature: float = 1.0

    def kwargs(self) -> dict:
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature)


def lm_head(model) -> LMHead:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model: {type(model).__name__} has no linear output embedding (lm_head)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    temperature = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        temperature = float(config.logits_scaling)
    if getattr(config, "logit_scale", None):  # Cohere: logits * logit_scale
        temperature = 1.0 / float(config.logit_scale)
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None),
                  softcap=getattr(config, "final_logit_softcapping", None) or None, temperature=temperature)


def last_hidden_states(model, input_ids, *, position_ids=None, attention_mask=None) -> torch.Tensor:
    """[B, T, D] final hidden states (after the final norm), without forming logits."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise TypeError(f"model: {type(model).__name__} has no base model at .{model.base_model_prefix}")
    out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def probe_attention_mask(model, batch: ProbeBatch):
    """The probe mask in the form the model's attention implementation takes."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl == "flex_attention":
        return batch.block_mask()
    dtype = model.dtype
    return torch.where(batch.attention_mask == 0, 0.0, torch.finfo(dtype).min).to(dtype)


def probe_support(model, batch: ProbeBatch, *, reduce: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Support c_k of every probe (hytuning.md §3) from ONE forward pass of the packed batch:
    the model runs once, the lm_head only on answer rows. Differentiable if grad is enabled."""
    hidden = last_hidden_states(model, batch.input_ids, position_ids=batch.position_ids,
                                attention_mask=probe_attention_mask(model, batch))
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.rows]
    head = lm_head(model)
    return F.answer_span_logprobs(rows, head.weight, batch.targets, batch.span_ids, batch.num_spans,
                                  reduce=reduce, backend=backend, **head.kwargs())
