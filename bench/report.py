"""What bench/run.py writes: the JSON report, the markdown table, the plot, and merging runs.

``new_report`` starts the report (device, versions, exact command, config, how things were
measured); run.py adds each result as it arrives and calls ``save`` after every one (an atomic
rewrite of the JSON, ``"complete": false`` until the run ends), so a run that is killed keeps
everything that finished. ``emit`` ends a run: the plot beside the JSON (time and memory against
N, one line per implementation; needs matplotlib), the final JSON, the skips and the markdown
table, printed last. ``merge`` joins several runs' JSON into one report.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path

import _common
from measure import TOLERANCE
from peers import IMPLS
from roofline import case_key


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_report(config: dict, cases: list[dict], impls: list[str]) -> dict:
    span = config.get("prg_answer_len", 4)
    return {
        "benchmark": "hykernels lm_head: side-by-side with the reference and the peers (bench/run.py)",
        "date": _dt.date.today().isoformat(),
        "timestamp_utc": now_utc(),
        "complete": False,
        "progress": None,
        "command": shlex.join([sys.executable] + sys.argv),
        "argv": sys.argv,
        "device_name": config["device"],
        "device": {"kind": config["device"]},
        "versions": {**_common.versions("liger-kernel", "cut-cross-entropy", "matplotlib", "transformers"),
                     "hykernels_commit": _common.git_commit()},
        "config": config,
        "ceiling": {},
        "implementations": {n: {"description": IMPLS[n].description, "workloads": list(IMPLS[n].workloads),
                                "grads_formed_in": IMPLS[n].grads} for n in impls},
        "workloads": {
            "ce": "loss = mean CE over non-ignored tokens (~10% rows ignore_index=-100); hykernels: "
                  "fused_loss(rd_weight=1/T)",
            "token_stats": "loss = Σ a_t·(−logp_t) + b_t·entropy_t, a, b ~ (U(0,1)+0.1)/T on rows with a target",
            "rd_rlif": "loss = Σ r_t·(−logp_t) + s_t·(−min(ρ_t·A_t, clip(ρ_t, 0.8, 1.2)·A_t)), ρ ≡ 1 with gradient, "
                       "r, s ~ (U(0,1)+0.1)/T on rows with a target, A ~ randn; hykernels: "
                       "fused_loss(rd_weight=r, rlif_weight=s, advantages=A)",
            "prg": f"answer_span_logprobs(reduce='mean') over N answer rows in spans of {span} "
                   f"(N = traces·(K+1)·{span}, K = {config.get('prg_steps')}); loss = Σ g_s·c_s, g ~ randn",
            "inputs": "hidden ~ randn[N, D], weight ~ randn[V, D]/sqrt(D), targets ~ U[0, V); fresh per case and "
                      "input set from the recorded seed",
        },
        "timing": ("GPU: CUDA events around forward and backward; CPU: wall clock. Warm-up first (the first "
                   "warm-up's outputs are the ones checked; first_step_ms includes any compiling), then repeats "
                   "rotating over input_sets sets of inputs; median reported; total = median of per-repeat "
                   "fwd+bwd. Gradients are set to None before each repeat. "
                   + ("Each (implementation, case) runs in a fresh process" if config.get("isolate") == "case"
                      else "One process per implementation")),
        "memory": ("measured on the first timed repeat: peak_extra_bytes = peak above what was allocated "
                   "before it (all input sets); peak_above_io_bytes = that minus io_bytes (the gradients and "
                   "the outputs, which any implementation must hold), docs/math.md §8"),
        "correctness": {"method": "each implementation's loss, per-token outputs (rows with a target) and "
                                  "gradients (projected on 8 fixed random directions) against an fp32 reference "
                                  "(fp64 for fp64 inputs) computed chunk by chunk in the same run on the same "
                                  "inputs: ok when every ‖got − ref‖/‖ref‖ ≤ the dtype's tolerance",
                        "tolerance": TOLERANCE},
        "cases": cases,
        "results": [],
    }


# --------------------------------------------------------------------------------------------
# derived fields, saving
# --------------------------------------------------------------------------------------------

def annotate(report: dict) -> None:
    """Fill in what follows from the rows: case fields, efficiency against the matmul, the ratios
    to the baseline implementation and its targets (config "baseline", "targets")."""
    cases = {c["id"]: c for c in report["cases"]}
    mm = (report.get("ceiling") or {}).get("matmul")
    on_gpu = report["device"].get("kind") == "cuda"
    model = {case_key(e): e for e in (report.get("roofline") or {}).get("cases", [])}
    for r in report["results"]:
        c = cases[r["case"]]
        r.update({k: c[k] for k in ("workload", "model", "D", "V", "N", "dtype")})
        if r["status"] == "ok" and mm and r.get("useful_tflops") is not None and "efficiency" not in r:
            r["efficiency"] = r["useful_tflops"] / mm["tflops"]  # merged parts keep their own
        m = model.get(case_key(c))
        if on_gpu and m and r["impl"] == "hk_triton" and r["status"] == "ok" and r.get("total_ms"):
            r["roofline"] = {k: m[k] for k in ("fwd_ms", "bwd_ms", "total_ms", "ideal_ms")}
            r["roofline"]["measured_over_roofline"] = r["total_ms"] / m["total_ms"]
    base, targets = report["config"].get("baseline"), report["config"].get("targets") or {}
    pairs = report["config"].get("pairs") or {}
    if not base and not pairs:
        return
    ok = {(r["impl"], r["case"]): r for r in report["results"] if r["status"] == "ok"}
    met = []
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        # vs_baseline: against the baseline; vs_pair: against the impl it is paired with (same
        # design: gradients formed in forward, or recomputed in backward). With pairs configured,
        # targets judge the pairs only (a peer's own ratio to the baseline is information, not a goal).
        for key, other in (("vs_baseline", base), ("vs_pair", pairs.get(r["impl"]))):
            b = ok.get((other, r["case"]))
            if not other or b is None or other == r["impl"]:
                continue
            vs = {"impl": other, "time": r["total_ms"] / b["total_ms"],
                  "peak_memory": (r["peak_extra_bytes"] / b["peak_extra_bytes"]) if b.get("peak_extra_bytes", 0) > 0
                  else None}
            if key == "vs_pair" or not pairs:
                if "time_ratio_max" in targets:
                    vs["time_target_met"] = vs["time"] <= targets["time_ratio_max"]
                    met.append(vs["time_target_met"])
                if "peak_memory_ratio_max" in targets:
                    vs["memory_target_met"] = (vs["peak_memory"] is not None
                                               and vs["peak_memory"] <= targets["peak_memory_ratio_max"])
                    met.append(vs["memory_target_met"])
            r[key] = vs
    if targets:
        report["all_targets_met"] = bool(met) and all(met)


def save(report: dict, out: Path) -> None:
    """Rewrite the JSON atomically (a reader, or a kill, never sees half a file)."""
    annotate(report)
    report["machine_busy_warning"] = busy_warning(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)


def emit(report: dict, out: Path, no_plot: bool = False, strict: bool = False) -> int:
    """The end of a run: the plot beside the JSON, the final JSON, the skips and the markdown
    table (printed last). Returns the exit status (1 with ``strict`` when a result is WRONG or errored)."""
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    annotate(report)
    png = out.with_suffix(".png")
    why_not = None if no_plot else plot(report, png)
    report["plot"] = None if (no_plot or why_not) else png.name  # beside the JSON
    report["plot_skipped"] = "--no-plot" if no_plot else why_not
    save(report, out)
    log(f"wrote {out}")
    log(f"wrote {png}" if report["plot"] else f"no plot: {report['plot_skipped']}")
    for line in skipped_summary(report):
        print(line)
    if report.get("interrupted"):
        print(f"INTERRUPTED: {report['interrupted']} (the results above are the ones that finished)")
    if report["machine_busy_warning"]:
        print("WARNING: " + report["machine_busy_warning"])
    print(markdown_table(report), flush=True)
    bad = [r for r in report["results"]
           if r["status"] in ("error", "oom") or (r.get("correctness") and not r["correctness"]["ok"])]
    return 1 if (strict and bad) else 0


# --------------------------------------------------------------------------------------------
# the table, the skips, the load warning
# --------------------------------------------------------------------------------------------

def _fmt_ms(t):
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def _correct_cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    c = r.get("correctness")
    if not c:
        return "unchecked"
    if c["ok"]:
        return "ok"
    return f"**WRONG** ({c['worst_output']})"


def markdown_table(report: dict) -> str:
    ceil = report.get("ceiling", {}).get("matmul")
    base = report["config"].get("baseline")
    head = (f"lm_head bench on {report['device_name']}: median of repeats, ms; peak = MiB above inputs, outputs "
            f"and gradients; TFLOP/s = 6·N·D·V / (fwd+bwd)")
    if ceil:
        head += f"; eff = vs {ceil['dtype']} {ceil['size']}³ matmul ({ceil['tflops']:.3g} TFLOP/s, this run)"
    if base:
        head += f"; ×{base} = time and peak (inputs excluded, outputs and gradients included) over {base}'s"
    cols = ["workload", "model", "dtype", "N", "impl", "grads in", "fwd ms", "bwd ms", "fwd+bwd ms", "peak MiB",
            "TFLOP/s", "eff %", "max rel err", "correct"]
    align = ["---", "---", "---", "---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"]
    if base:
        cols += [f"time ×{base}", f"mem ×{base}"]
        align += ["---:", "---:"]
    pairs = report["config"].get("pairs") or {}
    if pairs:
        head += "; ×pair = the same over the implementation of the same design (vs column)"
        cols += ["time ×pair", "mem ×pair", "vs"]
        align += ["---:", "---:", "---"]
    roof = any(r.get("roofline") for r in report["results"])
    if roof:
        head += "; ×roofline = fwd+bwd over bench/roofline.py's time for hk_triton (roofline ms)"
        cols.append("×roofline")
        align.append("---:")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    for r in report["results"]:
        if r["status"] == "skipped":
            continue
        c = r.get("correctness") or {}
        err = c.get("max_rel_err")
        eff = r.get("efficiency")
        cells = [r["workload"], r["model"], r["dtype"], str(r["N"]), r["impl"], r.get("grads_formed_in") or "-",
                 _fmt_ms(r.get("fwd_ms")), _fmt_ms(r.get("bwd_ms")), _fmt_ms(r.get("total_ms")),
                 _common.fmt_mib(r.get("peak_above_io_bytes")),
                 "-" if r.get("useful_tflops") is None else format(r["useful_tflops"], ".3g"),
                 "-" if eff is None else format(100 * eff, ".3g"), "-" if err is None else format(err, ".1e"),
                 _correct_cell(r)]
        for field, on in (("vs_baseline", base), ("vs_pair", pairs)):
            if not on:
                continue
            vs = r.get(field) or {}
            for key, met in (("time", "time_target_met"), ("peak_memory", "memory_target_met")):
                cells.append("-" if vs.get(key) is None else
                             f"{vs[key]:.2f}" + ("" if vs.get(met, True) else " (MISSED)"))
            if field == "vs_pair":
                cells.append(vs.get("impl", "-"))
        if roof:
            m = r.get("roofline")
            cells.append(f"{m['measured_over_roofline']:.2f} ({_fmt_ms(m['total_ms'])})" if m else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skipped_summary(report: dict) -> list[str]:
    by = {}
    for r in report["results"]:
        if r["status"] == "skipped":
            by.setdefault((r["impl"], r["reason"]), []).append(r)
    out = []
    for (impl, reason), rows in by.items():
        out.append(f"skipped {impl} ({len(rows)} case{'s' if len(rows) > 1 else ''}): {reason}")
    return out


def busy_warning(report: dict) -> str | None:
    """CPU timings are only as good as the machine is quiet: a 1-min load average above the
    worker's threads (+0.75) after a worker means other processes competed for the cores."""
    if report["device"].get("kind") != "cpu":
        return None
    threads = report["device"].get("torch_num_threads") or 1
    busy = sorted({r["impl"] for r in report["results"]
                   if r.get("loadavg_after") and r["loadavg_after"][0] > threads + 0.75})
    if not busy:
        return None
    worst = max(r["loadavg_after"][0] for r in report["results"] if r.get("loadavg_after"))
    return (f"machine busy: 1-min load average up to {worst} on {threads} threads during {', '.join(busy)}; "
            "those timings are inflated")


