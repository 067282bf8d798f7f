"""transformers CausalLMs: last hidden states and the lm_head, so hykernels never needs logits.

Works for any model whose logits are ``lm_head(hidden)`` up to the scalings HF models apply:
Gemma-2/3's final logit softcap, and a multiplier α on the lm_head's output (as TRL reads them):
Cohere's ``logit_scale``, Muse Glimmer's ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``,
Granite's and MiniCPM3's ``logits_scaling`` (a divisor; HyperCLOVA X's multiplies). Tied embeddings
need nothing special: the output embedding *is* the input embedding's weight.

hykernels forms z = s(hidden·Wᵀ + b)/temperature (docs/math.md §1): the model's softcap first,
then the temperature, as TRL, verl and vLLM divide the model's (already softcapped) logits by
their sampling temperature. So a sampler's temperature T multiplies into ``LMHead.temperature``
(``dict(head.kwargs(), temperature=head.temperature * T)``), softcap or not. The model's α comes
before its softcap c: c·tanh(α·x/c) = α·s(x) with the softcap c/α, so ``lm_head`` returns
softcap c/α and temperature 1/α.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import functional as F
from ..hytuning.probes import ProbeBatch


@dataclass
class LMHead:
    """What ``fused_loss``/``token_stats`` need besides the hidden states.

    Attributes:
        weight: [V, D] the output embedding's weight (the input embedding's, when tied).
        bias: [V] its bias, or None.
        softcap: The softcap that reproduces the model's logits (its final-logit softcap
            divided by its logit multiplier), or None.
        temperature: 1/α for the model's logit multiplier α (1.0 for most models).
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    temperature: float = 1.0

    def kwargs(self) -> dict:
        """bias, softcap and temperature as keyword arguments for the hykernels ops."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature)


def lm_head(model) -> LMHead:
    """The lm_head of a transformers CausalLM and the options that reproduce its logits.

    Reads the output embedding, the config's
    ``final_logit_softcapping`` and the logit multipliers of Cohere, Granite, MiniCPM3,
    Falcon-H1 and others (docs/math.md §1). Multiply a sampler's temperature T into
    ``temperature``: ``dict(head.kwargs(), temperature=head.temperature * T)``.

    Args:
        model: A transformers PreTrainedModel with a linear output embedding.

    Returns:
        LMHead(weight, bias, softcap, temperature).

    Raises:
        TypeError: The model has no linear output embedding.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model: {type(model).__name__} has no linear output embedding (lm_head)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    temperature = _model_temperature(config)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    if softcap is not None:  # the model scales before it softcaps: c·tanh(α·x/c) = α·s_{c/α}(x), α = 1/temperature
        softcap = float(softcap) * temperature
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None), softcap=softcap, temperature=temperature)


def _model_temperature(config) -> float:
    """1/α for the multiplier α the model applies to the lm_head's output (TRL's add_fused_lm_head reading)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):  # Cohere, Muse Glimmer, Falcon-H1
        if getattr(config, name, None) is not None:
            return 1.0 / float(getattr(config, name))
    if getattr(config, "logits_scaling", None) is not None:  # Granite, MiniCPM3: a divisor; HyperCLOVA X: a multiplier
        scaling = float(config.logits_scaling)
        return 1.0 / scaling if getattr(config, "model_type", None) == "hyperclovax" else scaling
    return 1.0


def _unwrapped(model):
    """The transformers model inside a peft ``PeftModel`` (its LoRA layers in place), else ``model``.
    A PeftModel forwards attribute reads to it, but ``getattr(peft_model, "model")`` is the whole
    CausalLM, not its base model."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def last_hidden_states(model, input_ids, *, position_ids=None, attention_mask=None) -> torch.Tensor:
    """[B, T, D] final hidden states (after the final norm), without forming logits.

    Padding-free (packed) batches: sequences concatenated in a row, ``position_ids`` restarting at
    0 for each and ``attention_mask=None``, as transformers' DataCollatorWithFlattening makes them;
    the model's attention then keeps each sequence to itself (flash-attention's variable-length
    kernels; sdpa/eager/flex get a block-diagonal causal mask from the position ids)."""
    model = _unwrapped(model)
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise TypeError(f"model: {type(model).__name__} has no base model at .{model.base_model_prefix}")
    out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def hidden_states_and_aux_loss(model, input_ids, *, attention_mask=None) -> tuple:
    """([B, T, D] final hidden states, the model's MoE router auxiliary loss), without forming
    logits over the sequence: the CausalLM's own forward with ``output_router_logits=True`` and
    ``logits_to_keep=1`` (its lm_head sees one position per row), so the auxiliary loss is the
    one the model computes for its ``loss``; the hidden states are its trunk's output, taken by
    a forward hook. Call it inside ``call_through`` when the model is wrapped."""
    model = _unwrapped(model)
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise TypeError(f"model: {type(model).__name__} has no base model at .{model.base_model_prefix}")
    seen = []
    hook = base.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        out = model.forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_router_logits=True, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[-1], out.aux_loss


def call_through(wrapper, module, fn: Callable):
    """``fn()`` run as the forward of ``wrapper`` (a DDP, FSDP or DeepSpeed wrapper around
    ``module``, or ``module`` itself); returns what ``fn`` returns.

    Data-parallel wrappers act in their forward: DDP readies its gradient all-reduce there (a
    loss computed from the inner module's trunk, around the wrapper, trains every replica on its
    own data alone), and FSDP2 gathers the root's parameters (the full lm_head weight exists only
    inside the root's forward). So the whole loss, trunk and lm_head, runs inside one call of
    the wrapper: ``module.forward`` is replaced by ``fn`` for that call (TRL's and Lightning's
    "forward redirection"), then restored. ``fn`` calls the model's parts (its trunk) itself.
    """
    saved = module.__dict__.get("forward")  # accelerate may have set an instance forward (autocast)

    def forward(*args, **kwargs):
        restore()  # fn may call the model's own forward
        return fn()

    def restore():
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved

    module.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def probe_attention_mask(model, batch: ProbeBatch):
    """The probe mask in the form the model's attention implementation takes: a FlexAttention
    BlockMask for "flex_attention", else the dense additive mask in the model's dtype."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl == "flex_attention":
        return batch.block_mask()
    dtype = model.dtype
    return torch.where(batch.attention_mask == 0, 0.0, torch.finfo(dtype).min).to(dtype)


def probe_support(model, batch: ProbeBatch, *, reduce: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Support c_k of every probe (docs/math.md §3) from ONE forward pass of the packed batch.

    The model runs once on ``batch`` (its position ids and probe attention mask: a FlexAttention
    block mask with ``attn_implementation="flex_attention"``, the dense mask otherwise) and the
    lm_head only on the answer rows. Differentiable if grad is enabled.

    Args:
        model: A transformers CausalLM (or a peft model around one).
        batch: The packed probes (hykernels.hytuning.build_probes).
        reduce: "mean" (default) or "sum" over each probe's answer tokens.
        backend: The hykernels backend for the lm_head on the answer rows.

    Returns:
        [batch.num_spans] supports, trace by trace (offsets: batch.probe_offsets), fp32.
    """
    hidden = last_hidden_states(model, batch.input_ids, position_ids=batch.position_ids,
                                attention_mask=probe_attention_mask(model, batch))
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.rows]
    head = lm_head(model)
    return F.answer_span_logprobs(rows, head.weight, batch.targets, batch.span_ids, batch.num_spans,
                                  reduce=reduce, backend=backend, **head.kwargs())
