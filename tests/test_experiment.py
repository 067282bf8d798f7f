"""The ablation (hykernels.apps.experiment): its task, batches, scoring and arms checked against
independent computations, and a tiny end-to-end run that writes its files (it asserts nothing
about which arm wins)."""
import copy
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hykernels.apps.experiment import arms, evaluate, fingerprint, task
from hykernels.apps.experiment.model import ModelConfig, gold_batch, make_batch, tiny_model

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
    assert sum(map(len, parts)) == len(set().union(*parts))
    # the many traces: the curated ones first, ten times as many, outside queries, val and test
    assert len(a.many) == len(set(a.many)) == 10 * len(a.curated) and a.many[:len(a.curated)] == a.curated
    assert not set(a.many) & (parts[1] | parts[2] | parts[3])
    assert len(a.held()) == len(set().union(*parts, a.many))
    few = task.make_splits(many=0)  # drawing the many does not move the other splits
    assert (few.curated, few.queries, few.val, few.test) == (a.curated, a.queries, a.val, a.test)


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
    env = report["environment"]
    assert env["deterministic_algorithms"] and env["aten_cpu_capability"] and env["torch_threads"] >= 1
    assert "cpu_flags" in env and "commit" in env and "uncommitted_changes" in env
    for arm in report["arms"].values():
        assert [p["step"] for p in arm["curve"]] == [0, 1, 2]
        assert 0.0 <= arm["final"]["accuracy"][0] <= 1.0
        assert set(arm["change_from_base"]) >= {"accuracy", "ece"}
    with gzip.open(tmp_path / "ablation_logs.json.gz", "rt") as f:
        logs = json.load(f)
    assert set(logs["arms"]) == set(arms.ARMS) and all(len(v[0]) == 2 for v in logs["arms"].values())
    assert len(logs["arms"]["hytuning"][0][0]["signal"]["prg_own"]) == 16
    for name in ("hytuning", "hytuning_majority"):
        signal = report["prg_signal"][name]
        assert signal["pooled"]["rollouts"] == 2 * 16 and len(signal["per_checkpoint"]) == 2
        assert {"prg_auroc", "prg_majority_auroc", "self_certainty_auroc"} <= set(signal["pooled"])
    assert set(report["less_vs_more"]["arms"]) == {"hytuning", "hytuning_majority", "mix", "rlif"}
    assert "hytuning - mix" in report["comparisons"]
    assert {"warm_up_losses", "rd", "hytuning"} <= set(report["fingerprint"])
    for name in ["ablation_curves", "ablation_prg"] + [f"ablation_reliability_{a}" for a in arms.ARMS]:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| HyTuning |" in r.stdout and "AUROC for rollout correctness" in r.stdout
    assert "less approximates more" in r.stdout
    validity = report["validity"]
    assert validity["split"] == "val" and validity["seeds"] == 1 and set(validity["gates"]) == {
        "more_labels_help", "few_traces_help", "labelled_reward_ceiling", "base_miscalibrated"}
    assert len(report["base"]["val_per_seed"]) == 1 and len(report["arms"]["rd"]["final_val_per_seed"]) == 1
    assert r.stdout.index("validity gates") < r.stdout.index("| HyTuning |")
    assert set(report["prg_signal"]["hytuning"]["within_group_auroc"]) == {"prg_own", "prg_majority", "self_certainty"}
    assert {"ci95", "p", "p_holm"} <= set(report["comparisons"]["hytuning - mix"]["accuracy"])


COMMITTED = ROOT / "experiments" / "results" / "ablation.json"


def test_the_committed_run_is_what_this_code_computes():
    """The short fingerprint (30 warm-up steps, 3 steps of RD and of HyTuning) of this code on
    this machine against the one the committed run stored: a change of the code's numerics (the
    warm-up, the losses, PRG, sampling) fails here until the ablation is rerun and committed,
    while another CPU's rounding (AVX-512 or AVX2 kernels, thread count: ~1e-5 relative) passes
    (fingerprint.TOLERANCE)."""
    want = json.loads(COMMITTED.read_text())["fingerprint"]
    ok, worst = fingerprint.compare(fingerprint.fingerprint(), want)
    assert ok, f"worst: {worst}"


