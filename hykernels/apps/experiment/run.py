"""`python -m hykernels experiment`: the ablation, end to end, on the CPU, offline.

For each seed: one tiny Llama, warmed up to partial competence (model.py); a copy per arm
(arms.py), post-trained for the same number of steps with the same optimiser; every
``eval_every`` steps, held-out accuracy and calibration of greedily generated answers
(evaluate.py). Writes ``ablation.json`` (command, versions, the machine and commit, settings,
per-seed and mean ± std numbers, differences between arms paired by seed, curves, PRG's signal
for rollout correctness, and how much of the gap to RD on 10× the traces HyTuning closes),
``ablation_logs.json.gz`` (every step's log, per-rollout PRG, self-certainty and correctness
included), ``ablation_curves.png``, ``ablation_prg.png`` and one reliability diagram per arm
(seeds pooled, after the last step) to ``out_dir``, and prints tables.

Reproducibility: every seed's run is a deterministic function of the code, the seed and the
floating-point results of torch's CPU kernels. Those results depend on which vector ISA ATen's
kernels run (AVX-512 or AVX2: ``ATEN_CPU_CAPABILITY``), which changes the last bit of a loss at
the first step; a warm-up of hundreds of steps amplifies that into a different base model. So
two machines agree seed by seed only when their kernels do, and otherwise agree as two draws of
seeds do: conclusions are drawn from differences paired by seed, over enough seeds.
"""
from __future__ import annotations

import copy
import gzip
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ... import __version__, metrics
from . import task
from .arms import ARMS, ArmTrainer, TrainConfig
from .evaluate import evaluate, rank_auroc, within_group_auroc
from .fingerprint import TOLERANCE, compare, deterministic_algorithms, fingerprint
from .model import ModelConfig, tiny_model, warm_up

METRICS = ("accuracy", "answered", "mean_confidence", "ece", "brier", "auroc", "aurc", "overconfidence_rate")


def versions() -> dict:
    import transformers

    return dict(hykernels=__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), numpy=np.__version__)


def device() -> str:
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads ({platform.platform()})"


CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16")


def environment() -> dict:
    """What decides the floating-point results a rerun gets: the CPU and its vector flags, the ISA
    ATen's kernels use, torch's threads, the BLAS, and the code (commit, and whether the package
    had uncommitted changes)."""
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine()):
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:  # not Linux: the processor string alone
        pass
    blas = [line.strip(" -") for line in torch.__config__.show().splitlines()
            if "Math Kernel Library" in line or "MKL-DNN" in line or "OpenBLAS" in line]
    return dict(cpu=cpu, cpu_flags=[f for f in CPU_FLAGS if f in flags],
                aten_cpu_capability=torch.backends.cpu.get_cpu_capability(), torch_threads=torch.get_num_threads(),
                deterministic_algorithms=torch.are_deterministic_algorithms_enabled(), blas=blas,
                platform=platform.platform(), **commit())


