#!/usr/bin/env python
"""Side-by-side lm_head benchmarks: hykernels against the materialised reference and the peers.

    python bench/run.py                                  # the preset for this machine (gpu or cpu)
    python bench/run.py --preset toy                     # seconds, CPU: the harness's own smoke run
    python bench/run.py --preset cpu-backends            # hykernels reference vs torch_chunked, CPU
    python bench/run.py --device cuda --preset lmhead    # D=4096, V=151936/128256, N=8k/16k, bf16
    python bench/run.py --models smollm2-135m --n 256 1024 4096 --dtypes float32 \\
        --impls reference reference_compiled hk_torch_chunked --workloads ce token_stats prg
    python bench/run.py --merge part1.json part2.json --out all.json

For every case (workload × model shape × N × dtype) and implementation it measures the forward
time, the backward time (with which pass forms the gradients: fused designs form them in forward
and their backward only scales them), forward+backward, the peak memory above the inputs, outputs
and gradients, useful TFLOP/s = 6·N·D·V / (fwd+bwd) (docs/math.md §8) and the efficiency against a
matmul measured in the same run (GPU: bf16 8192³; CPU: fp32 2048³). Every result is compared with
an fp32 reference computed in the same run (fp64 for fp64 inputs); a wrong one is flagged WRONG.

The harness is four modules: this one (the command line, the presets, the order of the run),
peers.py (the workloads and implementations), measure.py (inputs, gold, correctness, timing,
memory, worker processes) and report.py (JSON, table, plot, merge).

Implementations run in a fixed order whatever the order given: the hykernels paths first
(hk_cuda, hk_triton, hk_torch_chunked), then the peers (liger_flce, cce, liger_nll_entropy),
then reference and reference_compiled (its compiling can take minutes; the lmhead preset leaves it
out unless named in --impls). Each finished result is written to the JSON at once (an atomic
rewrite, "complete": false until the end), so a run cut short by a timeout keeps what ran; on
SIGTERM or Ctrl-C the worker is stopped and the table of what finished is printed.

Timing: fresh random inputs drawn per case from one recorded seed; --input-sets (≥ 3) sets rotate
through warm-up and repeats; the median of the repeats is reported. GPU: CUDA events; memory from
torch.cuda.max_memory_allocated; one process per implementation. CPU: wall clock; memory from
the kernel's RSS high-water mark, each (implementation, case) in a fresh process.

Results: bench/results/<device>-<date>[-<preset>].json (or --out) with the device, versions and
the exact command; a PNG plot beside it (needs matplotlib); a markdown table printed last. With
hk_triton, the JSON's "roofline" section holds bench/roofline.py's model of its passes at every
case, and on a GPU the table sets its measured time beside the roofline time (×roofline).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import _common  # noqa: E402
import measure  # noqa: E402
import report as reporting  # noqa: E402
import roofline  # noqa: E402
from presets import MODELS, PRESETS, shape_of  # noqa: E402
from peers import DEFAULT_IMPLS, DTYPES, IMPLS, INTERPRETER_MAX_NDV, PUBLIC_IMPLS, WORKLOADS, in_run_order  # noqa: E402

def build_cases(args) -> list[dict]:
    cases = []
    for workload in args.workloads:
        for model in args.models:
            d, v = shape_of(model)
            if workload == "prg":
                rows = [t * (args.prg_steps + 1) * args.prg_answer_len for t in args.prg_traces]
            else:
                rows = (getattr(args, "n_by_model", None) or {}).get(model, args.n)
            for dtype in args.dtypes:
                for n in rows:
                    cases.append(dict(id=len(cases), workload=workload, model=model, D=d, V=v, N=n, dtype=dtype,
                                      span_len=args.prg_answer_len))
    return cases


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def parent(args) -> int:
    device = args.device
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    isolate = args.isolate
    impls = in_run_order(list(args.impls) + (["wrong"] if args.inject_wrong else []))
    cases = build_cases(args)
    config = {"device": device, "preset": args.preset, "models": args.models, "n": args.n, "dtypes": args.dtypes,
              "workloads": args.workloads, "impls": impls, "repeats": args.repeats, "warmup": args.warmup,
              "input_sets": args.input_sets, "case_budget_s": args.case_budget, "isolate": isolate, "seed": seed,
              "prg_traces": args.prg_traces, "prg_steps": args.prg_steps, "prg_answer_len": args.prg_answer_len,
              "hk_value_checks": args.hk_checks, "interpreter_max_ndv": INTERPRETER_MAX_NDV,
              "baseline": args.baseline, "targets": args.targets,
              "pairs": args.pairs, "n_by_model": getattr(args, "n_by_model", None)}
    rep = reporting.new_report(config, cases, impls)
    suffix = f"-{args.preset}" if args.preset not in ("gpu", "cpu") else ""
    default_out = lambda name: ROOT / "bench" / "results" / f"{_slug(name)}-{rep['date']}{suffix}.json"  # noqa: E731
    out = Path(args.out) if args.out else None  # the GPU's name is known after the ceiling job
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    base_job = dict(device=device, seed=seed, repeats=args.repeats, min_repeats=min(3, args.repeats),
                    warmup=args.warmup, input_sets=args.input_sets, case_budget_s=args.case_budget,
                    hk_checks=args.hk_checks)
    total = len(cases) * len(impls)
    results = rep["results"]

    def save():
        rep["progress"] = {"results": len(results), "of": total}
        reporting.save(rep, out)

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    tmp = Path(tempfile.mkdtemp(prefix="hykernels-run-"))
    fp_dir = tmp / "fp"
    fp_dir.mkdir()
    job = None
    t_start = time.perf_counter()
    try:
        # 1. the matmul ceiling and the device description
        log(f"device {device}: matmul ceiling ...")
        ceil_file = tmp / "ceiling.json"
        ceil_job = dict(device=device, result_file=str(ceil_file))
        if device == "cpu":  # nothing else runs in this process yet: measure here, save a process start
            (tmp / "ceiling-job.json").write_text(json.dumps(ceil_job))
            measure.ceiling_worker(str(tmp / "ceiling-job.json"))
            rc = 0
        else:
            job = measure.Job("ceiling", ceil_job, tmp, timeout=args.worker_timeout)
            rc = job.wait()
        ceiling = json.loads(ceil_file.read_text()) if rc == 0 and ceil_file.exists() else {
            "error": f"exit {rc}: {job.error_tail(3) if job else ''}"}
        rep["ceiling"] = ceiling
        rep["device"] = ceiling.get("device") or {"kind": device}
        rep["device_name"] = rep["device"].get("name") or rep["device"].get("lscpu_model_name") or device
        if out is None:
            out = default_out("cpu" if device == "cpu" else rep["device_name"])
        if "hk_triton" in impls:  # its FLOPs, bytes and roofline time at every case
            rep["roofline"] = roofline.bench_section(cases, rep["device"].get("multi_processor_count"))
        if "matmul" in ceiling:
            log(f"  {ceiling['matmul']['dtype']} {ceiling['matmul']['size']}³ matmul: "
                f"{ceiling['matmul']['tflops']:.3g} TFLOP/s")
        log(f"results go to {out} as they finish")

        # 2. which (impl, case) pairs run, and the skips decided up front
        todo = {}
        for name in impls:
            for c in cases:
                reason = IMPLS[name].static_skip(c, device)
                if reason is None:
                    todo.setdefault(name, []).append(c)
                else:
                    results.append(dict(impl=name, case=c["id"], status="skipped", reason=reason))
        save()

        # 3. the gold (one process, all cases that anything runs), then each implementation in order
        needed = sorted({c["id"] for cs in todo.values() for c in cs})
        jobs, gold_rows = [], {}
        if needed and not args.no_check:
            jobs.append(("_gold", [c for c in cases if c["id"] in needed]))
        for name in impls:
            if name in todo:
                groups = [[c] for c in todo[name]] if isolate == "case" else [todo[name]]
                jobs += [(name, g) for g in groups]
        for name, group in jobs:
            res_file = tmp / f"res-{name}-{group[0]['id']}.jsonl"
            env = {}
            if device == "cpu" and name != "_gold" and IMPLS[name].triton_kernels:
                env["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: set before import
            label = ", ".join(f"{c['workload']}/{c['model']}/{c['dtype']}/N={c['N']}" for c in group[:3])
            log(f"{name}: {label}{' ...' if len(group) > 3 else ''}")
            spec = dict(base_job, impl=name, cases=group, result_file=str(res_file), fp_dir=str(fp_dir))
            t0, la_before = time.perf_counter(), _common.loadavg()
            if name == "_gold" and device == "cpu":  # untimed: no need for a fresh process
                (tmp / "gold-job.json").write_text(json.dumps(spec))
                measure.worker(str(tmp / "gold-job.json"))
                job = None
                rows = [json.loads(line) for line in res_file.read_text().splitlines()]
            else:
                job = measure.Job("worker", spec, tmp, env, args.worker_timeout)
                rows = job.rows()
            done = set()
            for r in rows:
                done.add(r["case"])
                c = cases[r["case"]]
                r["loadavg_before"], r["loadavg_after"] = la_before, _common.loadavg()
                if name == "_gold":
                    gold_rows[r["case"]] = r
                    if r["status"] != "ok":
                        log(f"  gold {r['status']}: {r.get('reason')}")
                    continue
                measure.check(r, c, fp_dir, gold_rows.get(c["id"]), args.no_check)
                results.append(r)
                save()
                if r["status"] == "ok":
                    ok = r.get("correctness")
                    log(f"  N={c['N']}: fwd+bwd {r['total_ms']:.4g} ms, "
                        f"peak {_common.fmt_mib(r.get('peak_above_io_bytes'))} MiB"
                        f"{'' if not ok or ok['ok'] else ', WRONG'}")
                else:
                    log(f"  {r['status']}: {r.get('reason')}")
            missing = [c for c in group if c["id"] not in done]
            if missing and job is not None:  # a crashed (or timed-out) worker: its remaining cases are errors
                why = f"worker exited with {job.rc}: {job.error_tail()}"
                log(f"  {why}")
                for c in missing:
                    row = dict(impl=name, case=c["id"], status="error", reason=why)
                    if name == "_gold":
                        gold_rows[c["id"]] = row
                    else:
                        results.append(row)
                if name != "_gold":
                    save()
            log(f"  ({time.perf_counter() - t0:.1f} s)")
            job = None
    except (Interrupted, KeyboardInterrupt) as exc:
        sig = str(exc) or "SIGINT"
        if job is not None:
            job.kill()
        rep["interrupted"] = f"{sig} after {time.perf_counter() - t_start:.0f} s"
        log(f"interrupted ({rep['interrupted']}): writing what finished")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)
    if out is None:  # interrupted before the device was known
        out = default_out(device)
    order = {name: i for i, name in enumerate(impls)}
    results.sort(key=lambda r: (r["case"], order.get(r["impl"], 99)))
    rep["complete"] = not rep.get("interrupted")
    rep["progress"] = {"results": len(results), "of": total}
    rc = reporting.emit(rep, out, args.no_plot, args.strict)
    return 128 + signal.Signals[rep["interrupted"].split()[0]].value if rep.get("interrupted") else rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models: " + ", ".join(f"{k} (D={d}, V={v})" for k, (d, v) in MODELS.items())
                                       + ", or D:V.  presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="defaults for the options below (default: gpu with CUDA, else cpu)")
    p.add_argument("--models", nargs="+", help="model shapes (names below or D:V)")
    p.add_argument("--n", type=int, nargs="+", help="rows N for the ce, token_stats and rd_rlif workloads")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS)
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=None, metavar="IMPL",
                   help=f"implementations, run in the order {', '.join(PUBLIC_IMPLS)} whatever the order "
                        f"given (default: the preset's, else {', '.join(DEFAULT_IMPLS)})")
    p.add_argument("--baseline", choices=PUBLIC_IMPLS, default=None, metavar="IMPL",
                   help="report each result's time and memory as a ratio to this implementation's")
    p.add_argument("--prg-traces", type=int, nargs="+", help="traces per probe batch (prg workload)")
    p.add_argument("--prg-steps", type=int, default=8, help="reasoning steps K per trace: K+1 probes")
    p.add_argument("--prg-answer-len", type=int, default=4, help="answer tokens per probe")
    p.add_argument("--repeats", type=int, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per case (≥ 1)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets rotated through (≥ 3 on a GPU)")
    p.add_argument("--case-budget", type=float, default=60.0,
                   help="seconds of timed repeats per case: long cases run fewer repeats (never under 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--isolate", choices=("case", "impl"), default=None,
                   help="a fresh process per (impl, case) (default on CPU: exact RSS peaks) or per impl (GPU)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>[-<preset>].json)")
    p.add_argument("--seed", type=int, default=None, help="input seed (default random, recorded)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the correctness reference")
    p.add_argument("--hk-checks", action="store_true", help="keep hykernels' value checks on (default off)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a result is WRONG or errored")
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge these result files into --out (table and plot redone); runs nothing")
    p.add_argument("--inject-wrong", action="store_true", help=argparse.SUPPRESS)  # test: a wrong impl
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ceiling", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        measure.worker(args.worker)
        return 0
    if args.ceiling:
        measure.ceiling_worker(args.ceiling)
        return 0
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        return reporting.merge(args.merge, Path(args.out), args.no_plot, args.strict)
    if args.preset is None:
        args.preset = "gpu" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else "cpu"
    preset = dict(PRESETS[args.preset])
    args.targets = preset.pop("targets", None)
    args.pairs = preset.pop("pairs", None)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.impls = args.impls or DEFAULT_IMPLS
    args.isolate = args.isolate or ("case" if args.device == "cpu" else "impl")
    if args.baseline and args.baseline not in args.impls:
        args.impls = [*args.impls, args.baseline]
    for m in args.models:
        try:
            shape_of(m)
        except argparse.ArgumentTypeError as exc:
            p.error(str(exc))
    if args.warmup < 1 or args.repeats < 1 or args.input_sets < 1:
        p.error("--warmup, --repeats and --input-sets must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
