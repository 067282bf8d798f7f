"""The public ops as torch.library custom ops (namespace "hykernels"), so torch.compile traces them.

A custom op is opaque to the tracer: torch.compile sees its schema and a fake (shape-only)
implementation, and the real one runs at run time, eagerly. Everything that needs host values
therefore happens in here: the value checks (target range, finiteness: a device→host sync each),
the backend call and its Python-side choices (chunk sizes, fp16 scaling, whole-row or recompute
paths). The functional layer validates shapes and dtypes, which tracing sees as metadata only.

Arguments are flattened into the schema in one place: a dataclass (LogitOptions, BackendSpec,
LossTerms, HyTuningConfig) becomes its fields in order (``_schema``), and ``_build`` makes it
again inside the op. The backend travels as its resolved name (BackendSpec), never as a Python
object; a vocabulary-parallel call as its process group's name and this rank's offset.

Ops: token_stats and token_stats_backward (§2), fused_loss (returns the gradients formed in its
forward pass; its backward only scales them), per_token_loss (reduction="none"), segment_sum
(answer spans); hytuning/objective.py adds prg_token_weights (prg_loss's per-token weights).
Custom ops return no None: a gradient not asked for is an empty tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from . import backends
from ._checks import check_logit_values, check_term_values, target_mask
from ._distributed import VocabParallel, VocabShard
from ._grad import loss_by_recompute, loss_coefficients, stats_coefficients
from ._partials import Partials, finish
from ._types import LogitOptions, LossTerms, RowCoefs
from .backends._dense import stat_dtype


@dataclass(frozen=True)
class BackendSpec:
    """Where an op runs: a resolved backend name (backends.resolve(...).NAME); ``vocab`` is the
    vocabulary the targets index (the whole one under vocabulary parallelism, where ``group``
    names the process group and ``offset`` is this rank's first vocabulary entry)."""

    name: str
    vocab: int
    group: Optional[str] = None
    offset: int = 0


_SCHEMA_TYPES = {"Optional[torch.Tensor]": "Tensor?", "float": "float", "Optional[float]": "float?", "int": "int",
                 "Optional[int]": "int?", "bool": "bool", "str": "str", "Optional[str]": "str?", "tuple": "float[]"}


def schema_of(cls) -> str:
    """A dataclass's fields as schema arguments, in field order."""
    return ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in fields(cls))


