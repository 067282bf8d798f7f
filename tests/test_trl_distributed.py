"""HyTuningTrainer on 2 processes (gloo, CPU; tests/trl_dist_worker.py under torchrun): DDP and
FSDP2 train every replica alike, as one process trains on the same global batch; the processes
share the traces out and run equal numbers of probe forwards although they hold unequal numbers of
answered rollouts; a run resumed on 2 processes from a checkpoint ends where the uninterrupted run
ends.

Tolerances: the runs are deterministic (fixed data, seeds and canned rollouts; SGD), so the
replicas of one run must be bit-identical. Against the single process, whose matmuls see twice the
rows and whose gradients are not averaged over processes, only fp32 rounding differs: measured
1.1e-8 on parameters that moved 0.03; the bound, 1e-6, leaves 100x room and is still 3e-5 of the
movement, which the tests check is there."""
import json

import pytest
import torch
from torchrun import ROOT, torchrun

pytest.importorskip("trl")

WORKER = "tests/trl_dist_worker.py"
TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run's per-rank results (JSON) and parameters: single, ddp (saving every step), a ddp
    run resumed from the first checkpoint, fsdp2."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from recipe_common import tiny_causal_lm

    base = tmp_path_factory.mktemp("trl_dist")
    model = base / "model"
    tiny_causal_lm("qwen2", 256).save_pretrained(model)
    init = {name: p.detach().clone() for name, p in tiny_causal_lm("qwen2", 256).named_parameters()}

    def launch(name, way, *extra):
        out = base / name
        if way == "single":
            r = subprocess.run([sys.executable, WORKER, "--way", way, "--model", str(model), "--out", str(out), *extra],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        else:
            r = torchrun(WORKER, "--way", way, "--model", str(model), "--out", str(out), *extra, timeout=600)
        assert r.returncode == 0, f"{name}:\n" + r.stdout[-3000:] + r.stderr[-5000:]
        world = 1 if way == "single" else 2
        return [dict(json.loads((out / f"result-rank{k}.json").read_text()),
                     params=torch.load(out / f"params-rank{k}.pt")) for k in range(world)]

    results = {"init": init, "single": launch("single", "single"),
               "ddp": launch("ddp", "ddp", "--save-steps", "1"), "fsdp2": launch("fsdp2", "fsdp2")}
    results["resumed"] = launch("resumed", "ddp", "--resume", str(base / "ddp" / "checkpoint-1"))
    return results


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("way", ["ddp", "fsdp2"])
def test_the_wrapper_is_the_one_asked_for(runs, way):
    """DDP: plain parameters under MULTI_CPU; FSDP2: every parameter a DTensor shard."""
    for rank in runs[way]:
        if way == "ddp":
            assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and rank["param_types"] == ["Parameter"]
        else:
            assert rank["distributed_type"] == "DistributedType.FSDP" and rank["param_types"] == ["DTensor"]


@pytest.mark.parametrize("way", ["ddp", "fsdp2"])
def test_replicas_identical_and_equal_to_one_process(runs, way):
    r0, r1 = runs[way]
    assert max_diff(r0["params"], r1["params"]) == 0.0  # gradients reduced over the processes
    single = runs["single"][0]["params"]
    assert max_diff(r0["params"], single) <= TOL
    assert max_diff(single, runs["init"]) > 0.01  # the steps moved the model: equal parameters say something


@pytest.mark.parametrize("way", ["ddp", "fsdp2"])
def test_lambda_is_the_same_everywhere(runs, way):
    r0, r1 = runs[way]
    assert r0["lambda"] == r1["lambda"] and len(r0["lambda"]) == 2
    assert r0["lambda"] == pytest.approx(runs["single"][0]["lambda"], abs=1e-5)
    assert r0["lambda"][0] != r0["lambda"][1]


@pytest.mark.parametrize("way", ["ddp", "fsdp2"])
def test_traces_are_shared_out(runs, way):
    """Each step the processes train on disjoint traces whose union is what one process with
    twice the traces per step trains on; the sampler's position is the same everywhere."""
    r0, r1 = runs[way]
    single = runs["single"][0]
    for step in range(2):
        mine, theirs = set(r0["traces"][step]), set(r1["traces"][step])
        assert len(mine) == len(theirs) == 2 and not mine & theirs
        assert mine | theirs == set(single["traces"][step])
    assert r0["drawn"] == r1["drawn"] == single["drawn"] == 8


@pytest.mark.parametrize("way", ["ddp", "fsdp2"])
def test_equal_probe_forwards_with_unequal_answers(runs, way):
    """The processes answered unequally and needed unequal probe batches, yet each ran as many
    probe forwards as the busiest (under FSDP2 unequal counts mismatch the all-gathers)."""
    r0, r1 = runs[way]
    assert all(a != b for a, b in zip(r0["answered"], r1["answered"]))
    assert any(a != b for a, b in zip(r0["probe_batches"], r1["probe_batches"]))
    assert r0["probe_calls"] == r1["probe_calls"]
    assert r0["probe_calls"] == [max(a, b) for a, b in zip(r0["probe_batches"], r1["probe_batches"])]


def test_resume_on_two_processes(runs):
    """Resumed from checkpoint-1 (λ and the trace sampler restored from hytuning_state.json), step 2
    trains on the same traces with the same λ and ends with the uninterrupted run's weights."""
    full, resumed = runs["ddp"], runs["resumed"]
    for rank in range(2):
        assert resumed[rank]["lambda"] == full[rank]["lambda"][1:]
        assert resumed[rank]["traces"] == full[rank]["traces"][1:]
        assert resumed[rank]["drawn"] == full[rank]["drawn"]
        assert max_diff(resumed[rank]["params"], full[rank]["params"]) <= TOL