def test_fingerprint_covers_every_arm_and_the_evaluation():
    """--check covers what the docs say: every arm's first steps and the warmed-up model's
    evaluation, in the committed runs' fingerprints and in the code's."""
    for run in (COMMITTED, COMMITTED.parent / "rerun-avx2" / "ablation.json"):
        fp = json.loads(run.read_text())["fingerprint"]
        assert set(arms.ARMS) | {"evaluation", "warm_up_losses"} <= set(fp)
        assert {"accuracy", "answered", "mean_confidence", "ece"} == set(fp["evaluation"])
    assert set(fingerprint.ARM_STEPS) == set(arms.ARMS)


def test_fingerprint_tolerance_covers_avx2_kernels_and_catches_a_change(tmp_path):
    """The same check in a process whose ATen kernels run AVX2 instead of AVX-512 (where the CPU
    has AVX-512; elsewhere the other way round is what CI checks) on 1 thread: within the
    tolerance. And a fingerprint whose warm-up loss moved by 1 % is refused."""
    r = subprocess.run([sys.executable, "-m", "hykernels", "experiment", "--check", str(COMMITTED)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "fingerprint matches" in r.stdout, r.stdout + r.stderr
    want = json.loads(COMMITTED.read_text())["fingerprint"]
    moved = copy.deepcopy(want)
    moved["warm_up_losses"][-1] *= 1.01
    ok, worst = fingerprint.compare(moved, want)
    assert not ok and worst[0] == f"warm_up_losses[{len(want['warm_up_losses']) - 1}]"
    bad = tmp_path / "a.json"
    bad.write_text("{}")
    r = subprocess.run([sys.executable, "-m", "hykernels", "experiment", "--check", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"--check: {bad}: expected an ablation.json with a 'fingerprint'" in r.stderr


def test_unknown_arm_is_refused():
    r = subprocess.run([sys.executable, "-m", "hykernels", "experiment", "--arms", "rd,nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--arms: unknown arm(s) ['nope']" in r.stderr


def test_majority_answers():
    from hykernels.hytuning import majority_answers

    got = majority_answers(["3", "4", "4", None, None, None, "7", "8", "8", "7"], 5)
    # group 1: 4 beats 3 (None does not vote); group 2: 7 and 8 tie, 7 seen first
    assert got == ["4"] * 5 + ["7"] * 5
    assert majority_answers([None, None], 2) == [None, None] and majority_answers([], 3) == []
    with pytest.raises(ValueError, match="answers: expected a multiple of group_size = 2 rollouts, got 3"):
        majority_answers(["1", "2", "3"], 2)
    with pytest.raises(ValueError, match="group_size: expected a positive int, got 0"):
        majority_answers(["1"], 0)


def test_rollout_traces_measure_support_toward_the_given_answer():
    p = task.make_splits().val[0]
    answered = TOK.encode("1+2=3" + task.CUE + "5") + [TOK.eos_token_id]
    unanswered = TOK.encode("1+2=3") + [TOK.eos_token_id]
    own = arms.rollout_traces(TOK, [p, p], [answered, unanswered])
    assert (TOK.decode(own[0].reasoning), TOK.decode(own[0].answer)) == ("1+2=3", "5")
    assert (TOK.decode(own[1].reasoning), TOK.decode(own[1].answer)) == ("1+2=", "3")  # the last token stands in
    toward = arms.rollout_traces(TOK, [p, p], [answered, unanswered], ["12", "12"])
    assert (TOK.decode(toward[0].reasoning), TOK.decode(toward[0].answer)) == ("1+2=3", "12")
    assert (TOK.decode(toward[1].reasoning), TOK.decode(toward[1].answer)) == ("1+2=3", "12")
    assert arms.rollout_traces(TOK, [p], [answered], [None])[0] == own[0]  # None: its own answer


def test_rank_auroc_counts_pairs():
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([-2.0, 0.5, 0.5, 3.0, 7.5]) + rng.random() * (rng.random() < 0.5) for _ in range(15)]
        labels = [rng.random() < 0.4 for _ in range(15)]
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            assert evaluate.rank_auroc(scores, labels) is None
            continue
        want = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
        assert evaluate.rank_auroc(scores, labels) == pytest.approx(want)


def _signal(prg_own, prg_majority, self_certainty, correct):
    return dict(prg_traces=[0.5], prg_own=prg_own, prg_majority=prg_majority, correct=correct,
                answered=[1.0] * len(correct), self_certainty=self_certainty)


def test_prg_signal_pools_seeds_and_checkpoint_windows():
    from hykernels.apps.experiment.run import prg_signal

    # seed 0: own PRG separates perfectly, majority inverted, self-certainty ties; seed 1 the same
    step = _signal([0.9, 0.1], [0.1, 0.9], [2.0, 2.0], [1.0, 0.0])
    other = _signal([0.2, 0.8], [0.5, 0.5], [1.0, 3.0], [1.0, 0.0])
    logs = [[dict(signal=step), dict(signal=step)], [dict(signal=step), dict(signal=other)]]
    got = prg_signal(logs, checkpoints=[0, 1, 2])
    assert got["per_seed"][0]["prg_auroc"] == 1.0 and got["per_seed"][0]["prg_majority_auroc"] == 0.0
    assert got["per_seed"][0]["self_certainty_auroc"] == 0.5
    assert got["per_seed"][1]["prg_auroc"] == 0.75  # 0.9 and 0.2 against 0.1 and 0.8: 3 of 4 pairs
    assert got["per_seed_mean_std"]["prg_auroc"] == [0.875, 0.125]
    assert got["pooled"]["rollouts"] == 8 and got["pooled"]["correct_share"] == 0.5
    assert got["per_checkpoint"][0]["steps"] == [1, 1] and got["per_checkpoint"][0]["prg_auroc"] == 1.0
    assert got["per_checkpoint"][1]["rollouts"] == 4
    assert got["pooled"]["prg_own_mean_correct"] == pytest.approx((0.9 * 3 + 0.2) / 4)
    assert got["pooled"]["prg_traces_mean"] == 0.5
    # within each step's group (both rollouts of a step are one query's): own PRG orders 3 of the 4
    # groups' pairs, majority PRG none of seed 0's and tie + inverted in seed 1's
    within = got["within_group_auroc"]
    assert within["prg_own"]["auroc"] == 0.75 and within["prg_own"]["groups"] == 4
    assert within["prg_majority"]["auroc"] == pytest.approx((0 + 0 + 0 + 0.5) / 4)
    assert within["self_certainty"]["auroc"] == pytest.approx((0.5 + 0.5 + 0.5 + 0) / 4)
    assert prg_signal(logs, [0, 1, 2], group=1)["within_group_auroc"]["prg_own"]["auroc"] is None  # no pair


def test_within_group_auroc_compares_rollouts_of_one_query_only():
    # group 0: the right rollouts score lower (0 of 4 pairs); group 1: higher (3 of 3); group 2 all wrong
    scores, correct = [1, 2, 3, 4, 5, 1, 1, 1, 9, 9], [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    got = evaluate.within_group_auroc(scores, correct, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    assert got["auroc"] == pytest.approx(3 / 7) and got["groups"] == 2 and got["pairs"] == 7
    assert got["ci95"][0] == 0.0 and got["ci95"][1] == 1.0  # resampling 2 groups gives 0, 3/7 or 1
    assert evaluate.rank_auroc(scores, correct) != got["auroc"]  # pooled mixes the groups
    assert evaluate.within_group_auroc([1, 2], [0, 0], [0, 0]) == dict(auroc=None, ci95=None, groups=0, pairs=0)


def test_paired_and_less_vs_more():
    from hykernels.apps.experiment.run import holm, less_vs_more, paired

    def seeds(*acc):
        return [dict(accuracy=a, ece=0.1, brier=0.2, auroc=None, mean_confidence=0.5) for a in acc]

    d = paired(seeds(0.5, 0.4, 0.3), seeds(0.4, 0.5, 0.1))
    assert d["accuracy"]["mean_std"][0] == pytest.approx(0.2 / 3) and d["accuracy"]["wins"] == 2
    assert d["auroc"] is None and d["ece"]["mean_std"] == [0.0, 0.0]
    # sign flips of (0.1, −0.1, 0.2): 6 of the 8 patterns have |mean| >= the observed 0.2/3
    assert d["accuracy"]["p"] == pytest.approx(0.75) and d["ece"]["p"] == 1.0
    assert min(0.1, -0.1, 0.2) <= d["accuracy"]["ci95"][0] <= d["accuracy"]["mean_std"][0] <= d["accuracy"]["ci95"][1]
    comparisons = {name: dict(accuracy=dict(p=p)) for name, p in (("a", 0.01), ("b", 0.04), ("c", 0.03))}
    holm(comparisons)  # sorted 0.01, 0.03, 0.04 times 3, 2, 1, then the running maximum
    assert [comparisons[n]["accuracy"]["p_holm"] for n in "abc"] == pytest.approx([0.03, 0.06, 0.06])
    report = dict(arms=dict(rd=dict(final_per_seed=seeds(0.2, 0.3)), rd_many=dict(final_per_seed=seeds(0.4, 0.5)),
                            hytuning=dict(final_per_seed=seeds(0.3, 0.3))))
    got = less_vs_more(report)
    assert got["gap"] == [pytest.approx(0.2), pytest.approx(0.0)] and got["gap_positive_seeds"] == 2
    assert got["arms"]["hytuning"]["share_closed"] == pytest.approx(0.05 / 0.2)
    assert got["arms"]["hytuning"]["gain_over_rd"] == [pytest.approx(0.05), pytest.approx(0.05)]
    assert 0.0 < got["arms"]["hytuning"]["share_closed_std"] < 0.5
    low, high = got["arms"]["hytuning"]["share_closed_ci95"]
    assert low <= 0.25 <= high
    assert less_vs_more(dict(arms=dict(rd=report["arms"]["rd"]))) == {}


def test_validity_gates():
    from hykernels.apps.experiment.run import validity

    def seeds(*acc, ece=0.1):
        return [dict(accuracy=a, ece=ece) for a in acc]

    base = seeds(0.20, 0.20, 0.20, 0.20, 0.20)
    good = dict(rd=seeds(0.25, 0.24, 0.22, 0.23, 0.21), rd_many=seeds(0.40, 0.35, 0.33, 0.35, 0.25),
                grpo_correct=seeds(0.3, 0.3, 0.26, 0.25, 0.2))
    v = validity(base, good, questions=200)
    assert v["passed"] and v["gates"]["more_labels_help"]["seed_share"] == 0.8  # 4 of 5 seeds by >= 0.10
    assert v["gates"]["few_traces_help"]["value"] == pytest.approx(0.03)
    bad = dict(good, grpo_correct=seeds(0.3, 0.3, 0.24, 0.25, 0.2))  # 3 of 5 seeds by >= 0.05
    v = validity(base, bad, questions=200)
    assert not v["passed"] and v["gates"]["labelled_reward_ceiling"]["passed"] is False
    assert not validity(seeds(0.2, 0.2, ece=0.05), dict(rd=seeds(0.3, 0.3)), 10)["gates"]["base_miscalibrated"]["passed"]
    v = validity(base, dict(rd=good["rd"]), questions=200)  # arms not run: gates unknown, not passed
    assert v["gates"]["more_labels_help"]["passed"] is None and v["passed"] is False


def evidence_rows(committed: dict, rerun: dict) -> list:
    """The README's Evidence table, row by row, from the two runs' JSON."""
    def pm(ms):
        return f"{ms[0]:.3f} ± {ms[1]:.3f}"

    rows = [("base model (warm-up)", committed["base"]["mean_std"], rerun["base"]["mean_std"])]
    rows += [(a["label"], a["final"], rerun["arms"][name]["final"]) for name, a in committed["arms"].items()]
    return [f"| {label} | {pm(c['accuracy'])} | {pm(c['ece'])} | {pm(r['accuracy'])} | {pm(r['ece'])} |"
            for label, c, r in rows]


def test_readme_evidence_is_the_committed_runs():
    """Every figure of the README's Evidence table is the committed run's and the AVX2 rerun's,
    to the digit."""
    section = (ROOT / "README.md").read_text().split("## Evidence")[1].split("\n## ")[0]
    runs = [json.loads((ROOT / "experiments" / "results" / d / "ablation.json").read_text()) for d in ("", "rerun-avx2")]
    assert runs[0]["fingerprint"] and runs[1]["environment"]["aten_cpu_capability"] == "AVX2"
    for row in evidence_rows(*runs):
        assert row in section, row
