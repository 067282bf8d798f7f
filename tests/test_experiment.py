"""The ablation (hykernels.experiment): its task, batches, scoring and arms checked against
independent computations, and a tiny end-to-end run that writes its files (it asserts nothing
about which arm wins)."""
import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hykernels.experiment import arms, evaluate, task
from hykernels.experiment.model import ModelConfig, gold_batch, make_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TOK = task.CharTokenizer()


def test_problems_are_right():
    rng = random.Random(0)
    for p in task.sample(rng, 300):
        assert eval(p.question) == int(p.answer)  # Python's own arithmetic as the oracle
        assert min(p.totals()) >= 0 and len(p.steps) == task.OPERANDS - 2
        for step in p.steps:  # every written step is a true equation
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
        assert p.steps[-1].split("=")[1] != p.answer or p.ops[-1] in "+-"  # the answer does one more operation
        assert TOK.decode(TOK.encode(p.prompt + p.completion)) == p.prompt + p.completion
        assert len(TOK.encode(p.prompt)) == len("Q: 1+2+3+4\n")  # every prompt has the same length


def test_splits_are_fixed_and_disjoint():
    a, b = task.make_splits(), task.make_splits()
    assert a == b
    parts = [set(a.curated), set(a.queries), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(a.held())


@pytest.mark.parametrize("text, expected", [
    ("1+2=3\nAnswer: 7", ("1+2=3", "7")), ("1+2=3\nAnswer: 12\nAnswer: 3", ("1+2=3", None)),
    ("1+2=3", ("1+2=3", None)), ("1+2=3\nAnswer: ", ("1+2=3", None)), ("\nAnswer: 1-2", ("", None)),
    ("4\nAnswer:  4", ("4", None)), ("4\nAnswer:4", ("4\nAnswer:4", None)), ("\nAnswer: 04", ("", "04")),
])
def test_parse_answer(text, expected):
    assert task.parse_answer(text) == expected


def test_tokenizer_refuses_foreign_characters():
    with pytest.raises(ValueError, match="text: character 'x'"):
        TOK.encode("x")


def test_batch_targets_are_the_next_response_token():
    b = make_batch([[5, 6, 7], [5, 6]], [[8, 9, 1], [8, 1]], pad=0)
    assert b.ids.tolist() == [[5, 6, 7, 8, 9, 1], [5, 6, 8, 1, 0, 0]]
    assert b.mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert b.targets.tolist() == [[-100, -100, 8, 9, 1, -100], [-100, 8, 1, -100, -100, -100]]
    assert b.seq_ids.tolist() == [[-1, -1, 0, 0, 0, -1], [-1, 1, 1, -1, -1, -1]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(TOK, ModelConfig(hidden=32, layers=1, heads=2), seed=0).eval()


def test_answer_confidence_is_the_answer_tokens_geometric_mean_probability(model):
    problems = task.make_splits().val[:5]
    responses = [TOK.encode(p.completion) + [TOK.eos_token_id] for p in problems]
    responses[2] = TOK.encode(problems[2].reasoning) + [TOK.eos_token_id]  # no answer: no confidence
    got = evaluate.answer_confidence(model, TOK, problems, responses)
    for i, (p, r) in enumerate(zip(problems, responses)):
        if i == 2:
            assert got[i].isnan()
            continue
        ids = torch.tensor([TOK.encode(p.prompt) + r])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]  # materialised logits: an independent path
        answer = TOK.encode(p.answer)  # its digits: the cue ends with the space
        first = len(TOK.encode(p.prompt + p.reasoning + task.CUE))
        want = torch.stack([logp[first + k - 1, a] for k, a in enumerate(answer)]).mean().exp()
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    assert evaluate.correctness(TOK, problems, responses).tolist() == [True, True, False, True, True]


def test_rd_arm_step_is_plain_cross_entropy(model):
    """RD only: every curated trace weighs the same, λ = 1: the step's loss is the mean token
    cross-entropy of its batch, recomputed here from the model's own logits."""
    splits = task.make_splits()
    policy = copy.deepcopy(model)
    trainer = arms.ArmTrainer(arms.ARMS["rd"], policy, TOK, splits, arms.TrainConfig(sequences=6), seed=3)
    curated, queries = arms.ArmTrainer(arms.ARMS["rd"], copy.deepcopy(model), TOK, splits,
                                       arms.TrainConfig(sequences=6), seed=3)._draw()
    assert len(curated) == 6 and not queries
    batch = gold_batch(TOK, curated)
    with torch.no_grad():
        logits = model(batch.ids, attention_mask=batch.mask).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
    log = trainer.step()
    assert log["lam"] == 1.0 and log["reward"] is None
    assert log["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert log["rd_nll"] == pytest.approx(want.item(), rel=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), model.parameters()))  # it stepped


@pytest.mark.parametrize("name, lam", [("rlif", 0.0), ("mix", 0.5), ("grpo_correct", 0.0), ("hytuning", None)])
def test_arm_batches_and_mix(model, name, lam):
    config = arms.TrainConfig(sequences=8, group=4, max_new=12)
    trainer = arms.ArmTrainer(arms.ARMS[name], copy.deepcopy(model), TOK, task.make_splits(), config, seed=1)
    torch.manual_seed(0)
    log = trainer.step()
    rd = {"rlif": 0, "mix": 4, "grpo_correct": 0, "hytuning": 4}[name]
    curated, queries = arms.ArmTrainer(arms.ARMS[name], model, TOK, task.make_splits(), config, seed=1)._draw()
    assert (len(curated), len(queries)) == (rd, (8 - rd) // 4)
    if lam is None:  # HyTuning: λ from the PRG gap, smoothed from λ₀ = 0.5, within [0.1, 0.9]
        assert 0.1 <= log["lam"] <= 0.9 and 0.0 <= log["prg_rollouts"] <= 1.0
    else:
        assert log["lam"] == lam
    if name == "grpo_correct":
        assert log["reward"] == log["rollout_accuracy"]  # the reward is correctness itself


def test_quick_experiment_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hykernels", "experiment", "--quick", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert set(report["arms"]) == set(arms.ARMS) and report["seeds"] == [0]
    assert report["command"].startswith("python -m hykernels experiment") and "torch" in report["versions"]
    for arm in report["arms"].values():
        assert [p["step"] for p in arm["curve"]] == [0, 1, 2]
        assert 0.0 <= arm["final"]["accuracy"][0] <= 1.0 and len(arm["train_log"][0]) == 2
    for name in ["ablation_curves"] + [f"ablation_reliability_{a}" for a in arms.ARMS]:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| HyTuning |" in r.stdout


def test_unknown_arm_is_refused():
    r = subprocess.run([sys.executable, "-m", "hykernels", "experiment", "--arms", "rd,nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--arms: unknown arm(s) ['nope']" in r.stderr
