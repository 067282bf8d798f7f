#!/usr/bin/env python
"""CPU benchmark: hykernels backends ``reference`` vs ``torch_chunked``.

Two workloads per backend, forward and backward timed separately (wall clock, CPU ops are
synchronous):

  token_stats  token_stats(...) then loss = Σ_t (a_t·logp_t + b_t·entropy_t + c_t·self_certainty_t)
               with random per-token a, b, c (non-uniform); backward recomputes logits tiles.
  fused_loss   fused_loss(..., rd_weight=random > 0, rlif_weight, advantages=random); the
               gradients are formed in the forward pass, backward only scales them.

Both use the same random inputs (hidden ~ randn, weight ~ randn/sqrt(D), targets uniform with
~10% ignore_index = -100 rows), regenerated bit-identically in every worker from one random seed.

Each (backend, workload) runs in a fresh subprocess (``--worker``) so peak memory can be read
from the kernel: after the inputs exist the RSS high-water mark is reset (``5`` written to
/proc/self/clear_refs), VmRSS is read as the baseline, one forward+backward runs, and
peak_extra_bytes = VmHWM - baseline. That run is untimed and doubles as the warm-up for the
timed repeats that follow in the same process (median over --repeats). Its outputs (loss,
statistics, gradients) are saved so the parent can check torch_chunked against reference.

Usage:  python bench/bench_cpu.py [--n 8192 --d 1024 --v 32768 --dtype float32 --repeats 3]
Writes bench/results/cpu-<YYYY-MM-DD>.json (or --out) and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import hykernels  # noqa: E402
from hykernels.backends import torch_chunked as _torch_chunked  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HostPeak, cpu_device_info, loadavg, trim_malloc, versions  # noqa: E402
from _common import fmt_mib as _mib, fmt_sec as _sec  # noqa: E402

BACKENDS = ("reference", "torch_chunked")
WORKLOADS = ("token_stats", "fused_loss")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.10
# The acceptance targets for torch_chunked relative to reference.
TARGETS = {"peak_memory_ratio_max": 0.25, "time_ratio_max": 1.5}
# Agreement tolerance on max|chunked - reference| / max|reference|, per dtype.
AGREE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
STAT_FIELDS = ("logp", "entropy", "self_certainty", "confidence", "lse")


# --------------------------------------------------------------------------------------------
# inputs and one forward+backward
# --------------------------------------------------------------------------------------------

def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int) -> dict:
    """Deterministic in (shape, dtype, seed): every worker rebuilds identical tensors."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float32) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < IGNORE_FRACTION
    targets[ignored] = IGNORE_INDEX
    f32 = dict(generator=g, dtype=torch.float32)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        # token_stats loss weights: non-uniform, signed, per token
        "w_logp": torch.randn(n, **f32),
        "w_entropy": torch.randn(n, **f32),
        "w_sc": torch.randn(n, **f32),
        # fused_loss terms (normalised like a token mean so the loss is O(1))
        "rd_weight": (torch.rand(n, **f32) + 0.1) / n,
        "rlif_weight": (torch.rand(n, **f32) + 0.1) / n,
        "advantages": torch.randn(n, **f32),
    }


def run_forward(workload: str, backend: str, x: dict):
    """Returns (scalar loss, TokenStats)."""
    if workload == "token_stats":
        st = hykernels.token_stats(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                   backend=backend)
        loss = (x["w_logp"] * st.logp + x["w_entropy"] * st.entropy + x["w_sc"] * st.self_certainty).sum()
        return loss, st
    loss, st = hykernels.fused_loss(x["hidden"], x["weight"], x["targets"], rd_weight=x["rd_weight"],
                                    rlif_weight=x["rlif_weight"], advantages=x["advantages"],
                                    ignore_index=IGNORE_INDEX, backend=backend)
    return loss, st


def clear_grads(x: dict) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None


# --------------------------------------------------------------------------------------------
# worker: one (backend, workload) in a fresh process
# --------------------------------------------------------------------------------------------