def commit() -> dict:
    """The package's git commit and whether hykernels/ had uncommitted changes (None outside a
    git checkout)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return dict(commit=None, uncommitted_changes=None)
        changes = git("status", "--porcelain", "--", "hykernels").stdout.strip()
        return dict(commit=head.stdout.strip(), uncommitted_changes=bool(changes))
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, uncommitted_changes=None)


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
        arms: names from ``hykernels.apps.experiment.arms.ARMS``.
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
    with deterministic_algorithms():
        return _run(seeds, arms, split, Path(out_dir), model_config, train_config, eval_every, eval_size, command, log)


def _run(seeds, arms, split, out, model_config, train_config, eval_every, eval_size, command, log) -> dict:
    t0 = time.perf_counter()
    machine = environment()  # at the start: the code this process loaded, not what the tree holds later
    reference = fingerprint()
    tok, splits = task.CharTokenizer(), task.make_splits()
    problems = getattr(splits, split)[:eval_size]
    # the validity gates are read on the validation split, from the same trained models
    val_problems = splits.val[:eval_size]
    checkpoints = sorted({0, train_config.steps, *range(0, train_config.steps, eval_every)})
    results = {name: dict(label=ARMS[name].label, evals=[], logs=[], val=[]) for name in arms}
    base, base_val, warm_losses = [], [], []
    for seed in seeds:
        model = tiny_model(tok, model_config, seed)
        warm = warm_up(model, tok, splits, model_config, seed)
        warm_losses.append([round(x, 6) for x in warm[::max(1, len(warm) // 20)]] + [round(warm[-1], 6)])
        start = evaluate(model, tok, problems)
        base.append(start["summary"])
        base_val.append(start["summary"] if split == "val" else evaluate(model, tok, val_problems)["summary"])
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
            results[name]["val"].append(evals[train_config.steps]["summary"] if split == "val"
                                        else evaluate(policy, tok, val_problems)["summary"])
            final = evals[train_config.steps]["summary"]
            log(f"  {name:17s} accuracy {final['accuracy']:.3f}  answered {final['answered']:.3f}  "
                f"ECE {fmt(final['ece'])}  mean confidence {fmt(final['mean_confidence'])}  "
                f"({time.perf_counter() - t0:.0f} s)")

    report = dict(
        command=command or "python -m hykernels experiment", versions=versions(), device=device(),
        environment=machine, fingerprint=reference, wall_s=None, split=split, eval_questions=len(problems),
        seeds=list(seeds), checkpoints=checkpoints, model=asdict(model_config), train=asdict(train_config),
        data=dict(curated=len(splits.curated), many=len(splits.many), queries=len(splits.queries),
                  val=len(splits.val), test=len(splits.test), data_seed=1234),
        base=dict(per_seed=base, mean_std=mean_std(base), warm_up_losses=warm_losses, val_per_seed=base_val),
        validity=validity(base_val, {name: r["val"] for name, r in results.items()}, len(val_problems)), arms={})
    for name, r in results.items():
        curve = [dict(step=s, **mean_std([e[s]["summary"] for e in r["evals"]])) for s in checkpoints]
        finals = [e[train_config.steps]["summary"] for e in r["evals"]]
        report["arms"][name] = dict(
            label=r["label"], final=mean_std(finals), final_per_seed=finals,
            change_from_base=paired(finals, base), curve=curve,
            final_examples=[e[train_config.steps]["examples"] for e in r["evals"]], final_val_per_seed=r["val"],
            tokens_trained=[sum(x["tokens"] for x in logs) for logs in r["logs"]])
    per_seed = {name: a["final_per_seed"] for name, a in report["arms"].items()}
    report["comparisons"] = holm({f"{a} - {b}": paired(per_seed[a], per_seed[b]) for a, b in COMPARISONS
                                  if a in per_seed and b in per_seed})
    report["prg_signal"] = {name: prg_signal(r["logs"], checkpoints, train_config.group) for name, r in results.items()
                            if ARMS[name].use_prg}
    report["less_vs_more"] = less_vs_more(report)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    # every step's log, the per-rollout PRG, self-certainty and correctness included (about 1 MB
    # of JSON for 10 seeds): compact and gzipped beside the report
    train_logs = {name: r["logs"] for name, r in results.items()}
    with gzip.open(out / "ablation_logs.json.gz", "wt") as f:
        json.dump(dict(seeds=list(seeds), arms=train_logs), f, separators=(",", ":"))
    pooled = {}  # the answered questions of every seed, after the last step
    for name, r in results.items():
        pairs = [(c, o) for e in r["evals"] for c, o in zip(e[train_config.steps]["confidence"],
                                                              e[train_config.steps]["correct"]) if c is not None]
        pooled[name] = ([c for c, _ in pairs], [o for _, o in pairs])
    figures = plots(report, pooled, train_logs, out)
    log("\n" + validity_text(report["validity"]) + "\n\n" + table(report) + "\n\n" + comparisons_text(report) + "\n\n"
        + signal_table(report) + "\n\n" + less_vs_more_text(report))
    log(f"\nwrote {out / 'ablation.json'} and {len(figures)} figures to {out}/ in {report['wall_s']:.0f} s")
    return report


# (arm, arm) pairs whose per-seed differences the report gives
COMPARISONS = (("hytuning", "mix"), ("hytuning", "rd"), ("hytuning_majority", "hytuning"),
               ("hytuning_majority", "mix"), ("rd_many", "rd"), ("mix", "rlif"), ("hytuning", "grpo_correct"))


PAIRED_METRICS = ("accuracy", "ece", "brier", "auroc", "mean_confidence")  # what paired() and holm() cover


def paired(a: list, b: list, resamples: int = 2000) -> dict:
    """Per metric, the differences a − b seed by seed: [mean, std], how many seeds have a > b
    (``wins``), a 95 % bootstrap interval of the mean (``ci95``: 2.5 and 97.5 percentiles over
    ``resamples`` resamples of the seeds) and the two-sided p-value of a sign-flip permutation
    test of mean 0 (``p``: exact over every sign pattern up to 12 seeds), over the seeds where
    both exist. Two machines whose kernels differ draw different seeds, so a difference that
    holds on most seeds is what a rerun elsewhere keeps."""
    out = {}
    rng = np.random.default_rng(0)
    for key in PAIRED_METRICS:
        d = np.array([x[key] - y[key] for x, y in zip(a, b) if x.get(key) is not None and y.get(key) is not None])
        if not d.size:
            out[key] = None
            continue
        boot = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1)
        if d.size <= 12:
            signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        else:
            signs = rng.choice([-1, 1], size=(4096, d.size))
        p = float(np.mean(np.abs((signs * d).mean(1)) >= abs(d.mean()) - 1e-12))
        out[key] = dict(mean_std=[float(d.mean()), float(d.std())], wins=int((d > 0).sum()), seeds=int(d.size),
                        ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))], p=p)
    return out


def holm(comparisons: dict) -> dict:
    """Adds ``p_holm`` to every metric of every comparison: Holm's step-down adjustment of the
    sign-flip p-values across the comparisons made, per metric (so "significant at 0.05" holds
    for the family, not for one comparison picked after looking)."""
    for key in PAIRED_METRICS:
        named = sorted(((c[key]["p"], name) for name, c in comparisons.items() if c.get(key)), key=lambda t: t[0])
        running = 0.0
        for rank, (p, name) in enumerate(named):
            running = max(running, min(1.0, (len(named) - rank) * p))
            comparisons[name][key]["p_holm"] = running
    return comparisons


# The testbed's own controls (issue 29), read on the validation split from the same trained
# models, before any test-split figure means anything: (name, rule, threshold)
GATES = (
    ("more_labels_help", "RD on 10x the traces beats RD on the few by >= 0.10 accuracy on >= 80 % of seeds", 0.10),
    ("few_traces_help", "RD on the few traces beats the base model by >= 0.03 accuracy (mean over seeds)", 0.03),
    ("labelled_reward_ceiling", "GRPO with the correctness reward beats the base model by >= 0.05 accuracy on "
                                ">= 80 % of seeds", 0.05),
    ("base_miscalibrated", "the base model's ECE is >= 0.08 (mean over seeds): there is miscalibration to fix", 0.08),
)


def validity(base: list, finals: dict, questions: int) -> dict:
    """The GATES from per-seed validation summaries: per gate its rule, the measured value, the
    share of seeds over the margin where the rule counts seeds, and ``passed`` (None where an arm
    it needs was not run); ``passed`` overall only when every gate ran and passed."""
    def diffs(a, b):  # rounded: 10 of 200 questions is a difference of exactly 0.05, not 0.0499999
        return np.array([round(x["accuracy"] - y["accuracy"], 9) for x, y in zip(a, b)])

    threshold = {name: t for name, _, t in GATES}
    measured = {}
    if "rd_many" in finals and "rd" in finals:
        d = diffs(finals["rd_many"], finals["rd"])
        measured["more_labels_help"] = (float(d.mean()), float((d >= threshold["more_labels_help"]).mean()))
    if "rd" in finals:
        measured["few_traces_help"] = (round(float(diffs(finals["rd"], base).mean()), 9), None)
    if "grpo_correct" in finals:
        d = diffs(finals["grpo_correct"], base)
        measured["labelled_reward_ceiling"] = (float(d.mean()),
                                               float((d >= threshold["labelled_reward_ceiling"]).mean()))
    eces = [s["ece"] for s in base if s.get("ece") is not None]
    if eces:
        measured["base_miscalibrated"] = (round(float(np.mean(eces)), 9), None)
    gates = {}
    for name, rule, _ in GATES:
        if name not in measured:
            gates[name] = dict(rule=rule, value=None, seed_share=None, passed=None)
            continue
        value, share = measured[name]
        ok = (share >= 0.8) if share is not None else value >= threshold[name]
        gates[name] = dict(rule=rule, value=value, seed_share=share, passed=bool(ok))
    return dict(split="val", questions=questions, seeds=len(base), gates=gates,
                passed=all(g["passed"] for g in gates.values()))


def validity_text(v: dict) -> str:
    lines = [f"validity gates (validation split, {v['questions']} questions, {v['seeds']} seeds):"]
    for g in v["gates"].values():
        mark = "n/a " if g["passed"] is None else ("PASS" if g["passed"] else "FAIL")
        value = "arm not run" if g["value"] is None else f"{g['value']:+.3f}" + (
            "" if g["seed_share"] is None else f", {g['seed_share']:.0%} of seeds over the margin")
        lines.append(f"  {mark} {g['rule']}: {value}")
    lines.append("the testbed passes its controls: the test-split figures below can tell a good method from a bad one"
                 if v["passed"] else "THE TESTBED FAILS ITS CONTROLS: the test-split figures below cannot tell a good "
                 "method from a bad one (issue 29); read them as a description of this testbed, not as evidence")
    return "\n".join(lines)


SIGNALS = (("prg_auroc", "prg_own"), ("prg_majority_auroc", "prg_majority"), ("self_certainty_auroc", "self_certainty"))


def prg_signal(logs: list, checkpoints: list, group: int = TrainConfig.group) -> dict:
    """How well each label-free score of a rollout predicts whether its answer is right: the AUROC
    for rollout correctness of PRG toward the rollout's own answer (``prg_auroc``, the default
    PRG), of PRG toward its group's majority answer (``prg_majority_auroc``) and of the
    self-certainty reward (``self_certainty_auroc``); pooled over every step and seed, per seed
    (mean ± std), and per checkpoint window (the steps since the previous checkpoint, seeds
    pooled). Also the mean of each PRG over correct rollouts, wrong rollouts and curated traces.
    ``logs``: per seed, the arm's per-step logs with their ``signal``.

    ``within_group_auroc``: the same three scores' AUROC within each query's group of ``group``
    rollouts (a step's rollouts, ``group`` consecutive per query), the comparison GRPO makes,
    with a 95 % bootstrap interval over groups (evaluate.within_group_auroc); every step and
    seed. The pooled figures beside it also measure question difficulty."""
    steps = [(i, step, log["signal"]) for i, seed_logs in enumerate(logs) for step, log in enumerate(seed_logs, 1)]

    def within(rows):
        ids = [(i, step, j // group) for i, step, sig in rows for j in range(len(sig["correct"]))]
        groups = np.unique(np.array(ids), axis=0, return_inverse=True)[1].reshape(-1) if ids else []
        correct = np.array([x for _, _, sig in rows for x in sig["correct"]], dtype=bool)
        return {key: within_group_auroc([x for _, _, sig in rows for x in sig[key]], correct, groups)
                for _, key in SIGNALS}

    def pool(rows):
        sig = {k: [x for _, _, s in rows for x in s[k]] for k in rows[0][2]} if rows else {}
        if not sig.get("correct"):
            return None
        correct = np.array(sig["correct"], dtype=bool)
        out = dict(rollouts=int(correct.size), correct_share=float(correct.mean()),
                   answered_share=float(np.mean(sig["answered"])))
        out.update({name: rank_auroc(sig[key], correct) for name, key in SIGNALS})
        for key in ("prg_own", "prg_majority"):
            v = np.array(sig[key])
            out[f"{key}_mean_correct"] = float(v[correct].mean()) if correct.any() else None
            out[f"{key}_mean_wrong"] = float(v[~correct].mean()) if (~correct).any() else None
        out["prg_traces_mean"] = float(np.mean(sig["prg_traces"])) if sig["prg_traces"] else None
        return out

    per_seed = [pool([r for r in steps if r[0] == i]) for i in range(len(logs))]
    spread = {}
    for name, _ in SIGNALS:
        v = [p[name] for p in per_seed if p and p[name] is not None]
        spread[name] = [float(np.mean(v)), float(np.std(v))] if v else None
    windows = [dict(steps=[a + 1, b], **(pool([r for r in steps if a < r[1] <= b]) or {}))
               for a, b in zip(checkpoints[:-1], checkpoints[1:])]
    return dict(within_group_auroc=within(steps) if steps else None, pooled=pool(steps), per_seed_mean_std=spread,
                per_seed=per_seed, per_checkpoint=windows)


def less_vs_more(report: dict) -> dict:
    """"Less approximates more": per arm that trains on the few curated traces plus unlabelled
    queries, how much of the accuracy gap between RD on the few traces (``rd``) and RD on 10× as
    many (``rd_many``) it closes. Per seed the gap (rd_many − rd) and the arm's gain (arm − rd);
    the share closed is the ratio of their means over seeds, ± its std over 2,000 bootstrap
    resamples of the seeds and its 95 % interval (their 2.5 and 97.5 percentiles; None where the
    mean gap is not positive). The share means something only where the validity gates passed."""
    arms = report["arms"]
    if "rd" not in arms or "rd_many" not in arms:
        return {}
    acc = {name: np.array([s["accuracy"] for s in a["final_per_seed"]]) for name, a in arms.items()}
    gap = acc["rd_many"] - acc["rd"]
    rng = np.random.default_rng(0)
    resamples = rng.integers(0, gap.size, size=(2000, gap.size))
    out = dict(gap=[float(gap.mean()), float(gap.std())], gap_positive_seeds=int((gap > 0).sum()), arms={})
    for name in ("hytuning", "hytuning_majority", "mix", "rlif"):
        if name not in acc:
            continue
        gain = acc[name] - acc["rd"]
        share = float(gain.mean() / gap.mean()) if gap.mean() > 0 else None
        boot = [gain[i].mean() / gap[i].mean() for i in resamples if gap[i].mean() > 0]
        out["arms"][name] = dict(gain_over_rd=[float(gain.mean()), float(gain.std())], share_closed=share,
                                 share_closed_std=float(np.std(boot)) if share is not None else None,
                                 share_closed_ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
                                 if share is not None and boot else None)
    return out


def table(report: dict) -> str:
    """The markdown table of the last step (mean ± std over seeds), the base model first."""
    cols = ("accuracy", "answered", "ece", "brier", "auroc", "aurc", "overconfidence_rate", "mean_confidence")
    head = "| arm | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]

    def mean_pm_std(ms):
        return "n/a" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"

    base = report["base"]["mean_std"]
    rows.append("| base model (warm-up) | " + " | ".join(mean_pm_std(base[c]) for c in cols) + " |")
    for a in report["arms"].values():
        rows.append(f"| {a['label']} | " + " | ".join(mean_pm_std(a["final"][c]) for c in cols) + " |")
    return "\n".join(rows)


def signal_table(report: dict) -> str:
    """The AUROC of each label-free score for rollout correctness, per arm that measures PRG:
    within each query's group (what GRPO compares) with its 95 % interval, and pooled."""
    rows = ["| arm | rollouts (correct) | AUROC | PRG, own answer | PRG, majority answer | self-certainty |",
            "|---|---|---|---|---|---|"]
    for name, sig in report["prg_signal"].items():
        p, within = sig["pooled"], sig["within_group_auroc"]
        if p is None:
            continue
        label = f"| {report['arms'][name]['label']} | {p['rollouts']} ({p['correct_share']:.3f}) |"
        cells = ["n/a" if within[key]["auroc"] is None else
                 f"{within[key]['auroc']:.3f} [{within[key]['ci95'][0]:.3f}, {within[key]['ci95'][1]:.3f}]"
                 for _, key in SIGNALS]
        rows.append(f"{label} within groups | " + " | ".join(cells) + " |")
        rows.append(f"{label} pooled | " + " | ".join(fmt(p[k]) for k, _ in SIGNALS) + " |")
    return ("AUROC for rollout correctness, every step and seed: within each query's group of rollouts (95 % "
            "bootstrap interval over groups), and pooled (which also measures question difficulty):\n"
            + "\n".join(rows))


def comparisons_text(report: dict) -> str:
    """Paired differences of accuracy and ECE between arms, with intervals and Holm-adjusted p."""
    rows = ["| comparison | accuracy: mean [95 % interval], p Holm | ECE: mean [95 % interval], p Holm |",
            "|---|---|---|"]
    for name, c in report["comparisons"].items():
        cells = ["n/a" if c.get(k) is None else f"{c[k]['mean_std'][0]:+.3f} [{c[k]['ci95'][0]:+.3f}, "
                 f"{c[k]['ci95'][1]:+.3f}], {c[k]['p_holm']:.3f}" for k in ("accuracy", "ece")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"paired by seed ({report['split']} split):\n" + "\n".join(rows)


def less_vs_more_text(report: dict) -> str:
    lvm = report["less_vs_more"]
    if not lvm:
        return ""
    lines = [f"less approximates more: RD on 10x the traces gains {lvm['gap'][0]:+.3f} ± {lvm['gap'][1]:.3f} accuracy "
             f"over RD on the few ({lvm['gap_positive_seeds']}/{len(report['seeds'])} seeds)"]
    for name, a in lvm["arms"].items():
        share = "n/a" if a["share_closed"] is None else (
            f"{a['share_closed']:.2f} ± {a['share_closed_std']:.2f} (95 % interval {a['share_closed_ci95'][0]:.2f} to "
            f"{a['share_closed_ci95'][1]:.2f})")
        lines.append(f"  {report['arms'][name]['label']}: {a['gain_over_rd'][0]:+.3f} ± {a['gain_over_rd'][1]:.3f} "
                     f"over RD on the few; share of the gap closed {share}")
    return "\n".join(lines)


def plots(report: dict, pooled: dict, train_logs: dict, out: Path) -> list:
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
    if "hytuning" in report["arms"]:
        paths.append(prg_plot(report, train_logs["hytuning"], out / "ablation_prg.png"))
    for name, (conf, correct) in pooled.items():
        if not conf:
            continue
        path = out / f"ablation_reliability_{name}.png"
        metrics.reliability_diagram(conf, correct, path, title=f"{report['arms'][name]['label']}, "
                                    f"step {report['train']['steps']}, seeds pooled")
        paths.append(path)
    return paths


def prg_plot(report: dict, train_log: list, path: Path) -> Path:
    """Histograms of the HyTuning arm's PRG (toward each rollout's own answer, and toward its
    group's majority answer) for correct rollouts, wrong rollouts and curated traces, every step
    and seed pooled."""
    from matplotlib.figure import Figure

    logs = [log["signal"] for seed_logs in train_log for log in seed_logs]
    correct = np.array([x for s in logs for x in s["correct"]], dtype=bool)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    bins = np.linspace(0, 1, 26)
    pooled = report["prg_signal"]["hytuning"]["pooled"]
    for ax, (key, title, auroc) in zip(fig.subplots(1, 2), (
            ("prg_own", "PRG toward the rollout's own answer (default)", pooled["prg_auroc"]),
            ("prg_majority", "PRG toward the group's majority answer", pooled["prg_majority_auroc"]))):
        v = np.array([x for s in logs for x in s[key]])
        traces = np.array([x for s in logs for x in s["prg_traces"]])
        for values, what, style in ((v[correct], "correct rollouts", dict(alpha=0.5)),
                                    (v[~correct], "wrong rollouts", dict(alpha=0.5)),
                                    (traces, "curated traces", dict(histtype="step", color="k"))):
            if values.size:  # a density of nothing is undefined
                ax.hist(values, bins=bins, density=True, label=f"{what} ({values.size})", **style)
        ax.set(xlabel="PRG", ylabel="density", title=f"{title}\nAUROC for correctness {fmt(auroc)}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"HyTuning arm, every step and seed ({len(report['seeds'])})", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hykernels experiment", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return from_args(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (0, 1, ...)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="post-training steps per arm")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluate on the held-out test set (reported) or the validation set (for choosing settings)")
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 steps, a short warm-up, 24 questions")
    p.add_argument("--check", metavar="ABLATION_JSON",
                   help="only rerun the short fingerprint (about 20 s: a short warm-up, its evaluation and every arm's "
                        "first steps) and compare it with the one in ABLATION_JSON "
                        "(e.g. experiments/results/ablation.json): exit 0 when this machine and code compute what "
                        "that run computed, within the fingerprint's tolerance, 1 when not")


def check(path: str, log=print) -> int:
    """--check: this machine's fingerprint against the one stored in an ablation.json."""
    try:
        want = json.loads(Path(path).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--check: {path}: expected an ablation.json with a 'fingerprint' ({type(e).__name__}: {e})")
    got = fingerprint()
    ok, (name, a, b, rel) = compare(got, want)
    rtol, atol = TOLERANCE
    log(f"fingerprint {'matches' if ok else 'DIFFERS'}: worst {name}: {a} here, {b} in {path} (relative difference "
        f"{rel:.1e}; tolerance rtol {rtol:g}, atol {atol:g})")
    if not ok:
        log("this machine or code does not compute what that run computed: its numbers are not expected to come back "
            "seed by seed (environment: " + json.dumps(environment()) + ")")
    return 0 if ok else 1


def from_args(args) -> int:
    if args.check:
        return check(args.check)
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
