"""Data parallelism end to end: examples/fsdp2_ddp_torchrun.py under torchrun on 2 CPU ranks (gloo).

A tiny random-init Llama trains 3 steps with hk.fused_loss under DDP, under FSDP2 with hykernels
inside the wrapped forward, and under FSDP2 with the sharded lm_head weight passed as
full_tensor(grad_placements=[Partial("avg")]); and with hk.prg_loss under FSDP2. Each run's
per-step loss and final parameters equal a single-process run on the whole global batch. The
sharded weight passed as it is is refused with a message naming both ways; a plain
full_tensor() gets a wrong lm_head gradient (which is why the README and the message say
grad_placements).

At step 1 rank 1 gets no target tokens (its rows all padding): hykernels gets hidden of shape
[0, D] there and returns a zero loss that is part of the graph, so that rank still joins DDP's
all-reduce and FSDP2's reduce-scatter (a graph-disconnected zero there hangs DDP until the
process-group timeout), and the losses and parameters above still equal the single process's on
the union of the data (rd_weight = world / T, T the global target count)."""
import re

import pytest
from torchrun import torchrun

TOL = 2e-5  # fp32: the ranks' matmuls see half the rows, and gradients are averaged in another order
WAYS = ("ddp", "fsdp2", "fsdp2-full-tensor", "prg")


@pytest.fixture(scope="module")
def output():
    r = torchrun("examples/fsdp2_ddp_torchrun.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def line(output, prefix):
    found = [s for s in output.splitlines() if s.startswith(prefix)]
    assert len(found) == 1, output
    return found[0]


@pytest.mark.parametrize("way", WAYS)
def test_matches_single_process(output, way):
    text = line(output, f"{way}: ")
    loss = float(re.search(r"largest loss difference (\S+),", text).group(1))
    param = float(re.search(r"parameter difference (\S+) ", text).group(1))
    moved = float(re.search(r"parameters moved up to (\S+)\)", text).group(1))
    assert loss <= TOL and param <= TOL, text
    assert moved > 0.1, text  # the steps changed the model: equal parameters say something


def test_lm_head_weight_hykernels_sees(output):
    """Inside the FSDP2 root's forward the weight is the unsharded plain parameter."""
    assert line(output, "fsdp2: ").endswith("lm_head weight given to hykernels: Parameter")
    assert line(output, "prg: ").endswith("lm_head weight given to hykernels: Parameter")


def test_sharded_weight_as_it_is_is_refused(output):
    text = line(output, "sharded weight as it is: ")
    assert "hidden/targets: differ across the ranks of the vocab-parallel group" in text
    assert "inside the wrapped module's forward" in text
    assert 'weight.full_tensor(grad_placements=[Partial("avg")])' in text


def test_plain_full_tensor_misses_other_ranks_gradient(output):
    error = float(line(output, "plain full_tensor(): ").split()[-1])
    assert error > 0.1


@pytest.mark.parametrize("way", WAYS)
def test_rank_without_tokens(output, way):
    """Under every way the empty rank's hykernels call had no rows; its zero loss is in the graph."""
    text = line(output, f"{way} empty rank: ")
    assert "rank 1 hidden [0, 64] loss 0 requires_grad True" in text, text
    assert re.search(r"rank 0 hidden \[\d+, 64\] loss \S+ requires_grad True", text), text
    assert "rank 0 hidden [0," not in text, text


def test_all_ok(output):
    assert output.strip().splitlines()[-1] == "ok", output
