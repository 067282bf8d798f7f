"""Data parallelism (DDP, FSDP2 ``fully_shard``) with hykernels' loss, on 2 CPU ranks:

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_ddp_torchrun.py

A tiny random-init Llama (examples/recipe_common.py) trains a few steps on a global batch split
across the ranks, each way below, next to a single-process copy trained on the whole batch; the
script prints, per way, the largest difference of the per-step loss and of the final parameters:

- ``ddp``: ``DistributedDataParallel`` over ``CausalLMLoss``, a module whose forward runs the
  model's trunk and ``hk.fused_loss`` on the lm_head weight;
- ``fsdp2``: ``fully_shard`` on each decoder layer and on ``CausalLMLoss``, so hykernels runs
  inside the root's forward, where FSDP2 has unsharded the lm_head weight to a plain tensor;
- ``fsdp2-full-tensor``: ``fully_shard`` on each layer, on the trunk and on the lm_head; the
  trunk's forward gives the hidden states and hykernels gets the still-sharded lm_head weight as
  ``weight.full_tensor(grad_placements=[Partial("avg")])``: DTensor's autograd then averages
  the weight gradient over the ranks and reduce-scatters it, as FSDP2 does for every other
  parameter. (A plain ``full_tensor()`` assumes a replicated gradient: each rank would keep its
  own tokens' gradient of its own slice, nothing reduced. The script measures that too.)
- ``prg``: ``hk.prg_loss`` (HyTuning, §6) inside ``CausalLMLoss`` under ``fully_shard``.

It also passes FSDP2's sharded lm_head weight as it is and prints the error hykernels raises.

An empty rank: at step EMPTY_STEP, rank 1's rows are all padding with every target ignored, as
happens in data-parallel or packed training. The module hands hykernels only the target positions
(``hidden[targets != -100]``), so that rank calls ``hk.fused_loss`` / ``hk.prg_loss`` with hidden
of shape [0, D]: the loss is a zero that is part of the graph, so its backward reaches every
parameter (with zero gradients) and the rank takes part in DDP's all-reduce and FSDP2's
reduce-scatter like the others; the other ranks' steps and the single process's are unchanged.
(A transformers model cannot run on input ids of shape [0, T]: Llama's attention reshapes the
[0, T, D] projections with a -1 dimension and raises; and under FSDP2 every rank must run every
sharded layer's forward anyway, for its all-gather, so the empty rank runs the trunk on its
padding rows and drops them before the loss.) The script prints the hidden shape each rank gave
hykernels at that step and its loss. A process-group timeout turns a hang into an error.

Loss normalisation: DDP and FSDP2 average gradients over the ranks, so the global token mean
(what the single process computes) needs rd_weight = world_size / T on each rank, T the number of
target tokens of the whole global batch (an all-reduce of the per-rank counts). The ranks here
hold different numbers of target tokens, so a per-rank mean (rd_weight = 1/T_rank) would not
match. ``prg_loss`` normalises within its call (T_RD, T_RLIF and λ come from the rank's own
batch): under data parallelism the step is the mean of the per-rank losses, and the single
process here computes exactly that.
"""
import argparse
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_common import tiny_causal_lm  # noqa: E402

import hykernels as hk  # noqa: E402
from hykernels.integrations.transformers import last_hidden_states, lm_head  # noqa: E402

VOCAB, ROWS, LENGTH, STEPS, LR = 256, 4, 12, 3, 0.5
TARGET_LENGTHS = (12, 7, 10, 4)  # rows' target tokens: rank 0 gets 19, rank 1 gets 14 (of 2 ranks)
EMPTY_STEP, EMPTY_ROWS = 1, (2, 3)  # at this step rows 2, 3 (rank 1 of 2) are all padding: no target tokens
PAD = 0
WAYS = ("ddp", "fsdp2", "fsdp2-full-tensor", "prg")


