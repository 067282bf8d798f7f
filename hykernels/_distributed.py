"""Vocabulary-parallel lm_heads: every op on a weight sharded over the vocabulary across ranks.

Each rank of a torch.distributed group holds rows [offset, offset + V_r) of the lm_head weight
(and bias) and the same hidden states and targets (tensor parallelism, as Megatron's
column-parallel lm_head). ``VocabParallel`` wraps a backend behind the same interface:

- forward: the backend streams only the local slice and returns online-softmax partials
  (hykernels/_partials.py); three all-reduces of O(N) data (max, the four sums, argmax) give
  every rank the full-vocabulary statistics. Logits never leave a rank.
- backward: §2 on the local slice with the global lse and coefficients (the target term only on
  the rank that holds the target); dH is summed across the group, dW and db stay local.
- fused_loss: statistics, the §5 coefficients, then the backward pass, all in forward. A row's
  gradient needs its global lse, known only after the all-reduce, so the local logits are
  recomputed: 8·N·D·V/P FLOPs per rank instead of 6, with no N×V workspace held.

Every rank must make the same call (same hidden, targets, options); with value checks on
(the default) a fingerprint all-reduce verifies that hidden and targets agree, which also
catches an FSDP2-sharded weight passed where a tensor-parallel one was meant.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ._checks import checks_enabled, target_mask
from ._grad import loss_by_recompute
from ._partials import all_reduce, finish
from ._types import LogitOptions, LossTerms, RowCoefs, TokenStats
from .backends._dense import stat_dtype


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [offset, offset + local) of a ``vocab``-entry vocabulary over ``group``."""

    group: object
    offset: int
    local: int
    vocab: int


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without distributed support
        return None
    return DTensor, Replicate, Shard


def _plain(name: str, x):
    """A replicated DTensor's local tensor (differentiable); any other DTensor is refused."""
    types = _dtensor_types()
    if x is None or types is None or not isinstance(x, types[0]):
        return x
    if all(isinstance(p, types[1]) for p in x.placements):
        return x.to_local()
    raise ValueError(f"{name}: a DTensor with placements {tuple(x.placements)} is not supported; every rank needs "
                     f"the whole {name}: pass {name}.full_tensor() or a replicated DTensor")


def shard_of(hidden, weight, bias, process_group):
    """(hidden, weight, bias as plain local tensors, the VocabShard or None).

    A weight sharded on dim 0 over a 1-D mesh is read as a vocab-parallel lm_head over that
    mesh's group; a replicated DTensor as a whole weight. ``process_group`` names the group for
    plain tensors that are each rank's slice."""
    types = _dtensor_types()
    hidden = _plain("hidden", hidden)
    group = process_group
    if types is not None and isinstance(weight, types[0]):
        DTensor, Replicate, Shard = types
        placements, mesh = tuple(weight.placements), weight.device_mesh
        if process_group is not None:
            raise ValueError("process_group: weight is a DTensor, whose device mesh already names the ranks; "
                             "pass a plain local slice with process_group, or the DTensor alone")
        if all(isinstance(p, Replicate) for p in placements):
            return hidden, weight.to_local(), _plain("bias", bias), None
        if not (mesh.ndim == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise ValueError(f"weight: a DTensor with placements {placements} on a {mesh.ndim}-D mesh is not "
                             "supported; pass one sharded on the vocabulary (Shard(0)) or replicated on a 1-D mesh, "
                             "or weight.full_tensor()")
        group = mesh.get_group()
        weight = weight.to_local()
        if bias is not None and isinstance(bias, DTensor):
            if tuple(bias.placements) != placements or bias.device_mesh != mesh:
                raise ValueError(f"bias: expected a DTensor sharded like weight ({placements}), got "
                                 f"{tuple(bias.placements)}")
            bias = bias.to_local()
    elif bias is not None and types is not None and isinstance(bias, types[0]):
        raise ValueError("bias: a DTensor bias needs a DTensor weight with the same placements")
    if group is None:
        return hidden, weight, bias, None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
    sizes = [torch.zeros(1, dtype=torch.int64, device=weight.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return hidden, weight, bias, VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes))


def check_replicated(hidden: torch.Tensor, targets: torch.Tensor, shard: VocabShard) -> None:
    """With value checks on: hidden and targets must be the same on every rank of the group."""
    if not checks_enabled():
        return
    import torch.distributed as dist

    h, y = hidden.detach().double(), targets.double()
    ramp = torch.arange(1, y.numel() + 1, dtype=torch.float64, device=y.device)
    f = torch.stack([h.sum(), h.square().sum(), (h.reshape(-1, h.shape[-1])[:, 0] * ramp).sum(),
                     y.sum(), (y * ramp).sum(), torch.tensor(float(h.numel()), dtype=torch.float64, device=h.device)])
    both = torch.cat([f, -f])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=shard.group)
    if not torch.equal(both[: f.numel()], -both[f.numel():]):
        raise ValueError(
            "hidden/targets: differ across the ranks of the vocab-parallel group. A vocabulary-sharded weight "
            "(process_group=, or a Shard(0) DTensor) is read as a tensor-parallel lm_head, which needs the same "
            "hidden and targets on every rank. For an FSDP2-sharded weight call hykernels where the parameter is "
            "unsharded (inside the wrapped module's forward) or pass "
            "weight.full_tensor(grad_placements=[Partial(\"avg\")]), which averages and reduce-scatters its gradient "
            "as FSDP2 does (a plain full_tensor() reduces no gradient across the ranks).")


class VocabParallel:
    """A backend over this rank's vocabulary shard (the backend interface of backends/__init__.py)."""

    def __init__(self, impl, shard: VocabShard):
        self.impl, self.shard = impl, shard
        self.NAME, self.DTYPES = impl.NAME, impl.DTYPES

    def _local(self, targets: torch.Tensor):
        """(rows whose target is in this slice, targets as local ids; −1 where elsewhere)."""
        s = self.shard
        hit = (targets >= s.offset) & (targets < s.offset + s.local)
        return hit, torch.where(hit, targets - s.offset, torch.full_like(targets, -1))

    def token_stats(self, hidden, weight, bias, targets, opts: LogitOptions) -> tuple[TokenStats, torch.Tensor]:
        _, local = self._local(targets)
        parts = self.impl.token_partials(hidden, weight, bias, local, opts)
        parts = all_reduce(parts._replace(argmax=parts.argmax + self.shard.offset), self.shard.vocab, self.shard.group)
        valid, _ = target_mask(targets, self.shard.vocab, opts.ignore_index)
        return finish(parts, valid, stat_dtype(hidden.dtype))

    def token_stats_backward(self, hidden, weight, bias, targets, opts, lse, lse_lo, coefs: RowCoefs, needs):
        import torch.distributed as dist

        hit, local = self._local(targets)
        coefs = coefs._replace(C=torch.where(hit, coefs.C, torch.zeros_like(coefs.C)))
        dh, dw, db = self.impl.token_stats_backward(hidden, weight, bias, local, opts, lse, lse_lo, coefs, needs)
        if dh is not None:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=self.shard.group)
        return dh, dw, db

    def fused_loss(self, hidden, weight, bias, targets, opts, terms: LossTerms, needs):
        return loss_by_recompute(self.token_stats, self.token_stats_backward, hidden, weight, bias, targets, opts,
                                 terms, needs, self.shard.vocab)

    def segment_sum(self, values, segment_ids, num_segments):
        return self.impl.segment_sum(values, segment_ids, num_segments)

    def prg_scores(self, support, probe_offsets, variant, eps, tau_g):
        return self.impl.prg_scores(support, probe_offsets, variant, eps, tau_g)