def flat(obj) -> tuple:
    """A dataclass's field values in field order: the op arguments ``_schema`` declares."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


def build(cls, values):
    """The dataclass back from its flattened fields (a float[] comes back as a list)."""
    return cls(*(tuple(v) if isinstance(v, list) else v for v in values))


_NO, _NS, _NT = len(fields(LogitOptions)), len(fields(BackendSpec)), len(fields(LossTerms))
_LOGITS = f"Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, {schema_of(LogitOptions)}, {schema_of(BackendSpec)}"
_STATS = "Tensor logp, Tensor entropy, Tensor self_certainty, Tensor confidence, Tensor argmax, Tensor lse"
_GRADS = "Tensor d_hidden, Tensor d_weight, Tensor d_bias"


def _call(args) -> tuple[LogitOptions, BackendSpec, tuple]:
    """(LogitOptions, BackendSpec, the remaining arguments) from the arguments after the tensors."""
    return build(LogitOptions, args[:_NO]), build(BackendSpec, args[_NO:_NO + _NS]), args[_NO + _NS:]


# --- the backend, as the real implementations see it ----------------------------------------


class _NoRows:
    """The backend interface for a call with no rows (N = 0): empty statistics and zero gradients,
    without calling the chosen backend (``impl``, which still answers segment and PRG ops). Under
    VocabParallel its empty partials go through the same collectives as any other call's."""

    def __init__(self, impl):
        self.impl = impl

    def __getattr__(self, name):  # NAME, DTYPES, prg_scores
        return getattr(self.impl, name)

    def token_partials(self, hidden, weight, bias, targets, opts: LogitOptions) -> Partials:
        empty = torch.zeros(1, 0, dtype=stat_dtype(hidden.dtype), device=hidden.device)
        return Partials(empty, empty, empty, empty, empty, empty.long(), empty.new_full((1, 1), weight.shape[0]))

    def token_stats(self, hidden, weight, bias, targets, opts: LogitOptions):
        valid, _ = target_mask(targets, weight.shape[0], opts.ignore_index)
        return finish(self.token_partials(hidden, weight, bias, targets, opts), valid, stat_dtype(hidden.dtype))

    def token_stats_backward(self, hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
        return tuple(torch.zeros_like(x) if x is not None and need else None
                     for x, need in zip((hidden, weight, bias), needs))

    def fused_loss(self, hidden, weight, bias, targets, opts, terms: LossTerms, needs):
        return loss_by_recompute(self.token_stats, self.token_stats_backward, hidden, weight, bias, targets, opts,
                                 terms, needs, weight.shape[0])

    def segment_sum(self, values, segment_ids, num_segments):
        return values.new_zeros(num_segments)


class _AutocastOff:
    """A backend whose calls, in forward and in backward, run with autocast off, as
    torch.amp.custom_fwd runs a forward: its inputs are already in the autocast dtype
    (functional._autocast_inputs), and its own fp32 upcasts and GEMMs must run as written, also
    when backward() is called inside an autocast region."""

    def __init__(self, impl, device_type: str):
        self.impl, self.device_type = impl, device_type

    def __getattr__(self, name):
        attr = getattr(self.impl, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with torch.autocast(self.device_type, enabled=False):
                return attr(*args, **kwargs)

        return call


class _ByRecompute:
    """A backend's fused_loss as a statistics pass over every row, the coefficients, then the §2
    backward recomputing the logits (_grad.loss_by_recompute, 8·N·D·V FLOPs): for sequence-level
    terms, whose coefficients need the log-probs of the whole batch."""

    def __init__(self, impl, vocab: int):
        self.impl, self.vocab = impl, vocab

    def fused_loss(self, hidden, weight, bias, targets, opts, terms: LossTerms, needs):
        return loss_by_recompute(self.impl.token_stats, self.impl.token_stats_backward, hidden, weight, bias, targets,
                                 opts, terms, needs, self.vocab)


def _backend(spec: BackendSpec, rows: int, weight: Optional[torch.Tensor], device: torch.device):
    """The backend interface for ``spec``: the module, _NoRows without rows, VocabParallel over the
    named group, with autocast off."""
    impl = backends._load(spec.name)
    if rows == 0:
        impl = _NoRows(impl)
    if spec.group is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        shard = VocabShard(_resolve_process_group(spec.group), spec.offset, weight.shape[0], spec.vocab)
        impl = VocabParallel(impl, shard)
    if torch.amp.is_autocast_available(device.type):
        impl = _AutocastOff(impl, device.type)
    return impl


def _logit_backend(hidden, weight, spec: BackendSpec):
    return _backend(spec, hidden.shape[0], weight, hidden.device)


def distinct(outputs) -> tuple:
    """A custom op's outputs may not be the same tensor twice (RowCoefs starts from one zero)."""
    seen, out = set(), []
    for t in outputs:
        out.append(t.clone() if id(t) in seen else t)
        seen.add(id(t))
    return tuple(out)


def _grads_out(grads, hidden, weight, bias) -> tuple:
    """(dH, dW, db) with an empty tensor for each gradient not formed."""
    like = (hidden, weight, hidden if bias is None else bias)
    return tuple(x.new_empty(0) if g is None else g for g, x in zip(grads, like))


def _fake_grads(hidden, weight, bias, needs) -> tuple:
    return tuple(torch.empty_like(x) if x is not None and need else (hidden if x is None else x).new_empty(0)
                 for x, need in zip((hidden, weight, bias), needs))


def _fake_stats(hidden) -> tuple:
    """logp, entropy, self_certainty, confidence, argmax, lse: [N] (argmax int64)."""
    n, dtype = hidden.shape[0], stat_dtype(hidden.dtype)
    floats = [hidden.new_empty(n, dtype=dtype) for _ in range(5)]
    return (*floats[:4], hidden.new_empty(n, dtype=torch.int64), floats[4])


# --- token_stats (§2) -------------------------------------------------------------------------


@torch.library.custom_op("hykernels::token_stats_backward", mutates_args=(),
                         schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
                                f"Tensor lse_lo, Tensor A, Tensor B, Tensor C, Tensor D, {schema_of(LogitOptions)}, "
                                f"{schema_of(BackendSpec)}, bool[] needs) -> ({_GRADS})")
def token_stats_backward(hidden, weight, bias, targets, lse, lse_lo, A, B, C, D, *args):
    opts, spec, (needs,) = _call(args)
    impl = _logit_backend(hidden, weight, spec)
    grads = impl.token_stats_backward(hidden, weight, bias, targets, opts, lse, lse_lo, RowCoefs(A, B, C, D),
                                      tuple(needs))
    return _grads_out(grads, hidden, weight, bias)


@token_stats_backward.register_fake
def _(hidden, weight, bias, targets, lse, lse_lo, A, B, C, D, *args):
    return _fake_grads(hidden, weight, bias, args[-1])


def _stats_backward(ctx, coefs: RowCoefs, needs) -> tuple:
    """(dH, dW, db) of §2 from the saved inputs and the coefficients, None where not needed."""
    hidden, weight, bias, targets, lse, lse_lo = ctx.saved_tensors[:6]
    grads = token_stats_backward(hidden, weight, bias, targets, lse, lse_lo, *coefs, *ctx.call, list(needs))
    return tuple(g if need else None for g, need in zip(grads, needs))


@torch.library.custom_op("hykernels::token_stats", mutates_args=(),
                         schema=f"({_LOGITS}) -> ({_STATS}, Tensor lse_lo)")
def token_stats(hidden, weight, bias, targets, *args):
    opts, spec, _ = _call(args)
    check_logit_values(hidden, weight, bias, targets, spec.vocab, opts.ignore_index)
    stats, lse_lo = _logit_backend(hidden, weight, spec).token_stats(hidden, weight, bias, targets, opts)
    return distinct((*stats, lse_lo))


@token_stats.register_fake
def _(hidden, weight, bias, targets, *args):
    return (*_fake_stats(hidden), hidden.new_empty(hidden.shape[0], dtype=stat_dtype(hidden.dtype)))


def _token_stats_setup(ctx, inputs, output):
    hidden, weight, bias, targets, *call = inputs
    _logp, entropy, _sc, confidence, argmax, lse, lse_lo = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, lse_lo, entropy)
    ctx.call = call
    ctx.mark_non_differentiable(confidence, argmax, lse_lo)
    ctx.set_materialize_grads(False)


def _token_stats_grad(ctx, g_logp, g_entropy, g_sc, _g_conf, _g_argmax, g_lse, _g_lse_lo):
    nothing = (None,) * (4 + len(ctx.call))
    needs = ctx.needs_input_grad[:3]
    if not any(needs) or all(g is None for g in (g_logp, g_entropy, g_sc, g_lse)):
        return nothing
    opts, spec, _ = _call(ctx.call)
    entropy = ctx.saved_tensors[6]
    valid, _ = target_mask(ctx.saved_tensors[3], spec.vocab, opts.ignore_index)
    coefs = stats_coefficients(g_logp, g_lse, g_entropy, g_sc, entropy, valid, spec.vocab)
    return (*_stats_backward(ctx, coefs, needs), *nothing[3:])


token_stats.register_autograd(_token_stats_grad, setup_context=_token_stats_setup)


# --- fused_loss (§5) ----------------------------------------------------------------------------


@torch.library.custom_op("hykernels::fused_loss", mutates_args=(),
                         schema=f"({_LOGITS}, {schema_of(LossTerms)}, bool[] needs) -> (Tensor loss, {_STATS}, {_GRADS})")
def fused_loss(hidden, weight, bias, targets, *args):
    """The loss, the statistics and the gradients (dH, dW, db) for ``needs``, all in forward."""
    opts, spec, rest = _call(args)
    terms, needs = build(LossTerms, rest[:_NT]), tuple(rest[_NT])
    check_logit_values(hidden, weight, bias, targets, spec.vocab, opts.ignore_index)
    check_term_values(terms)
    impl = _logit_backend(hidden, weight, spec)
    if terms.sequence_level:
        impl = _ByRecompute(impl, spec.vocab)
    loss, stats, *grads = impl.fused_loss(hidden, weight, bias, targets, opts, terms, needs)
    return distinct((loss, *stats, *_grads_out(grads, hidden, weight, bias)))


@fused_loss.register_fake
def _(hidden, weight, bias, targets, *args):
    loss = hidden.new_empty((), dtype=stat_dtype(hidden.dtype))
    return (loss, *_fake_stats(hidden), *_fake_grads(hidden, weight, bias, args[-1]))


def _fused_loss_setup(ctx, inputs, output):
    _loss, *stats, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.needs, ctx.num_inputs = inputs[-1], len(inputs)
    ctx.mark_non_differentiable(*stats, dh, dw, db)
    # No zero gradients for the outputs that got none: autograd would otherwise allocate and fill
    # one for every output, dW's size among them (1.2 GB bf16 at V=151936, D=4096), in backward.
    ctx.set_materialize_grads(False)


def _fused_loss_grad(ctx, g_loss, *_unused):
    # Gradients were formed in forward; the chain rule only scales them. The first backward
    # scales in place: a copy would add a dW-sized buffer (1.2 GB bf16 at V=151936, D=4096)
    # exactly when memory peaks. It writes through .data, which leaves the saved tensors'
    # version counters alone, so a later backward (retain_graph=True, gradcheck) can still
    # unpack them and rescales out of place from the factor already applied (NaN if that
    # factor was 0: nothing is left). saved_tensors are still freed after a plain backward.
    # Traced (torch.compile, AOTAutograd: fake tensors) the backward is a graph, where a write to
    # a forward output would be functionalised into the forward: it scales out of place there
    # (inductor may still reuse the buffer).
    if g_loss is None:  # the loss took no gradient (only other outputs were used)
        return (None,) * ctx.num_inputs
    grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    if torch.compiler.is_compiling() or is_fake(g_loss):
        scaled = [None if g is None else g * g_loss.to(g.dtype) for g in grads]
    elif getattr(ctx, "applied", None) is None:
        ctx.applied = g_loss.detach().clone()
        scaled = [None if g is None else g.data.mul_(g_loss.to(g.dtype)) for g in grads]
    else:
        factor = g_loss / ctx.applied
        scaled = [None if g is None else g * factor.to(g.dtype) for g in grads]
    return (*scaled, *(None,) * (ctx.num_inputs - 3))


fused_loss.register_autograd(_fused_loss_grad, setup_context=_fused_loss_setup)


@torch.library.custom_op("hykernels::per_token_loss", mutates_args=(),
                         schema=f"({_LOGITS}, {schema_of(LossTerms)}) -> "
                                f"(Tensor loss, {_STATS}, Tensor lse_lo, Tensor A, Tensor B, Tensor C, Tensor D)")
def per_token_loss(hidden, weight, bias, targets, *args):
    """reduction="none": the per-token §5 losses and their coefficients. The coefficients are
    linear in the upstream gradient, so the backward scales each row's by its upstream value and
    recomputes the logits through the §2 backward (token_stats + token_stats_backward: 8·N·D·V)."""
    opts, spec, rest = _call(args)
    terms = build(LossTerms, rest)
    check_logit_values(hidden, weight, bias, targets, spec.vocab, opts.ignore_index)
    check_term_values(terms)
    stats, lse_lo = _logit_backend(hidden, weight, spec).token_stats(hidden, weight, bias, targets, opts)
    valid, _ = target_mask(targets, spec.vocab, opts.ignore_index)
    loss, coefs = loss_coefficients(stats, valid, terms)
    return distinct((loss, *stats, lse_lo, *coefs))


@per_token_loss.register_fake
def _(hidden, weight, bias, targets, *args):
    n, dtype = hidden.shape[0], stat_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=dtype), *_fake_stats(hidden), *(hidden.new_empty(n, dtype=dtype)
                                                                       for _ in range(5)))


