"""experiments/real_model_signal.py's task and parsing (the run itself needs SmolLM2 and ~10
minutes: its result is committed as experiments/results/real_model_signal.json)."""
import importlib.util
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_model_signal", ROOT / "experiments" / "real_model_signal.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)


def test_problems_and_their_solutions():
    every = R.problems(random.Random(0), 50, operands=3, largest=4)
    assert len(set((n, o) for n, o, _ in every)) == 50
    for p in every:
        nums, ops, totals = p
        assert all(0 <= x <= 4 for x in nums) and min(totals) >= 0
        assert eval(R.question(p)) == totals[-1]
        reasoning, answer = R.solution(p)
        assert reasoning.count(R.STEP) == 1 and answer == str(totals[-1])  # one step, the last operation in the answer
        assert reasoning == f"{totals[0]}{ops[0]}{nums[1]}={totals[1]}\n"


def test_parse_takes_the_number_on_the_cue_line():
    assert R.parse("3+4=7\nAnswer: 5\n\nQ: 1+1") == ("3+4=7\n", "5")
    assert R.parse("3+4=7\nAnswer: five") == ("3+4=7\n", None)
    assert R.parse("3+4=7\n") == ("3+4=7\n", None)
    assert R.parse("Answer:  -2 \nmore") == ("", "-2")


NAMES = dict(prg_own="PRG, own answer", prg_majority="PRG, majority answer", self_certainty="self-certainty")


def readme_rows(got: dict) -> list:
    """The README's table of the committed real-model result, row by row."""
    rows = []
    for score, name in NAMES.items():
        w, pooled = got["signal"][score]["within_group"], got["signal"][score]["pooled_auroc"]
        rows.append(f"| {name} | {w['auroc']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] | {pooled:.3f} |")
    return rows


def test_the_committed_result_is_what_the_readme_says():
    got = json.loads((ROOT / "experiments" / "results" / "real_model_signal.json").read_text())
    assert got["group"] == 8 and len(got["questions"]) == len(got["rollouts"]) // 8
    assert got["wall_s"] <= 15 * 60  # the budget on 2 cores
    readme = (ROOT / "README.md").read_text()
    for score, row in zip(NAMES, readme_rows(got)):
        within = got["signal"][score]["within_group"]
        assert within["ci95"][0] <= within["auroc"] <= within["ci95"][1]
        assert row in readme, row
