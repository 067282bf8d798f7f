"""A short, non-chaotic rerun of the ablation's code path, to check that a machine computes what
the committed run computed.

The full ablation cannot be compared number by number across machines: a warm-up of hundreds
of steps turns a last-bit difference in one kernel into a different base model (run.py's
docstring). A few steps cannot: 30 warm-up steps, the warmed-up model's evaluation on 16
validation questions (greedy answers, their confidence, ECE), 3 steps of the RD arm and the first
step of every other arm (RD on the many traces; rollouts sampled, rewarded by self-certainty or
correctness; packed PRG probes toward the own and the majority answer; λ; the fused loss and its
backward; AdamW) move every number by about the rounding of the kernels that computed it. Not
covered: the later steps of the arms with rollouts (chaotic across kernels, see ARM_STEPS), the
test-split evaluation's question count and the report's statistics (plain numpy on the logged
numbers, tested in tests/test_experiment.py). So the fingerprint's
numbers agree across machines to a relative 10⁻⁴ or better where the code is the same, and move
by far more than that where the code's numerics changed (another warm-up schedule, loss
normalisation, PRG definition, task or sampling order). ``run`` stores one in
``ablation.json``; ``compare`` tells whether another is within ``TOLERANCE`` of it.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from . import task
from .arms import ARMS, ArmTrainer, TrainConfig
from .evaluate import evaluate
from .model import ModelConfig, tiny_model, warm_up

# rtol, atol: measured, the fingerprints of AVX-512 and AVX2 kernels (ATEN_CPU_CAPABILITY) differ
# by at most 7e-6 relative and those of 1 and 2 threads not at all (tests/test_experiment.py reruns
# one under AVX2); 1e-3 leaves room for other CPUs' rounding and still fails on a change of the math.
TOLERANCE = (1e-3, 1e-4)
WARMUP_STEPS = 30
# steps of each arm and what each step records: every arm of ARMS, so --check covers every loss
# the ablation trains with. Only RD takes several steps. An arm with rollouts takes one: its
# advantages divide reward differences within a group by their std, which can be tiny, so its
# first update carries a last-bit difference in a reward into the weights, and after it the
# mean reward differs by ~7e-3 relative between AVX-512 and AVX2 (measured, HyTuning). Its first
# step (sampling, PRG probes, rewards, λ, the loss) and RD's three steps (the fused loss, its
# backward and AdamW) stay within 7e-6. The advantage-weighted backward is tested against
# references in tests/test_hytuning.py, not here.
ROLLOUT_KEYS = ("loss", "reward", "rollout_accuracy")
PRG_KEYS = ("loss", "rd_nll", "reward", "lam", "prg_rd", "prg_rollouts")
ARM_STEPS = dict(
    rd=(3, ("loss",)), rd_many=(1, ("loss",)), rlif=(1, ROLLOUT_KEYS), mix=(1, ROLLOUT_KEYS + ("rd_nll",)),
    hytuning=(1, PRG_KEYS), hytuning_majority=(1, PRG_KEYS), grpo_correct=(1, ROLLOUT_KEYS))
EVAL_QUESTIONS = 16  # the warmed-up model's evaluation: greedy answers and their confidence


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside, the caller's setting restored after: no
    nondeterministic kernel is on the CPU path, and one that appears raises."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def fingerprint(seed: int = 0) -> dict:
    """Warm-up losses every 5 steps; the warmed-up model's evaluation (evaluate.evaluate) on the
    first EVAL_QUESTIONS validation questions: accuracy, answered share, mean confidence, ECE;
    then per step of every arm what ``ARM_STEPS`` names."""
    with deterministic_algorithms():
        tok, splits = task.CharTokenizer(), task.make_splits()
        config = ModelConfig(warmup_steps=WARMUP_STEPS)
        model = tiny_model(tok, config, seed)
        warm = warm_up(model, tok, splits, config, seed)
        out = dict(seed=seed, warmup_steps=WARMUP_STEPS, warm_up_losses=warm[::5] + warm[-1:])
        summary = evaluate(model, tok, splits.val[:EVAL_QUESTIONS])["summary"]
        out["evaluation"] = {k: float(summary[k]) for k in ("accuracy", "answered", "mean_confidence", "ece")}
        for name, (steps, keys) in ARM_STEPS.items():
            torch.manual_seed(seed)
            trainer = ArmTrainer(ARMS[name], copy.deepcopy(model), tok, splits, TrainConfig(steps=steps), seed)
            logs = [trainer.step() for _ in range(steps)]
            out[name] = {k: [float(log[k]) for log in logs] for k in keys}
        return out


def _numbers(fp: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in fp.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}[{i}]": float(v) for i, v in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def compare(got: dict, want: dict, tolerance: tuple = TOLERANCE) -> tuple:
    """(ok, worst): whether every number of ``got`` is within |got − want| ≤ atol + rtol·|want|
    of ``want`` (the same keys required), and the worst one as (name, got, want, relative
    difference), or (name, None, None, inf) for a key only one of them has."""
    a, b = _numbers(got), _numbers(want)
    if a.keys() != b.keys():
        name = sorted(a.keys() ^ b.keys())[0]
        return False, (name, a.get(name), b.get(name), float("inf"))
    rtol, atol = tolerance
    worst, ok = None, True
    for name in a:
        rel = abs(a[name] - b[name]) / max(abs(b[name]), 1e-12)
        ok &= bool(np.isclose(a[name], b[name], rtol=rtol, atol=atol))
        if worst is None or rel > worst[3]:
            worst = (name, a[name], b[name], rel)
    return ok, worst