def loss_of(hidden, weight, targets, batch):
    """hykernels' loss on this rank's target tokens: fused_loss (cross-entropy) or prg_loss (HyTuning).

    Only the target positions reach hykernels (hidden [n, D]; n = 0 on a rank without targets);
    the shape it got is left in batch["hidden_shape"]."""
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    batch["hidden_shape"] = tuple(hidden.shape)
    if "prg" in batch:
        return hk.prg_loss(hidden, weight, targets, batch["seq_ids"][keep], prg=batch["prg"], is_rd=batch["is_rd"],
                           advantages=batch["advantages"])[0]
    return hk.fused_loss(hidden, weight, targets, rd_weight=batch["rd_weight"])[0]


class CausalLMLoss(torch.nn.Module):
    """A transformers causal LM whose forward returns hykernels' loss instead of logits.

    Wrapped with DDP or ``fully_shard``, hykernels runs inside the wrapped module's forward: under
    FSDP2 the lm_head weight there is the unsharded plain tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, batch):
        hidden = last_hidden_states(self.model, input_ids)
        weight = lm_head(self.model).weight
        self.weight_seen = type(weight).__name__  # FSDP2: Parameter (unsharded), not DTensor
        return loss_of(hidden, weight, targets, batch)


def global_batch(step):
    """The same [ROWS, LENGTH] batch on every rank; rows without a target past TARGET_LENGTHS, and
    at EMPTY_STEP the EMPTY_ROWS all padding, without a target."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(2, VOCAB, (ROWS, LENGTH + 1), generator=g)
    targets = ids[:, 1:].clone()
    for row, n in enumerate(TARGET_LENGTHS):
        targets[row, n:] = -100
    if step == EMPTY_STEP:
        ids[list(EMPTY_ROWS)] = PAD
        targets[list(EMPTY_ROWS)] = -100
    prg = torch.rand(ROWS, generator=g)
    advantages = torch.randn(ROWS, generator=g)
    return ids[:, :-1], targets, prg, advantages


def shard(step, rank, world, prg):
    """(input ids, targets, loss arguments) of rank's contiguous rows of the global batch."""
    ids, targets, prg_scores, advantages = global_batch(step)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    ids, targets = ids[rows], targets[rows]
    if prg:
        n = targets.shape[0]  # one sequence per row; even rows are RD traces, odd ones RLIF rollouts
        seq_ids = torch.where(targets != -100, torch.arange(n)[:, None], -1)
        is_rd = torch.arange(rows.start, rows.stop) % 2 == 0
        return ids, targets, dict(seq_ids=seq_ids, prg=prg_scores[rows], is_rd=is_rd, advantages=advantages[rows])
    return ids, targets, {}


def data_parallel_rd_weight(targets, world):
    """world / T, T the target tokens of the whole global batch (summed over the ranks): DDP and
    FSDP2 average the ranks' gradients, which are then those of the global token mean."""
    total = torch.tensor([int((targets != -100).sum())])
    dist.all_reduce(total)
    return world / total.item()


def full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p


