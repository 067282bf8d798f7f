"""A vocabulary-parallel (tensor-parallel) lm_head trained with hykernels, on 2 CPU ranks:

    torchrun --standalone --nproc_per_node 2 examples/vocab_parallel_torchrun.py

Every rank runs the same (replicated) trunk on the same batch; the lm_head is split over the
vocabulary with torch's own tensor parallelism (ColwiseParallel makes its weight a Shard(0)
DTensor). hykernels reads that DTensor as a vocab-parallel lm_head: each rank streams only its
slice, three all-reduces of O(N) numbers combine the statistics, the hidden-state gradient is
summed across ranks (so the replicated trunk stays in sync) and each rank keeps the gradient of
its own weight slice. With plain tensors, pass the local slice and ``process_group=`` instead.

On GPUs launch with one process per GPU; the script picks NCCL when CUDA is available.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import hykernels as hk

VOCAB, DIM, TOKENS, STEPS = 1009, 64, 96, 3  # a vocabulary no rank count divides


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.GELU(), torch.nn.LayerNorm(DIM))
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    torch.manual_seed(0)  # the same model and batches on every rank
    model = TinyLM().to(device)
    reference = TinyLM().to(device)
    reference.load_state_dict(model.state_dict())  # a single-process copy, to check against
    mesh = init_device_mesh(device.type, (world,))
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})  # weight: Shard(0) over the vocabulary
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)

    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (TOKENS + 1,), device=device)
        targets = ids[1:].clone()
        targets[::7] = -100  # rows without a target
        losses = []
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            hidden = net.trunk(net.embed(ids[:-1]))
            loss, stats = hk.fused_loss(hidden, net.lm_head.weight, targets, rd_weight=1.0 / TOKENS,
                                        entropy_weight=0.01 / TOKENS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"step {step}: loss {losses[0]:.6f} (single process {losses[1]:.6f}), "
                  f"mean confidence {stats.confidence.mean().item():.4f}")

    # the trunk is replicated: identical on every rank, and equal to the single-process run
    drift = max((p - q).abs().max().item() for p, q in zip(model.trunk.parameters(), reference.trunk.parameters()))
    head = model.lm_head.weight.full_tensor()
    drift = max(drift, (head - reference.lm_head.weight).abs().max().item())
    worst = torch.tensor([drift], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"largest difference from the single-process run after {STEPS} steps: {worst.item():.2e}")
        print("ok" if worst.item() < 1e-4 else "MISMATCH", flush=True)
    dist.barrier()  # every rank done with every collective before any rank tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