# --------------------------------------------------------------------------------------------
# the plot
# --------------------------------------------------------------------------------------------

def _shape(report, model):
    for c in report["cases"]:
        if c["model"] == model:
            return c["D"], c["V"]
    return None, None


def plot(report: dict, path: Path) -> str | None:
    """Time and memory against N, one line per implementation, a row of panels per
    (workload, model, dtype). Returns None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        return f"matplotlib not installed ({exc}): pip install hykernels[bench]"
    groups = {}
    for r in report["results"]:
        if r["status"] == "ok" and r.get("total_ms") is not None:
            groups.setdefault((r["workload"], r["model"], r["dtype"]), {}).setdefault(r["impl"], []).append(r)
    if not groups:
        return "no measured results to plot"
    order = list(report["config"]["impls"])
    colors = {name: f"C{i}" for i, name in enumerate(order)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    plain = FuncFormatter(lambda val, _: f"{val:g}")
    for row, ((wl, model, dtype), impls) in enumerate(groups.items()):  # in case order
        ax_t, ax_m = axes[row]
        for name in sorted(impls, key=lambda n: order.index(n) if n in order else 99):
            rs = sorted(impls[name], key=lambda r: r["N"])
            ns = [r["N"] for r in rs]
            wrong = any(r.get("correctness") and not r["correctness"]["ok"] for r in rs)
            style = dict(color=colors.get(name), marker="o", linestyle="--" if wrong else "-",
                         label=name + (" (WRONG)" if wrong else ""))
            ax_t.plot(ns, [r["total_ms"] for r in rs], **style)
            mem = [max(r["peak_above_io_bytes"] / 2**20, 0.01) for r in rs]  # log axis: floor 0.01 MiB
            ax_m.plot(ns, mem, **style)
        d, v = _shape(report, model)
        all_n = sorted({r["N"] for rs in impls.values() for r in rs})
        for ax, ylab in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak MiB above inputs/outputs/grads")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(all_n)
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(plain)
            ax.set_xlabel("N (rows)" if wl != "prg" else "N (answer rows)")
            ax.set_ylabel(ylab)
            ax.set_title(f"{wl} | {model} (D={d}, V={v}) | {dtype}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(f"hykernels bench: {report['device_name']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# merging runs
# --------------------------------------------------------------------------------------------

def merge(files: list[str], out: Path, no_plot: bool = False, strict: bool = False) -> int:
    """One report from several runs' JSON (e.g. a GPU matrix split over several calls, or a run
    cut short by a timeout and its rest): cases and results concatenated, each part keeping its
    own ceiling and efficiency; table and plot redone."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    report = dict(parts[0])
    cases, results, impls = [], [], []
    for part in parts:
        remap = {}
        for c in part["cases"]:
            remap[c["id"]] = len(cases)
            cases.append(dict(c, id=len(cases)))
        results += [dict(r, case=remap[r["case"]]) for r in part["results"]]
        impls += [i for i in part["config"]["impls"] if i not in impls]
    roofs = [e for p in parts for e in (p.get("roofline") or {}).get("cases", [])]
    if roofs:
        report["roofline"] = dict(next(p["roofline"] for p in parts if p.get("roofline")),
                                  cases=list({case_key(e): e for e in roofs}.values()))
    report.update(cases=cases, results=results, config=dict(parts[0]["config"], impls=impls),
                  command=shlex.join([sys.executable] + sys.argv), argv=sys.argv, timestamp_utc=now_utc(),
                  complete=all(p.get("complete", True) for p in parts), interrupted=None,
                  merged_from=[{"file": str(f), "command": p["command"], "timestamp_utc": p["timestamp_utc"],
                                "complete": p.get("complete", True), "ceiling": p.get("ceiling"),
                                "config": p["config"]} for f, p in zip(files, parts)])
    names = {p["device_name"] for p in parts}
    if len(names) > 1:
        report["device_name"] = " + ".join(sorted(names))
    return emit(report, out, no_plot, strict)