def _per_token_setup(ctx, inputs, output):
    hidden, weight, bias, targets, *call = inputs
    _loss, *stats, lse_lo, A, B, C, D = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats[5], lse_lo, A, B, C, D)
    ctx.call = call[:_NO + _NS]
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*stats, lse_lo, A, B, C, D)
    ctx.set_materialize_grads(False)


def _per_token_grad(ctx, g_loss, *_unused):
    nothing = (None,) * ctx.num_inputs
    needs = ctx.needs_input_grad[:3]
    if g_loss is None or not any(needs):
        return nothing
    lse, coefs = ctx.saved_tensors[4], ctx.saved_tensors[6:]
    g = g_loss.to(lse.dtype)
    return (*_stats_backward(ctx, RowCoefs(*(c * g for c in coefs)), needs), *nothing[3:])


per_token_loss.register_autograd(_per_token_grad, setup_context=_per_token_setup)


# --- answer spans (§3) ---------------------------------------------------------------------------


@torch.library.custom_op("hykernels::segment_sum", mutates_args=(),
                         schema="(Tensor values, Tensor segment_ids, int num_segments, str backend) -> Tensor")
def segment_sum(values, segment_ids, num_segments, backend):
    impl = _backend(BackendSpec(backend, 0), values.shape[0], None, values.device)
    return impl.segment_sum(values, segment_ids, num_segments)


@segment_sum.register_fake
def _(values, segment_ids, num_segments, backend):
    return values.new_empty(num_segments, dtype=stat_dtype(values.dtype))


def _segment_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _segment_sum_grad(ctx, g_out):
    (segment_ids,) = ctx.saved_tensors
    return g_out[segment_ids], None, None, None  # each row gets its segment's gradient


segment_sum.register_autograd(_segment_sum_grad, setup_context=_segment_sum_setup)
