"""The markdown tables of docs/experiment.md's Results, from the committed run and its AVX2 rerun:
`python experiments/evidence_tables.py` (after `python -m hykernels experiment` and the rerun)
prints them, so the document's figures are the JSON's, not typed by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hykernels.apps.experiment.run import fmt  # noqa: E402
RUNS = (ROOT / "experiments/results/ablation.json", ROOT / "experiments/results/rerun-avx2/ablation.json")


def pm(ms) -> str:
    return "n/a" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def gates(runs) -> str:
    rows = ["| gate (validation split) | committed | AVX2 rerun |", "|---|---|---|"]
    for name, g in runs[0]["validity"]["gates"].items():
        cells = []
        for r in runs:
            x = r["validity"]["gates"][name]
            share = "" if x["seed_share"] is None else f", {x['seed_share']:.0%} of seeds"
            verdict = "n/a" if x["passed"] is None else ("pass" if x["passed"] else "**fail**")
            cells.append("arm not run" if x["value"] is None else f"{x['value']:+.3f}{share}: {verdict}")
        rows.append(f"| {g['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def results(runs) -> str:
    keys = ("accuracy", "ece", "brier", "mean_confidence")
    head = " | ".join(keys) + " | " + " | ".join(f"{k}, AVX2 rerun" for k in keys)
    rows = [f"| arm | {head} |", "|---" * (2 * len(keys) + 1) + "|"]
    c, r = runs
    lines = [("base model (warm-up)", c["base"]["mean_std"], r["base"]["mean_std"])]
    lines += [(a["label"], a["final"], r["arms"][n]["final"]) for n, a in c["arms"].items()]
    for label, x, y in lines:
        rows.append(f"| {label} | " + " | ".join(pm(x[k]) for k in keys) + " | "
                    + " | ".join(pm(y[k]) for k in keys) + " |")
    return "\n".join(rows)


def paired_cell(d) -> str:
    if d is None:
        return "n/a"
    return (f"{d['mean_std'][0]:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['wins']}/{d['seeds']})"
            + (f", p Holm {d['p_holm']:.3f}" if "p_holm" in d else ""))


def comparisons(runs) -> str:
    rows = ["| comparison | accuracy | accuracy, AVX2 rerun | ECE | ECE, AVX2 rerun |", "|---|---|---|---|---|"]
    c, r = runs
    for n, a in c["arms"].items():
        rows.append(f"| {a['label']} − base model | " + " | ".join(
            paired_cell(run["arms"][n]["change_from_base"][k]) for k in ("accuracy", "ece") for run in (c, r)) + " |")
    for name in c["comparisons"]:
        rows.append(f"| {name} | " + " | ".join(
            paired_cell(run["comparisons"][name][k]) for k in ("accuracy", "ece") for run in (c, r)) + " |")
    return "\n".join(rows)


def signal(runs) -> str:
    keys = (("prg_own", "prg_auroc"), ("prg_majority", "prg_majority_auroc"), ("self_certainty", "self_certainty_auroc"))
    rows = ["| arm | run | rollouts (share correct) | PRG, own answer | PRG, majority answer | self-certainty |",
            "|---|---|---|---|---|---|"]
    for run_name, run in zip(("committed", "AVX2 rerun"), runs):
        for n, s in run["prg_signal"].items():
            p, w = s["pooled"], s["within_group_auroc"]
            cells = [("n/a" if w[k]["auroc"] is None else
                      f"{w[k]['auroc']:.3f} [{w[k]['ci95'][0]:.3f}, {w[k]['ci95'][1]:.3f}]") + f"; pooled {fmt(p[pk])}"
                     for k, pk in keys]
            rows.append(f"| {run['arms'][n]['label']} | {run_name} | {p['rollouts']} ({p['correct_share']:.3f}) | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def prg_spread(runs) -> str:
    rows = []
    for run_name, run in zip(("committed", "AVX2 rerun"), runs):
        p = run["prg_signal"]["hytuning"]["pooled"]
        rows.append(f"- {run_name}: PRG toward the rollout's own answer, mean {fmt(p['prg_own_mean_correct'])} on right "
                    f"rollouts and {fmt(p['prg_own_mean_wrong'])} on wrong ones; curated traces {fmt(p['prg_traces_mean'])}")
    return "\n".join(rows)


def gap(runs) -> str:
    rows = []
    for run_name, run in zip(("committed", "AVX2 rerun"), runs):
        lvm = run["less_vs_more"]
        rows.append(f"- {run_name}: RD on 10× the traces − RD on the few {pm(lvm['gap'])} "
                    f"({lvm['gap_positive_seeds']}/{len(run['seeds'])} seeds)")
        for n, a in lvm["arms"].items():
            share = "n/a" if a["share_closed"] is None else (
                f"{a['share_closed']:.2f} [{a['share_closed_ci95'][0]:.2f}, {a['share_closed_ci95'][1]:.2f}]")
            rows.append(f"  - {run['arms'][n]['label']}: {pm(a['gain_over_rd'])} over RD on the few; share closed {share}")
    return "\n".join(rows)


def main() -> int:
    runs = [json.loads(p.read_text()) for p in RUNS]
    for title, text in (("validity", gates(runs)), ("results", results(runs)), ("paired", comparisons(runs)),
                        ("signal", signal(runs)), ("prg means", prg_spread(runs)), ("gap", gap(runs))):
        print(f"<!-- {title} -->\n{text}\n")
    for run_name, run in zip(("committed", "AVX2 rerun"), runs):
        base = [s["accuracy"] for s in run["base"]["per_seed"]]
        print(f"{run_name}: base accuracy per seed {', '.join(f'{b:.3f}' for b in base)}; "
              f"wall {run['wall_s']:.0f} s; commit {run['environment']['commit']}; "
              f"uncommitted {run['environment']['uncommitted_changes']}; median base {np.median(base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
