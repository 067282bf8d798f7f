"""Vocabulary-parallel ops on torch.distributed (gloo, CPU): 2 and 3 ranks, V = 103 divisible by
neither, each rank holding its slice of the lm_head; statistics, losses and gradients equal the
single-process computation and plain torch on fp64 logits (tests/dist_worker.py does the work on each
rank)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 2e-5  # fp32, relative to max(1, |value|)


def launch(world, backend, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(WORKER.parent), *sys.path]))
    init = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(init), backend, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung (world={world}, backend={backend})")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=[(2, "torch_chunked"), (3, "torch_chunked"), (2, "triton"), (3, "triton")],
                ids=lambda p: f"{p[0]}ranks-{p[1]}")
def ranks(request, tmp_path_factory):
    world, backend = request.param
    return world, launch(world, backend, tmp_path_factory.mktemp(f"dist{world}{backend}"))


def test_shards_are_uneven(ranks):
    world, results = ranks
    sizes = [r["local_vocab"] for r in results]
    assert sum(sizes) == 103 and len(set(sizes)) > 1


def test_equal_to_single_process(ranks):
    world, results = ranks
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["diffs"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
    assert {k for k in results[0]["diffs"]} >= {"stats.logp", "stats.argmax", "stats.dh", "stats.dw", "fused.loss",
                                                "fused.dw", "dtensor.dw", "spans.mean", "prg_loss.dw",
                                                "gold.logp", "gold.dh"}


@pytest.mark.parametrize("case,message", [
    ("hidden_differs", "hidden/targets: differ across the ranks of the vocab-parallel group"),
    ("dtensor_and_group", "process_group: weight is a DTensor"),
    ("dtensor_shard1", "weight: a DTensor with placements (Shard(dim=1),)"),
    ("target_range", "targets: expected ids in [0, 103) or ignore_index=-100, got 103 at row 1"),
    ("one_rank_empty", "hidden/targets: differ across the ranks of the vocab-parallel group"),
])
def test_bad_calls_fail_clearly_on_every_rank(ranks, case, message):
    world, results = ranks
    for r in results:
        assert r["errors"][case].startswith(message), r["errors"][case]


def test_collectives_are_those_bench_comm_counts(ranks):
    """bench/COMM.md's byte counts come from bench/comm_volume.py's list of collectives: the
    implementation issues exactly those (ops and element counts) for one fused_loss step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from comm_volume import schemes

    world, results = ranks
    n, d, v = 29, 16, 103
    want = sorted([c["kind"], c["op"], math.prod(c["shape"])] for c in schemes(n, d, v, world)["hykernels_fused_loss"])
    for r in results:
        assert sorted(r["collectives"], key=str) == sorted(want, key=str)


def test_empty_call_makes_the_collectives_of_any_call(ranks):
    """No rows (on every rank): a zero loss, empty statistics and zero gradients (DTensor weight too),
    through the same collectives in the same order as a call with rows, so no rank waits on another."""
    world, results = ranks
    for r in results:
        assert all(r["diffs"][k] == 0.0 for k in ("empty.loss", "empty.dw", "empty.shapes", "empty.dtensor_dw"))
        assert [c[:2] for c in r["empty_collectives"]] == [c[:2] for c in r["collectives"]]
