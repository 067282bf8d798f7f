"""`python -m hykernels experiment`: the ablation, end to end, on the CPU, offline.

For each seed: one tiny Llama, warmed up to partial competence (model.py); a copy per arm
(arms.py), post-trained for the same number of steps with the same optimiser; every
``eval_every`` steps, held-out accuracy and calibration of greedily generated answers
(evaluate.py). Writes ``ablation.json`` (command, versions, settings, per-seed and mean ± std
numbers, curves, training logs), ``ablation_curves.png`` and one reliability diagram per arm
(seeds pooled, after the last step) to ``out_dir``, and prints a table.
"""
from __future__ import annotations

import copy
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import __version__, metrics
from . import task
from .arms import ARMS, ArmTrainer, TrainConfig
from .evaluate import evaluate
from .model import ModelConfig, tiny_model, warm_up

METRICS = ("accuracy", "answered", "mean_confidence", "ece", "brier", "auroc", "aurc", "overconfidence_rate")


def versions() -> dict:
    import transformers

    return dict(hykernels=__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), numpy=np.__version__)


def device() -> str:
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads ({platform.platform()})"


def fmt(x) -> str:
    """A metric to 3 decimals, or n/a where it does not exist (nothing answered)."""
    return "n/a" if x is None else f"{x:.3f}"


def mean_std(summaries: list) -> dict:
    """[mean, std] over seeds of each metric, over the seeds where it exists (a seed whose
    model answered nothing has no calibration numbers), None where none has it."""
    out = {}
    for key in METRICS:
        values = [s[key] for s in summaries if s.get(key) is not None]
        out[key] = [float(np.mean(values)), float(np.std(values))] if values else None
    return out


def run(*, seeds=(0, 1, 2), arms=tuple(ARMS), split="test", out_dir="experiments/results",
        model_config: ModelConfig = None, train_config: TrainConfig = None, eval_every: int = 10,
        eval_size: int = None, command: str = None, log=print) -> dict:
    """Run the ablation and write its files; returns the report that ``ablation.json`` holds.

    Args:
        seeds: one warmed-up base model per seed; every arm starts from it.
        arms: names from ``hykernels.experiment.arms.ARMS``.
        split: ``"test"`` (held out, reported) or ``"val"`` (for choosing settings).
        out_dir: where ``ablation.json``, ``ablation_curves.png`` and the reliability diagrams go.
        model_config: the tiny Llama and its warm-up (``ModelConfig()`` by default).
        train_config: steps, sequences per step, rollouts per query, learning rate.
        eval_every: steps between held-out evaluations (the curves); the last step always counts.
        eval_size: evaluate on the split's first ``eval_size`` questions (all by default).
        command: the command line recorded in the report.
        log: where progress lines go (``print``).
    """
    model_config, train_config = model_config or ModelConfig(), train_config or TrainConfig()
    t0 = time.perf_counter()
    tok, splits = task.CharTokenizer(), task.make_splits()
    problems = getattr(splits, split)[:eval_size]
    checkpoints = sorted({0, train_config.steps, *range(0, train_config.steps, eval_every)})
    results = {name: dict(label=ARMS[name].label, evals=[], logs=[]) for name in arms}
    base = []
    for seed in seeds:
        model = tiny_model(tok, model_config, seed)
        warm = warm_up(model, tok, splits, model_config, seed)
        start = evaluate(model, tok, problems)
        base.append(start["summary"])
        log(f"seed {seed}: warm-up loss {warm[0]:.3f} -> {warm[-1]:.3f}; base model: "
            f"accuracy {start['summary']['accuracy']:.3f}, ECE {fmt(start['summary']['ece'])}")
        for name in arms:
            torch.manual_seed(seed)  # the same sampling stream for every arm of a seed
            policy = copy.deepcopy(model)
            trainer = ArmTrainer(ARMS[name], policy, tok, splits, train_config, seed)
            evals, logs = {0: start}, []
            for step in range(1, train_config.steps + 1):
                logs.append(trainer.step())
                if step in checkpoints:
                    evals[step] = evaluate(policy, tok, problems)
            results[name]["evals"].append(evals)
            results[name]["logs"].append(logs)
            final = evals[train_config.steps]["summary"]
            log(f"  {name:13s} accuracy {final['accuracy']:.3f}  answered {final['answered']:.3f}  "
                f"ECE {fmt(final['ece'])}  mean confidence {fmt(final['mean_confidence'])}  "
                f"({time.perf_counter() - t0:.0f} s)")

    report = dict(
        command=command or "python -m hykernels experiment", versions=versions(), device=device(),
        wall_s=None, split=split, eval_questions=len(problems), seeds=list(seeds), checkpoints=checkpoints,
        model=asdict(model_config), train=asdict(train_config),
        data=dict(curated=len(splits.curated), queries=len(splits.queries), val=len(splits.val),
                  test=len(splits.test), data_seed=1234),
        base=dict(per_seed=base, mean_std=mean_std(base)), arms={})
    for name, r in results.items():
        curve = [dict(step=s, **mean_std([e[s]["summary"] for e in r["evals"]])) for s in checkpoints]
        finals = [e[train_config.steps]["summary"] for e in r["evals"]]
        report["arms"][name] = dict(
            label=r["label"], final=mean_std(finals), final_per_seed=finals, curve=curve,
            final_examples=[e[train_config.steps]["examples"] for e in r["evals"]],
            tokens_trained=[sum(x["tokens"] for x in logs) for logs in r["logs"]], train_log=r["logs"])
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    pooled = {}  # the answered questions of every seed, after the last step
    for name, r in results.items():
        pairs = [(c, o) for e in r["evals"] for c, o in zip(e[train_config.steps]["confidence"],
                                                              e[train_config.steps]["correct"]) if c is not None]
        pooled[name] = ([c for c, _ in pairs], [o for _, o in pairs])
    figures = plots(report, pooled, out)
    log("\n" + table(report))
    log(f"\nwrote {out / 'ablation.json'} and {len(figures)} figures to {out}/ in {report['wall_s']:.0f} s")
    return report


