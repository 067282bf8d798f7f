#!/usr/bin/env python
"""GPU smoke check: each hykernels backend once at a real lm_head shape, in one process.

    python bench/smoke.py --out OUT/smoke.json            # GPU: N=16384, D=4096, V=151936, bf16
    TRITON_INTERPRET=1 python bench/smoke.py --n 64 --d 32 --v 301 --dtype float32 --out x.json  # CPU

Per backend (cuda, triton, torch_chunked; each in its own try/except so one failure does not stop
the rest) and per op:
  fused_loss   hk.fused_loss(..., rd_weight=1/T) (mean CE over the ~90% rows with a target), then
               backward
  token_stats  hk.token_stats(...), loss = Σ a_t·(−logp_t) + b_t·entropy_t with random a, b > 0,
               then backward
it reports the first call's wall time (compiling included), then over --repeats timed steps
(CUDA events; CPU: wall clock) the median forward and backward time, the peak memory above the
inputs, outputs and gradients (GPU: torch.cuda.max_memory_allocated after resetting the peak once
the inputs exist; CPU: the RSS high-water mark), useful TFLOP/s = 6·N·D·V / (fwd+bwd) and the
efficiency against the matmul timed in the same process (GPU: bf16 8192³), and the relative
error ‖got − ref‖/‖ref‖ of the loss, logp, entropy and both gradients against a chunked fp32
reference (the torch_chunked backend on fp32 copies of the inputs, computed once per op).
After the triton backend ran, every kernel in its pass modules (TRITON_MODULES) is
listed with each compiled variant's n_regs, n_spills, warps, stages and shared memory (read from
the JIT cache; under TRITON_INTERPRET=1 nothing is compiled and it says so).

The JSON is rewritten after every step (matmul, reference, each backend), so a kill keeps what
ran; a table is printed at the end. Without a GPU, TRITON_INTERPRET=1 is set before hykernels
loads (the Triton interpreter: tiny shapes only).
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
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

BACKENDS = ("cuda", "triton", "torch_chunked")
OPS = ("fused_loss", "token_stats")
IGNORE_INDEX = -100
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2}  # as bench/measure.py
# The modules holding the triton backend's kernels, one per pass.
TRITON_MODULES = tuple(f"hykernels.backends.triton.{m}" for m in ("_logits_fwd", "_logits_grad", "_grad_gemm"))


def log(msg: str) -> None:
    print(f"[smoke] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# inputs, the ops, the fp32 reference
# --------------------------------------------------------------------------------------------

def make_inputs(n, d, v, dtype, device, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(generator=g, device=device, dtype=torch.float32)
    hidden = torch.randn(n, d, **f32).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, **f32) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    targets[torch.rand(n, **f32) < 0.10] = IGNORE_INDEX
    valid = targets != IGNORE_INDEX
    t = max(int(valid.sum()), 1)
    return dict(hidden=hidden, weight=weight, targets=targets, valid=valid, T=t,
                a=(torch.rand(n, **f32) + 0.1) / t * valid, b=(torch.rand(n, **f32) + 0.1) / t * valid)


def op_fn(op: str, backend: str):
    """x -> (loss, outputs) for one op on one backend."""
    import hykernels as hk

    if op == "fused_loss":
        def fused(x, h=None, w=None):
            loss, st = hk.fused_loss(x["hidden"] if h is None else h, x["weight"] if w is None else w, x["targets"],
                                     rd_weight=1.0 / x["T"], ignore_index=IGNORE_INDEX, backend=backend)
            return loss, {"logp": st.logp}
        return fused

    def stats(x, h=None, w=None):
        st = hk.token_stats(x["hidden"] if h is None else h, x["weight"] if w is None else w, x["targets"],
                            ignore_index=IGNORE_INDEX, backend=backend)
        return (x["a"] * -st.logp + x["b"] * st.entropy).sum(), {"logp": st.logp, "entropy": st.entropy}
    return stats


def reference(op: str, x: dict) -> dict:
    """The torch_chunked backend on fp32 copies of the inputs: loss, per-token outputs, gradients."""
    h = x["hidden"].detach().float().requires_grad_()
    w = x["weight"].detach().float().requires_grad_()
    loss, outs = op_fn(op, "torch_chunked")(x, h, w)
    loss.backward()
    ref = {"loss": loss.detach(), **{k: t.detach() for k, t in outs.items()}, "grad_hidden": h.grad,
           "grad_weight": w.grad}
    del h, w
    return ref


def rel_errors(ref: dict, got: dict, valid) -> dict:
    """‖got − ref‖ / ‖ref‖ per output (per-token outputs on rows with a target), in fp32."""
    errs = {}
    for key, r in ref.items():
        g = got.get(key)
        if g is None or r is None:
            errs[key] = None
            continue
        r, g = r.float(), g.float()
        if key in ("logp", "entropy"):
            r, g = r[valid], g[valid]
        denom = float(r.norm())
        err = float((g - r).norm()) / (denom if denom > 0 else 1.0)
        errs[key] = err if math.isfinite(err) else math.inf
    return errs


# --------------------------------------------------------------------------------------------
# one op on one backend
# --------------------------------------------------------------------------------------------

def _clear(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def run_op(op: str, backend: str, x: dict, ref: dict | None, device, repeats: int, dtype_name: str,
           matmul_tflops: float | None) -> dict:
    from measure import nbytes, one_step  # the harness's timing of one forward + backward

    import _common

    fn = op_fn(op, backend)
    n, d = x["hidden"].shape
    v = x["weight"].shape[0]
    row = {"backend": backend, "op": op, "status": "ok"}
    # first call: compiles (Triton), loads (the extension); its outputs are the ones checked
    _clear(x)
    sync(device)
    t0 = time.perf_counter()
    loss, outs = fn(x)
    loss.backward()
    sync(device)
    row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    if ref is not None:
        got = {"loss": loss.detach(), **{k: t.detach() for k, t in outs.items()},
               "grad_hidden": x["hidden"].grad, "grad_weight": x["weight"].grad}
        errs = rel_errors(ref, got, x["valid"])
        finite = [e for e in errs.values() if e is not None]
        worst = max(finite) if finite else None
        row["rel_err"] = errs
        row["max_rel_err"] = worst
        row["tolerance"] = TOLERANCE[dtype_name]
        row["correct"] = worst is not None and worst <= TOLERANCE[dtype_name]
        del got
    del loss, outs
    _clear(x)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fwds, bwds = [], []
    for r in range(repeats):
        _clear(x)
        if r == 0:  # the first timed step is also the memory measurement, above the inputs
            peak = _common.PeakMemory(device)
            peak.start()
        fwd, bwd, loss, outs = one_step(fn, x, device)
        if r == 0:
            extra = peak.stop()
            approximate = "" if device.type == "cuda" else " (in the smoke process: approximate)"
            row["memory_method"] = peak.method + approximate
            io = nbytes(x["hidden"].grad, x["weight"].grad, loss, *outs.values())
            row.update(peak_extra_bytes=extra, io_bytes=io, peak_above_io_bytes=extra - io)
        del loss, outs
        fwds.append(fwd)
        bwds.append(bwd)
    _clear(x)
    total = statistics.median([a + b for a, b in zip(fwds, bwds)])
    row.update(repeats=repeats, fwd_ms=statistics.median(fwds) * 1e3, bwd_ms=statistics.median(bwds) * 1e3,
               total_ms=total * 1e3, useful_tflops=6 * n * d * v / total / 1e12)
    if matmul_tflops:
        row["efficiency"] = row["useful_tflops"] / matmul_tflops
    return row


# --------------------------------------------------------------------------------------------
# Triton kernels: registers and spills of what was compiled
# --------------------------------------------------------------------------------------------

def _compiled(fn):
    """The compiled kernels in a JITFunction's cache (triton 3.x: device_caches[device][0] is
    {key: CompiledKernel}; older: cache[device])."""
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            yield from cache.values()
    old = getattr(fn, "cache", None)
    if isinstance(old, dict):
        for cache in old.values():
            if isinstance(cache, dict):
                yield from cache.values()


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def triton_kernel_stats(module_names=TRITON_MODULES) -> dict:
    """Every triton.JITFunction of the modules ``module_names`` (one name or several; unwrapping
    autotune/heuristics; names starting with _ are shared device functions, skipped) and, for
    each compiled variant, n_regs, n_spills, num_warps, num_stages and shared memory bytes."""
    import importlib

    from triton.runtime.jit import JITFunction, KernelInterface

    names = (module_names,) if isinstance(module_names, str) else tuple(module_names)
    out = {"modules": list(names), "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "kernels": {}}
    objects = {}
    for module_name in names:
        objects.update({k: v for k, v in vars(importlib.import_module(module_name)).items() if not k.startswith("_")})
    for name, obj in sorted(objects.items()):
        if not isinstance(obj, KernelInterface):
            continue
        fn = obj
        while not isinstance(fn, JITFunction) and isinstance(getattr(fn, "fn", None), KernelInterface):
            fn = fn.fn  # Autotuner / Heuristics wrap the JITFunction
        if not isinstance(fn, JITFunction):
            out["kernels"][name] = {"type": type(obj).__name__, "variants": [],
                                    "note": "not compiled (Triton interpreter)" if out["interpreter"] else
                                    "not a JITFunction"}
            continue
        variants = []
        for k in _compiled(fn):
            meta = getattr(k, "metadata", None)
            if meta is None:  # e.g. a compile still in flight (async mode)
                continue
            if getattr(k, "n_regs", None) is None:
                try:
                    k._init_handles()  # loads the binary: where n_regs / n_spills come from
                except Exception as exc:  # noqa: BLE001
                    variants.append({"error": f"{type(exc).__name__}: {exc}"})
                    continue
            var = {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)}
            for field in ("num_warps", "num_stages", "shared", "name"):
                var[field] = _jsonable(getattr(meta, field, None))
            consts = getattr(getattr(k, "src", None), "constants", None)
            if isinstance(consts, dict):
                var["constants"] = {str(key[0] if isinstance(key, tuple) and len(key) == 1 else key): _jsonable(val)
                                    for key, val in consts.items()}
            variants.append(var)
        out["kernels"][name] = {"type": type(obj).__name__, "variants": variants}
        if not variants:
            out["kernels"][name]["note"] = "no compiled variant (a device function, or not launched)"
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def table(report: dict) -> str:
    mm = report.get("matmul") or {}
    lines = [f"smoke on {report['device_name']}: N={report['shape']['N']} D={report['shape']['D']} "
             f"V={report['shape']['V']} {report['dtype']}; median of {report['repeats']} timed steps, ms; "
             f"peak = MiB above inputs, outputs and gradients; eff vs "
             + (f"{mm['dtype']} {mm['size']}³ matmul = {mm['tflops']:.3g} TFLOP/s" if mm.get("tflops") else
                "no matmul"), "",
             "| backend | op | status | first call ms | fwd ms | bwd ms | fwd+bwd ms | peak MiB | TFLOP/s | eff % "
             "| max rel err | correct |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    import _common

    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r.get('op', '-')} | {r['status']}: {r.get('reason', '')[:120]} "
                         "| | | | | | | | | |")
            continue
        eff = r.get("efficiency")
        corr = r.get("correct")
        worst = max(r.get("rel_err") or {"-": 0}, key=lambda k: r["rel_err"][k] or 0) if corr is False else None
        lines.append(f"| {r['backend']} | {r['op']} | ok | {_fmt(r['first_call_ms'], '.0f')} | {_fmt(r['fwd_ms'])} | "
                     f"{_fmt(r['bwd_ms'])} | {_fmt(r['total_ms'])} | {_common.fmt_mib(r.get('peak_above_io_bytes'))} "
                     f"| {_fmt(r['useful_tflops'])} | {_fmt(None if eff is None else 100 * eff)} | "
                     f"{_fmt(r.get('max_rel_err'), '.1e')} | "
                     f"{'-' if corr is None else ('ok' if corr else f'**WRONG** ({worst})')} |")
    tk = report.get("triton_kernels")
    if tk and tk.get("kernels"):
        lines += ["", f"Triton kernels ({', '.join(tk['modules'])}):", "",
                  "| kernel | n_regs | n_spills | warps | stages | shared B |", "|---|---:|---:|---:|---:|---:|"]
        for name, k in tk["kernels"].items():
            if not k["variants"]:
                lines.append(f"| {name} | {k.get('note', '-')} | | | | |")
            for var in k["variants"]:
                lines.append(f"| {name} | {var.get('n_regs', '-')} | {var.get('n_spills', '-')} | "
                             f"{var.get('num_warps', '-')} | {var.get('num_stages', '-')} | {var.get('shared', '-')} |")
    elif tk and tk.get("error"):
        lines += ["", f"Triton kernels: {tk['error']}"]
    return "\n".join(lines)


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the first call (median)")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul side (default GPU 8192, CPU 256)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the fp32 reference (no errors reported)")
    p.add_argument("--hk-checks", action="store_true", help="keep hykernels' value checks on (default off)")
    p.add_argument("--out", default=None,
                   help="JSON path (default $OUT/smoke.json, else bench/results/smoke-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # read when the kernels are decorated: before hykernels' triton backend loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "smoke.json" if os.environ.get("OUT") else
                                           ROOT / "bench" / "results" / f"smoke-{_dt.date.today().isoformat()}.json")

    import _common
    import hykernels as hk
    from hykernels import backends
    from measure import cuda_device_info, time_matmul

    if not args.hk_checks:
        hk.set_checks(False)
    dtype = getattr(torch, args.dtype)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    info = cuda_device_info(device) if device.type == "cuda" else _common.cpu_device_info()
    report = {"benchmark": "hykernels smoke: every backend once at one lm_head shape (bench/smoke.py)",
              "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable] + sys.argv), "complete": False,
              "device_name": info.get("name") or info.get("lscpu_model_name") or device.type, "device": info,
              "versions": {**_common.versions("liger-kernel", "cut-cross-entropy"),
                           "hykernels_commit": _common.git_commit()},
              "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR")},
              "shape": {"N": args.n, "D": args.d, "V": args.v}, "dtype": args.dtype, "seed": seed,
              "repeats": args.repeats, "hk_value_checks": args.hk_checks, "matmul": None, "reference": {},
              "results": [], "triton_kernels": None}
    save(report, out)
    log(f"{report['device_name']}: N={args.n} D={args.d} V={args.v} {args.dtype} -> {out}")

    # the matmul ceiling, in this process
    size = args.matmul_size or (8192 if device.type == "cuda" else 256)
    try:
        mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        report["matmul"] = time_matmul(device, size, mm_dtype, reps=10 if device.type == "cuda" else 3, warm=3)
        log(f"{size}³ matmul: {report['matmul']['tflops']:.3g} TFLOP/s")
    except Exception as exc:  # noqa: BLE001
        report["matmul"] = {"error": f"{type(exc).__name__}: {exc}"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save(report, out)
    mm_tflops = (report["matmul"] or {}).get("tflops")

    x = make_inputs(args.n, args.d, args.v, dtype, device, seed)
    refs = {}
    for op in args.ops:
        if args.no_reference:
            break
        t0 = time.perf_counter()
        try:
            refs[op] = reference(op, x)
            report["reference"][op] = {"status": "ok", "wall_s": time.perf_counter() - t0,
                                       "method": "torch_chunked backend on fp32 copies of the inputs"}
        except Exception as exc:  # noqa: BLE001 - errors are then not reported, the rest runs
            report["reference"][op] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        _clear(x)
        gc.collect()
        save(report, out)

    for backend in args.backends:
        reason = backends.availability(backend, device)
        if reason is not None:
            report["results"].append({"backend": backend, "status": "unavailable", "reason": reason[-2000:]})
            log(f"{backend}: unavailable: {reason.strip().splitlines()[-1] if reason.strip() else ''}")
            save(report, out)
            continue
        for op in args.ops:
            log(f"{backend} / {op} ...")
            try:
                row = run_op(op, backend, x, refs.get(op), device, args.repeats, args.dtype, mm_tflops)
                log(f"  first call {row['first_call_ms']:.0f} ms, fwd+bwd {row['total_ms']:.4g} ms, "
                    f"peak {_common.fmt_mib(row.get('peak_above_io_bytes'))} MiB, max rel err "
                    f"{_fmt(row.get('max_rel_err'), '.1e')}")
            except Exception as exc:  # noqa: BLE001 - one failure does not stop the rest
                oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
                row = {"backend": backend, "op": op, "status": "oom" if oom else "error",
                       "reason": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
                log(f"  {row['status']}: {row['reason'][:300]}")
            _clear(x)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["results"].append(row)
            save(report, out)
        if backend == "triton":
            try:
                report["triton_kernels"] = triton_kernel_stats()
            except Exception as exc:  # noqa: BLE001
                report["triton_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
            save(report, out)
    report["complete"] = True
    save(report, out)
    log(f"wrote {out}")
    print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