def train(way, world, rank):
    """One way, STEPS steps: (the distributed run's per-step global loss, the single process's, the
    distributed run's final parameters (whole), the single process's, the model, the type of the
    lm_head weight hykernels got, (hidden shape given to hykernels, loss) of each rank at EMPTY_STEP)."""
    prg = way == "prg"
    model = tiny_causal_lm("llama", VOCAB, seed=0)
    reference = copy.deepcopy(model)
    if way == "ddp":
        net = DistributedDataParallel(CausalLMLoss(model))
    elif way in ("fsdp2", "prg"):
        net = CausalLMLoss(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(net)  # the root: embeddings, final norm and lm_head, unsharded during its forward
    else:  # fsdp2-full-tensor
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.model)
        fully_shard(model.lm_head)  # never run: its weight stays a Shard(0) DTensor
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)

    losses, ref_losses = [], []
    for step in range(STEPS):
        ids, targets, batch = shard(step, rank, world, prg)
        if not prg:
            batch["rd_weight"] = data_parallel_rd_weight(targets, world)
        if way == "fsdp2-full-tensor":
            hidden = last_hidden_states(model, ids)
            weight = model.lm_head.weight.full_tensor(grad_placements=[Partial("avg")])
            loss = loss_of(hidden, weight, targets, batch)
        else:
            loss = net(ids, targets, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == EMPTY_STEP:
            empty = [None] * world
            dist.all_gather_object(empty, (batch["hidden_shape"], loss.item(), loss.requires_grad))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

        # the single process: the whole global batch (prg: the mean of the shards' losses)
        ref_loss = 0.0
        for r in range(world) if prg else [None]:
            if prg:
                ids, targets, batch = shard(step, r, world, prg)
            else:
                ids, targets = global_batch(step)[:2]
                batch = dict(rd_weight=1.0 / (targets != -100).sum().item())
            hidden = last_hidden_states(reference, ids)
            ref_loss = ref_loss + loss_of(hidden, reference.lm_head.weight, targets, batch) / (world if prg else 1)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(ref_loss.item())
    params = {n: full(p).detach() for n, p in model.named_parameters()}
    seen = "DTensor (sharded)" if way == "fsdp2-full-tensor" else getattr(net, "module", net).weight_seen
    return losses, ref_losses, params, dict(reference.named_parameters()), model, seen, empty


def sharded_weight_refused(model, rank, world):
    """FSDP2's Shard(0) lm_head weight passed as it is: every rank raises the same ValueError."""
    ids, targets, batch = shard(0, rank, world, False)
    batch["rd_weight"] = 1.0
    try:
        loss_of(last_hidden_states(model, ids), model.lm_head.weight, targets, batch)
    except ValueError as e:
        return str(e)
    return "not refused"


def plain_full_tensor_error(model, rank, world):
    """Relative error of the lm_head gradient from a plain full_tensor() (no grad_placements)."""
    ids, targets, batch = shard(0, rank, world, False)
    batch["rd_weight"] = data_parallel_rd_weight(targets, world)
    grads = []
    for placements in (None, [Partial("avg")]):
        model.lm_head.weight.grad = None
        weight = model.lm_head.weight.full_tensor(grad_placements=placements)
        loss_of(last_hidden_states(model, ids), weight, targets, batch).backward()
        grads.append(model.lm_head.weight.grad.full_tensor())
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    p.add_argument("--tol", type=float, default=2e-5, help="largest difference from the single process")
    args = p.parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a rank left waiting fails
    rank, world = dist.get_rank(), dist.get_world_size()
    worst_all = 0.0
    for way in args.ways:
        losses, ref_losses, params, ref_params, model, seen, empty = train(way, world, rank)
        init = tiny_causal_lm("llama", VOCAB, seed=0).state_dict()
        moved = max((q - init[n]).abs().max().item() for n, q in ref_params.items())
        diffs = torch.tensor([max(abs(a - b) for a, b in zip(losses, ref_losses)),
                              max((params[n] - q).abs().max().item() for n, q in ref_params.items())])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        worst_all = max(worst_all, diffs.max().item())
        if rank == 0:
            print(f"{way}: losses {' '.join(f'{x:.6f}' for x in losses)} "
                  f"(single process {' '.join(f'{x:.6f}' for x in ref_losses)}); "
                  f"largest loss difference {diffs[0].item():.2e}, parameter difference {diffs[1].item():.2e} "
                  f"(parameters moved up to {moved:.2e}); lm_head weight given to hykernels: {seen}", flush=True)
            print(f"{way} empty rank: step {EMPTY_STEP} " + "; ".join(
                f"rank {r} hidden {list(shape)} loss {value:g} requires_grad {grad}"
                for r, (shape, value, grad) in enumerate(empty)), flush=True)
        if way == "fsdp2-full-tensor":
            message = sharded_weight_refused(model, rank, world)
            error = plain_full_tensor_error(model, rank, world)
            if rank == 0:
                print(f"sharded weight as it is: {message}")
                print(f"plain full_tensor(): lm_head gradient relative error {error:.2e}", flush=True)
    if rank == 0:
        print("ok" if worst_all < args.tol else "MISMATCH", flush=True)
    dist.barrier()  # every rank done with every collective before any rank tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