def table(report: dict) -> str:
    """The markdown table of the last step (mean ± std over seeds), the base model first."""
    cols = ("accuracy", "answered", "ece", "brier", "auroc", "aurc", "overconfidence_rate", "mean_confidence")
    head = "| arm | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]

    def mean_pm_std(ms):
        return "n/a" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"

    rows.append("| base model (warm-up) | " + " | ".join(mean_pm_std(report["base"]["mean_std"][c]) for c in cols) + " |")
    for a in report["arms"].values():
        rows.append(f"| {a['label']} | " + " | ".join(mean_pm_std(a["final"][c]) for c in cols) + " |")
    return "\n".join(rows)


def plots(report: dict, pooled: dict, out: Path) -> list:
    """Accuracy and ECE against steps per arm (mean ± std band), and a reliability diagram per
    arm; none without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for name, arm in report["arms"].items():
        steps = [p["step"] for p in arm["curve"]]
        for ax, key in zip(axes, ("accuracy", "ece")):
            mean = np.array([np.nan if p[key] is None else p[key][0] for p in arm["curve"]])
            std = np.array([np.nan if p[key] is None else p[key][1] for p in arm["curve"]])
            line, = ax.plot(steps, mean, marker="o", ms=3, label=arm["label"])
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, key in zip(axes, ("held-out accuracy", "held-out ECE (answered questions, 15 bins)")):
        ax.set(xlabel="post-training step", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"{len(report['seeds'])} seeds, mean ± std; {report['eval_questions']} {report['split']} questions")
    paths = [out / "ablation_curves.png"]
    fig.savefig(paths[0], dpi=110)
    for name, (conf, correct) in pooled.items():
        if not conf:
            continue
        path = out / f"ablation_reliability_{name}.png"
        metrics.reliability_diagram(conf, correct, path, title=f"{report['arms'][name]['label']}, "
                                    f"step {report['train']['steps']}, seeds pooled")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hykernels experiment", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return from_args(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="post-training steps per arm")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluate on the held-out test set (reported) or the validation set (for choosing settings)")
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 steps, a short warm-up, 24 questions")


def from_args(args) -> int:
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; expected some of {list(ARMS)}")
    command = "python -m hykernels experiment " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if args.quick:
        run(seeds=(0,), arms=arms, split=args.split, out_dir=args.out_dir, eval_every=1, eval_size=24,
            model_config=ModelConfig(warmup_steps=20), train_config=TrainConfig(steps=2), command=command)
    else:
        run(seeds=tuple(range(args.seeds)), arms=arms, split=args.split, out_dir=args.out_dir,
            eval_every=args.eval_every, train_config=TrainConfig(steps=args.steps), command=command)
    return 0