def worker(args) -> None:
    backend, workload = args.worker
    dtype = DTYPES[args.dtype]

    # Initialise lazily loaded libraries (BLAS, autograd engine, hykernels backend) at a toy
    # shape so their one-off allocations are not charged to the measured run.
    toy = make_inputs(32, 16, 97, dtype, args.seed + 1)
    loss, _ = run_forward(workload, backend, toy)
    loss.backward()
    del toy, loss, _

    x = make_inputs(args.n, args.d, args.v, dtype, args.seed)
    gc.collect()
    trim_malloc()

    # ---- memory run (untimed; also the warm-up for the timed repeats) ----
    peak = HostPeak()
    peak.start()
    t0 = time.perf_counter()
    loss, st = run_forward(workload, backend, x)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak_extra = peak.stop()
    mem = {
        "peak_extra_bytes": peak_extra,
        "baseline_rss_bytes": peak.baseline_kib * 1024,
        "peak_rss_bytes": peak.peak_kib * 1024,
        "method": peak.method,
        "clear_refs_ok": peak.clear_refs_ok,
        "memory_run_fwd_s": t1 - t0,
        "memory_run_bwd_s": t2 - t1,
    }

    # Save the outputs of that run for the parent's correctness check.
    out = {"loss": loss.detach().double().reshape(())}
    for name in STAT_FIELDS:
        out[name] = getattr(st, name).detach()
    out["argmax"] = st.argmax.detach()
    out["grad_hidden"] = x["hidden"].grad
    out["grad_weight"] = x["weight"].grad
    torch.save(out, args.outputs_file)
    del out, loss, st
    clear_grads(x)
    gc.collect()

    # ---- timed repeats ----
    fwd, bwd, cpu = [], [], []
    for _ in range(args.repeats):
        clear_grads(x)
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss, st = run_forward(workload, backend, x)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        cpu.append(time.process_time() - c0)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        del loss, st
    clear_grads(x)
    tot = [a + b for a, b in zip(fwd, bwd)]
    result = {
        "backend": backend,
        "workload": workload,
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "total_s": statistics.median(tot),
        "fwd_s_all": fwd,
        "bwd_s_all": bwd,
        "total_s_all": tot,
        "process_cpu_s_all": cpu,
        "torch_num_threads": torch.get_num_threads(),
        **mem,
    }
    Path(args.result_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------

def _busy_warning(results) -> str | None:
    """A worker keeps ~torch_num_threads runnable; a 1-min load average well above that after a
    worker means other processes competed for the cores and the timings are inflated."""
    busy = []
    for r in results:
        la = r.get("loadavg_after")
        if la and la[0] > r["torch_num_threads"] + 0.75:
            busy.append(f"{r['backend']}/{r['workload']} (1-min load {la[0]} vs {r['torch_num_threads']} threads)")
    return ("other load during: " + "; ".join(busy)) if busy else None


def compare(ref: dict, got: dict, dtype: torch.dtype) -> dict:
    """max|got - ref| per output, plus a scaled agreement flag."""
    tol = AGREE_TOL[dtype]
    fields = {}
    ok = True
    for name, r in ref.items():
        g = got[name]
        if name == "argmax":
            fields[name] = {"mismatches": int((g != r).sum()), "rows": int(r.numel())}
            continue
        if r is None or g is None:
            fields[name] = {"max_abs_diff": None}
            ok = ok and (r is None and g is None)
            continue
        r64, g64 = r.double(), g.double()
        diff = float((g64 - r64).abs().max())
        ref_max = float(r64.abs().max())
        rel = diff / ref_max if ref_max > 0 else diff
        agree = rel <= tol
        ok = ok and agree
        fields[name] = {"max_abs_diff": diff, "max_abs_ref": ref_max, "rel_to_max_abs_ref": rel,
                        "agree": agree}
    return {"tolerance": f"max_abs_diff <= {tol:g} * max|reference| (per output)", "all_agree": ok,
            "fields": fields}


def markdown_table(report: dict) -> str:
    lines = [
        f"CPU bench: N={report['shape']['N']} D={report['shape']['D']} V={report['shape']['V']} "
        f"{report['dtype']}, median of {report['repeats']} (device: {report['device']['lscpu_model_name']}, "
        f"{report['device']['torch_num_threads']} threads)",
        "",
        "| backend | workload | fwd s | bwd s | total s | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['backend']} | {r['workload']} | {_sec(r['fwd_s'])} | {_sec(r['bwd_s'])} | "
                     f"{_sec(r['total_s'])} | {_mib(r['peak_extra_bytes'])} |")
    if report.get("ratios"):
        lines += ["", "| workload | time ratio (chunked/ref) | target <= 1.5 | peak mem ratio | target <= 0.25 "
                      "| chunked agrees with ref |",
                  "|---|---:|---|---:|---|---|"]
        for wl, r in report["ratios"].items():
            corr = report["correctness"].get(wl, {})
            lines.append(f"| {wl} | {r['total_time']:.3f} | {'met' if r['time_target_met'] else 'MISSED'} | "
                         f"{r['peak_memory']:.3f} | {'met' if r['memory_target_met'] else 'MISSED'} | "
                         f"{corr.get('all_agree', 'n/a')} |")
    return "\n".join(lines)


def parent(args) -> dict:
    dtype = DTYPES[args.dtype]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    esize = torch.empty((), dtype=dtype).element_size()
    n, d, v = args.n, args.d, args.v
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-{_dt.date.today().isoformat()}.json"
    script = str(Path(__file__).resolve())

    results, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="hykernels-bench-") as tmp:
        for workload in WORKLOADS:
            for backend in args.backends:
                res_file = Path(tmp) / f"{backend}-{workload}.json"
                out_file = Path(tmp) / f"{backend}-{workload}.pt"
                cmd = [sys.executable, script, "--worker", backend, workload, "--n", str(n), "--d", str(d),
                       "--v", str(v), "--dtype", args.dtype, "--repeats", str(args.repeats), "--seed", str(seed),
                       "--result-file", str(res_file), "--outputs-file", str(out_file)]
                print(f"[bench] {backend} / {workload} ...", file=sys.stderr, flush=True)
                load_before = loadavg()
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker {backend}/{workload} failed (rc={proc.returncode}):\n"
                                       f"{proc.stdout}\n{proc.stderr}")
                res = json.loads(res_file.read_text())
                res["worker_wall_s"] = time.perf_counter() - t0
                res["loadavg_before"], res["loadavg_after"] = load_before, loadavg()
                print(f"[bench]   total {res['total_s']:.2f}s, peak extra {_mib(res['peak_extra_bytes'])} MiB "
                      f"(worker {res['worker_wall_s']:.0f}s)", file=sys.stderr, flush=True)
                results.append(res)
                outputs[(backend, workload)] = out_file
        # correctness: torch_chunked vs reference on the same inputs (the memory runs' outputs)
        correctness = {}
        for workload in WORKLOADS:
            if ("reference", workload) in outputs:
                ref = torch.load(outputs[("reference", workload)])
                for backend in args.backends:
                    if backend != "reference":
                        got = torch.load(outputs[(backend, workload)])
                        correctness[workload] = {"backend": backend, "against": "reference",
                                                 **compare(ref, got, dtype)}
                        del got
                del ref

    by = {(r["backend"], r["workload"]): r for r in results}
    ratios = {}
    if "reference" in args.backends and "torch_chunked" in args.backends:
        for wl in WORKLOADS:
            ref, ch = by[("reference", wl)], by[("torch_chunked", wl)]
            mem_ratio = ch["peak_extra_bytes"] / ref["peak_extra_bytes"] if ref["peak_extra_bytes"] > 0 else None
            t_ratio = ch["total_s"] / ref["total_s"]
            ratios[wl] = {
                "total_time": t_ratio,
                "fwd_time": ch["fwd_s"] / ref["fwd_s"],
                "bwd_time": ch["bwd_s"] / ref["bwd_s"],
                "peak_memory": mem_ratio,
                "time_target_met": t_ratio <= TARGETS["time_ratio_max"],
                "memory_target_met": mem_ratio is not None and mem_ratio <= TARGETS["peak_memory_ratio_max"],
            }

    logits_bytes = n * v * 4 if dtype != torch.float64 else n * v * 8
    report = {
        "benchmark": "hykernels CPU: reference vs torch_chunked",
        "date": _dt.date.today().isoformat(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "argv": sys.argv,
        "device": cpu_device_info(),
        "versions": versions(),
        "shape": {"N": n, "D": d, "V": v},
        "dtype": args.dtype,
        "repeats": args.repeats,
        "seed": seed,
        "backends": list(args.backends),
        "timing": ("wall clock (time.perf_counter), median over repeats; each (backend, workload) in a fresh "
                   "process; 1 untimed full-shape forward+backward (the memory run) precedes the timed repeats "
                   "as warm-up; grads are cleared (set to None) before each repeat; total_s is the median of "
                   "per-repeat fwd+bwd. Timings are only as good as the machine is quiet: each result records "
                   "the 1/5/15-min load average before and after its worker (loadavg_before/after; a value above "
                   "the thread count means other processes competed for the cores) and the process CPU time "
                   "per repeat (process_cpu_s_all, all threads)"),
        "workloads": {
            "token_stats": ("token_stats forward, then loss = sum(a*logp + b*entropy + c*self_certainty) with "
                            "a, b, c ~ randn per token; backward recomputes logits tiles to form dH, dW"),
            "fused_loss": ("fused_loss with rd_weight, rlif_weight ~ (U(0,1)+0.1)/N per token, advantages ~ randn; "
                           "NOTE: fused_loss forms dH, dW in its forward pass (all logits GEMMs run there), "
                           "its backward only scales the saved gradients, so fwd_s carries almost all the cost"),
            "inputs": (f"hidden ~ randn[N, D], weight ~ randn[V, D]/sqrt(D), targets ~ U[0, V) with "
                       f"~{IGNORE_FRACTION:.0%} set to ignore_index={IGNORE_INDEX} (same for both workloads); "
                       "hidden and weight require grad, no bias"),
        },
        "memory": {
            "method": results[0]["method"] if results else None,
            "clear_refs_ok": all(r["clear_refs_ok"] for r in results),
            "definition": ("peak_extra_bytes = peak RSS during one forward+backward minus RSS just before it "
                           "(inputs already allocated); nothing else subtracted: the gradients (and, for "
                           "fused_loss, the gradients held from forward to backward) are inside it"),
            "sizes_bytes": {
                "hidden": n * d * esize,
                "weight": v * d * esize,
                "targets_int64": n * 8,
                "per_token_fp32_vector": n * 4,
                "grad_hidden": n * d * esize,
                "grad_weight": v * d * esize,
                "grads_total": (n * d + v * d) * esize,
                "full_logits_NxV_fp32": logits_bytes,
                "torch_chunked_tile_target": getattr(_torch_chunked, "TILE_BYTES", None),
            },
        },
        "results": results,
        "correctness": correctness,
        "targets": {
            "peak_memory": f"torch_chunked peak_extra_bytes <= {TARGETS['peak_memory_ratio_max']} x reference",
            "time": f"torch_chunked total_s <= {TARGETS['time_ratio_max']} x reference",
            **TARGETS,
        },
        "ratios": ratios,
        "machine_busy_warning": _busy_warning(results),
        "all_targets_met": bool(ratios) and all(r["time_target_met"] and r["memory_target_met"]
                                                 for r in ratios.values()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out_path}", file=sys.stderr, flush=True)
    print(markdown_table(report), flush=True)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--d", type=int, default=1024, help="hidden size")
    p.add_argument("--v", type=int, default=32768, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per (backend, workload), median reported")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-<YYYY-MM-DD>.json)")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: random, recorded in the JSON)")
    # internal: one measurement in this (fresh) process
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--outputs-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.worker:
        backend, workload = args.worker
        if backend not in BACKENDS or workload not in WORKLOADS:
            p.error(f"--worker: expected BACKEND in {BACKENDS} and WORKLOAD in {WORKLOADS}")
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
