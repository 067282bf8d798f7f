#!/usr/bin/env python
"""GPU smoke check: every hykernels backend and every peer once at a real lm_head shape, in one process.

    python bench/smoke.py --out OUT/smoke.json            # GPU: N=16384, D=4096, V=151936, bf16
    TRITON_INTERPRET=1 python bench/smoke.py --n 64 --d 32 --v 301 --dtype float32 --out x.json  # CPU

Items, in this order (each in its own try/except, so one failure does not stop the rest):
  hykernels, per backend (cuda, triton, torch_chunked) and per op:
    fused_loss   hk.fused_loss(..., rd_weight=1/T) (mean CE over the ~90% rows with a target), then
                 backward (the "ce" workload)
    token_stats  hk.token_stats(...), loss = Σ a_t·(−logp_t) + b_t·entropy_t with random a, b > 0,
                 then backward (the "token_stats" workload)
  the peers of bench/peers.py (``IMPLS[name].build(workload, device, dtype)``; a peer that is not
  installed, or cannot run here, is a skipped row with the reason): liger_flce, cce, torch_lce,
  torch_lce_none and reference on "ce"; liger_nll_entropy (SM90: its CuTe DSL kernel) and
  reference on "token_stats"; and liger_flce_triton, Liger's fused linear CE with its inner
  cross-entropy forced to Triton (LIGER_KERNEL_IMPL_CROSS_ENTROPY_LOSS_AND_GRAD=nvidia-triton), run
  only when Liger's own pick is another kernel (its CuTe DSL one on Hopper, where nvidia-cutlass-dsl
  is installed). Each Liger row says which implementation Liger's dispatcher chose.
Per item it reports the first call's wall time (compiling included), then over --repeats timed
steps (CUDA events; CPU: wall clock) the median forward and backward time, the peak memory above
the inputs, outputs and returned gradients (GPU: torch.cuda.max_memory_allocated after resetting
the peak once the inputs exist; CPU: the RSS high-water mark), useful TFLOP/s = 6·N·D·V /
(fwd+bwd) and the efficiency against the matmul timed in the same run (GPU: bf16 8192³), and the
relative error ‖got − ref‖/‖ref‖ of the loss, the per-token outputs and both gradients against an
fp32 reference (the torch_chunked backend on fp32 copies of the inputs, computed once per
workload). After the triton backend ran, every kernel in its pass modules (TRITON_MODULES) is
listed with each compiled variant's n_regs, n_spills, warps, stages and shared memory (read from
the JIT cache; under TRITON_INTERPRET=1 nothing is compiled and it says so).

Time caps (``--deadline EPOCH``, as bench/gpu_check.sh passes it): every item (each reference and
each row) gets its own cap, ``item_cap``: its maximum (ITEM_MAX_S) within what is left before the
deadline once the floors of the items after it (ITEM_FLOOR_S) are kept back, so a hang in one
cannot eat the rest. A watchdog thread ends the process when an item overruns its cap: the item is
written as ``timeout``, the process exits with EXIT_ITEM_TIMEOUT, and ``--resume`` (a fresh
process, which gpu_check.sh starts while time is left) goes on with the items not yet done, on the
same inputs (the seed is in the JSON) and the same matmul. An item that was running when its
process died otherwise (a crash, the step's own timeout) is written as ``killed`` on resume.

The JSON is rewritten before and after every item (``current`` names the item running), so a kill
keeps what finished; a table is printed at the end. Without a GPU, TRITON_INTERPRET=1 is set
before hykernels loads (the Triton interpreter: tiny shapes only).
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
import threading
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
WORKLOAD = {"fused_loss": "ce", "token_stats": "token_stats"}  # bench/peers.py's name of each op's workload
OP_OF = {w: op for op, w in WORKLOAD.items()}
# (peer, workload) in run order: bench/peers.py's IMPLS, and liger_flce_triton (see the docstring)
PEERS = (("liger_flce", "ce"), ("cce", "ce"), ("torch_lce", "ce"), ("liger_nll_entropy", "token_stats"),
         ("torch_lce_none", "ce"), ("reference", "ce"), ("reference", "token_stats"), ("liger_flce_triton", "ce"))
PEER_NAMES = tuple(dict.fromkeys(p for p, _ in PEERS))
LIGER_CE_OP = "cross_entropy_loss_and_grad"  # the op Liger's fused linear CE dispatches per chunk
LIGER_TRITON_ENV = {"LIGER_KERNEL_IMPL_CROSS_ENTROPY_LOSS_AND_GRAD": "nvidia-triton"}
IGNORE_INDEX = -100
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2}  # as bench/measure.py
# The modules holding the triton backend's kernels, one per pass.
TRITON_MODULES = tuple(f"hykernels.backends.triton.{m}" for m in ("_logits_fwd", "_logits_grad", "_grad_gemm"))

# Time caps per item kind, seconds: the most one may take (first call with its compiling and
# autotuning, then the timed repeats) and the least kept back for it while earlier items run.
ITEM_MAX_S = {"reference": 120, "hk_cuda": 60, "hk_triton": 150, "hk_torch_chunked": 60, "liger_flce": 90,
              "cce": 120, "torch_lce": 60, "liger_nll_entropy": 150, "torch_lce_none": 60, "reference_peer": 60,
              "liger_flce_triton": 90, "triton_kernels": 30}
ITEM_FLOOR_S = 10
MIN_ITEM_S = 3          # an item with less than this left is not started ("no time")
DEADLINE_RESERVE_S = 3  # kept before the deadline for the last save and the table
EXIT_ITEM_TIMEOUT = 75  # the watchdog ended the process: resume with --resume


def log(msg: str) -> None:
    print(f"[smoke] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# time caps
# --------------------------------------------------------------------------------------------

def item_cap(remaining: float, max_s: float, floors_after: float, items_left: int) -> float | None:
    """The cap of the next item: its maximum ``max_s`` within ``remaining`` seconds once the floors
    of the items after it are kept back; when that leaves less than its own floor, an equal share
    of what remains (``items_left`` counts this item). Never more than ``remaining``; None: do
    not start it (less than MIN_ITEM_S left)."""
    if remaining < MIN_ITEM_S:
        return None
    cap = min(max_s, remaining - floors_after)
    if cap < min(ITEM_FLOOR_S, max_s):
        cap = min(max_s, remaining / max(items_left, 1))
    cap = min(cap, remaining)
    return cap if cap >= MIN_ITEM_S else None


class Watchdog:
    """Ends the process when the running item overruns its cap, after writing it as ``timeout``.
    A thread: it runs while the main thread waits on the GPU (torch releases the GIL there); if it
    cannot, the step's own timeout in gpu_check.sh ends the process and --resume says ``killed``."""

    def __init__(self, saver):
        self.saver = saver  # callable(row) that records the timed-out item and saves the JSON
        self.item = None    # (key, cap_s, t_end)
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="smoke-watchdog").start()

    def arm(self, key, cap_s):
        with self.lock:
            self.item = None if cap_s is None else (key, cap_s, time.monotonic() + cap_s)

    def disarm(self):
        self.arm(None, None)

    def _run(self):
        while True:
            time.sleep(0.25)
            with self.lock:
                item = self.item
            if item is None or time.monotonic() < item[2]:
                continue
            key, cap_s, _ = item
            log(f"{key}: over its {cap_s:.0f} s cap: ending this process (exit {EXIT_ITEM_TIMEOUT}); "
                "--resume goes on with the rest")
            try:
                self.saver(key, {"status": "timeout", "reason": f"over its {cap_s:.0f} s cap (the watchdog ended the "
                                 "process; the items after it ran in a fresh one)", "cap_s": cap_s})
            finally:
                os._exit(EXIT_ITEM_TIMEOUT)


# --------------------------------------------------------------------------------------------
# inputs, the ops, the fp32 reference
# --------------------------------------------------------------------------------------------

def make_inputs(n, d, v, dtype, device, seed) -> dict:
    """As bench/measure.make_inputs for ce and token_stats (the peers read the same keys)."""
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
    """‖got − ref‖ / ‖ref‖ per output (per-token outputs on rows with a target), in fp32; None
    where the implementation does not return that output (e.g. a peer's CE gives no logp)."""
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
# the peers
# --------------------------------------------------------------------------------------------

class _EnvFor:
    """Calls ``fn`` with ``env`` set (restored after): how liger_flce_triton pins Liger's inner CE.
    Liger's fused linear CE forms its gradients in the forward pass, so the forward is enough."""

    def __init__(self, fn, env):
        self.fn, self.env = fn, env

    def __call__(self, x):
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return self.fn(x)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def liger_ce_pick(device) -> str | None:
    """The implementation Liger's dispatcher picks for the per-chunk CE of its fused linear CE
    (its best available one: nvidia-cutedsl on Hopper with nvidia-cutlass-dsl installed, else
    nvidia-triton), or None when that cannot be read."""
    try:
        import importlib

        dispatch = importlib.import_module("liger_kernel.backends.dispatch")  # the package exports a function so named
        impls = dispatch.available_impls(LIGER_CE_OP, device)
        return impls[0] if impls else None
    except Exception:  # noqa: BLE001 - another liger-kernel version: not reported
        return None


def peer_fn(name: str, workload: str, device, dtype, dtype_name: str, shape: tuple[int, int, int]):
    """(fn, notes) for a peer, or raises peers.Skip with the reason it cannot run here."""
    from peers import IMPLS, Skip

    base = "liger_flce" if name == "liger_flce_triton" else name
    impl = IMPLS[base]
    n, d, v = shape
    reason = impl.static_skip({"workload": workload, "dtype": dtype_name, "N": n, "D": d, "V": v}, device.type)
    if reason is not None:
        raise Skip(reason)
    notes = {"peer": base, "description": impl.description}
    if base == "liger_flce":
        pick = liger_ce_pick(device)
        notes["liger_ce_impl_auto"] = pick
        if name == "liger_flce_triton":
            if pick in (None, "nvidia-triton"):
                raise Skip(f"Liger's own pick for its inner CE is already {pick or 'unknown'}: liger_flce is that row")
            notes["liger_ce_impl"] = LIGER_TRITON_ENV["LIGER_KERNEL_IMPL_CROSS_ENTROPY_LOSS_AND_GRAD"]
            notes["env"] = dict(LIGER_TRITON_ENV)
            return _EnvFor(impl.build(workload, device, dtype), LIGER_TRITON_ENV), notes
        notes["liger_ce_impl"] = pick
    fn = impl.build(workload, device, dtype)
    if base == "liger_nll_entropy":
        try:
            from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod

            notes["liger_impl"] = getattr(mod._resolve_implementation(device), "__name__", None)
        except Exception:  # noqa: BLE001 - build() already said whether it loads
            pass
    if base.startswith("torch_lce"):
        from peers import torch_lce_source

        notes["torch_lce_source"] = torch_lce_source()
    return fn, notes


# --------------------------------------------------------------------------------------------
# one item: one op on one backend, or one peer on one workload
# --------------------------------------------------------------------------------------------

def _clear(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_fn(fn, x: dict, ref: dict | None, device, repeats: int, dtype_name: str,
           matmul_tflops: float | None) -> dict:
    """First call (its outputs checked against ``ref``), then ``repeats`` timed steps."""
    from measure import nbytes, one_step  # the harness's timing of one forward + backward

    import _common

    n, d = x["hidden"].shape
    v = x["weight"].shape[0]
    row = {"status": "ok"}
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
    _free(device)

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


def run_op(op: str, backend: str, x: dict, ref: dict | None, device, repeats: int, dtype_name: str,
           matmul_tflops: float | None) -> dict:
    """One hykernels op on one backend (the row without its identifying keys)."""
    return run_fn(op_fn(op, backend), x, ref, device, repeats, dtype_name, matmul_tflops)


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
             "| impl | op | status | first call ms | fwd ms | bwd ms | fwd+bwd ms | peak MiB | TFLOP/s | eff % "
             "| max rel err | correct |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    import _common

    for r in report["results"]:
        name = r.get("impl") or r.get("backend")
        if r.get("liger_ce_impl"):
            name += f" ({r['liger_ce_impl']})"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r.get('op', '-')} | {r['status']}: {(r.get('reason') or '')[:120]} "
                         "| | | | | | | | | |")
            continue
        eff = r.get("efficiency")
        corr = r.get("correct")
        worst = max(r.get("rel_err") or {"-": 0}, key=lambda k: r["rel_err"][k] or 0) if corr is False else None
        lines.append(f"| {name} | {r['op']} | ok | {_fmt(r['first_call_ms'], '.0f')} | {_fmt(r['fwd_ms'])} | "
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
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)


def plan_items(backends: list[str], ops: list[str], peers: list[str], reference_too: bool, item_max_s=None) -> list:
    """Every item of a run, in order: the fp32 references, each backend's ops (and the triton
    kernels' registers after the triton backend), then each peer on its workload."""
    def cap(kind):
        return ITEM_MAX_S[kind] if item_max_s is None else min(ITEM_MAX_S[kind], item_max_s)

    items = [{"key": f"reference-fp32/{op}", "kind": "reference", "op": op, "max_s": cap("reference")}
             for op in ops if reference_too]
    for backend in backends:
        for op in ops:
            items.append({"key": f"hk_{backend}/{op}", "kind": "hykernels", "impl": f"hk_{backend}", "backend": backend,
                          "op": op, "workload": WORKLOAD[op], "max_s": cap(f"hk_{backend}")})
        if backend == "triton":
            items.append({"key": "triton_kernels", "kind": "triton_kernels", "max_s": cap("triton_kernels")})
    for peer, workload in PEERS:
        if peer in peers and OP_OF[workload] in ops:
            items.append({"key": f"{peer}/{workload}", "kind": "peer", "impl": peer, "op": workload,
                          "workload": workload, "max_s": cap("reference_peer" if peer == "reference" else peer)})
    return items


def _row_of(item: dict, **fields) -> dict:
    return {"key": item["key"], "kind": item["kind"], "impl": item["impl"], **(
        {"backend": item["backend"]} if "backend" in item else {}), "op": item["op"], "workload": item["workload"],
        **fields}


class Run:
    """The report, its file, and recording an item's outcome (from the main thread or the watchdog)."""

    def __init__(self, report: dict, out: Path, items: list):
        self.report, self.out, self.items = report, out, {it["key"]: it for it in items}
        self.lock = threading.RLock()

    def save(self):
        with self.lock:
            save(self.report, self.out)

    def record(self, key: str, fields: dict):
        """The outcome of item ``key`` (status, reason, measurements); clears ``current``; saves."""
        with self.lock:
            item = self.items.get(key)
            if item is None:  # the matmul
                if key == "matmul" and fields.get("status") != "ok":
                    self.report["matmul"] = {"error": f"{fields['status']}: {fields.get('reason', '')}"}
            elif item["kind"] == "reference":
                self.report["reference"][item["op"]] = fields
            elif item["kind"] == "triton_kernels":
                if fields.get("status") not in (None, "ok"):
                    self.report["triton_kernels"] = {"error": f"{fields['status']}: {fields.get('reason', '')}"}
            else:
                self.report["results"].append(_row_of(item, **fields))
            self.report["current"] = None
            save(self.report, self.out)

    def start(self, key: str, cap_s):
        with self.lock:
            self.report["current"] = {"key": key, "cap_s": cap_s, "pid": os.getpid(),
                                      "started_epoch": time.time()}
            save(self.report, self.out)

    def done_keys(self) -> set:
        r = self.report
        done = {row["key"] for row in r["results"] if "key" in row}
        done |= {f"reference-fp32/{op}" for op, st in r["reference"].items() if st.get("status") != "ok"}
        if r.get("triton_kernels") is not None:
            done.add("triton_kernels")
        return done


def _resume(out: Path, args, shape: dict) -> dict | None:
    """The report of an unfinished run of the same shape and dtype at ``out``, with the item that was
    running when its process died written as ``killed`` (or ``timeout`` after the step's timeout)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    if old.get("complete") or old.get("shape") != shape or old.get("dtype") != args.dtype:
        return None
    return old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    p.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--peers", nargs="*", default=list(PEER_NAMES), choices=PEER_NAMES,
                   help="peers to run (default all; none: --peers with no name)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the first call (median)")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul side (default GPU 8192, CPU 256)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the fp32 reference (no errors reported)")
    p.add_argument("--hk-checks", action="store_true", help="keep hykernels' value checks on (default off)")
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds by which the run ends: every item then gets its own cap (item_cap)")
    p.add_argument("--item-max-s", type=float, default=None, help="lower every item's maximum to this (seconds)")
    p.add_argument("--resume", action="store_true",
                   help="go on with an unfinished run of the same shape in --out (its seed, matmul and results)")
    p.add_argument("--previous-exit", type=int, default=None,
                   help="with --resume: the exit code of the process that stopped (124: its step timed out)")
    p.add_argument("--test-hang", default=None, help=argparse.SUPPRESS)  # tests: this item key sleeps forever
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
    from peers import Skip

    if not args.hk_checks:
        hk.set_checks(False)
    dtype = getattr(torch, args.dtype)
    shape = {"N": args.n, "D": args.d, "V": args.v}
    items = plan_items(args.backends, args.ops, args.peers, not args.no_reference, args.item_max_s)
    report = _resume(out, args, shape) if args.resume else None
    attempt = {"pid": os.getpid(), "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join([sys.executable] + sys.argv), "deadline_epoch": args.deadline}
    if report is None:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
        info = cuda_device_info(device) if device.type == "cuda" else _common.cpu_device_info()
        report = {"benchmark": "hykernels smoke: every backend and peer once at one lm_head shape (bench/smoke.py)",
                  "timestamp_utc": attempt["started_utc"], "command": attempt["command"], "complete": False,
                  "device_name": info.get("name") or info.get("lscpu_model_name") or device.type, "device": info,
                  "versions": {**_common.versions("liger-kernel", "cut-cross-entropy", "nvidia-cutlass-dsl",
                                                  "cuda-bindings"),
                               "hykernels_commit": _common.git_commit()},
                  "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR",
                                                         "HYKERNELS_CACHE_DIR", "HYKERNELS_TORCH_LCE_SRC")},
                  "shape": shape, "dtype": args.dtype, "seed": seed, "repeats": args.repeats,
                  "hk_value_checks": args.hk_checks, "caps": {"item_max_s": ITEM_MAX_S, "item_floor_s": ITEM_FLOOR_S,
                                                              "item_max_override_s": args.item_max_s},
                  "items": [it["key"] for it in items], "attempts": [], "current": None, "matmul": None,
                  "reference": {}, "results": [], "triton_kernels": None}
    run = Run(report, out, items)
    cur = report.get("current")
    if cur:  # the item its last process was running when it died
        why = ("its step's timeout ended the process" if args.previous_exit == 124 else
               f"the process ended (exit {args.previous_exit})" if args.previous_exit is not None else
               "the process ended")
        status = "timeout" if args.previous_exit == 124 else "killed"
        log(f"resuming: {cur['key']} was running when {why}: {status}")
        run.record(cur["key"], {"status": status, "reason": f"{why} while it ran (cap {cur.get('cap_s')} s)",
                                "cap_s": cur.get("cap_s")})
    attempt["resumed"] = bool(report["attempts"])
    attempt["previous_exit"] = args.previous_exit
    report["attempts"].append(attempt)
    run.save()
    log(f"{report['device_name']}: N={args.n} D={args.d} V={args.v} {args.dtype} -> {out}"
        + (f" (resumed, attempt {len(report['attempts'])})" if attempt["resumed"] else ""))
    seed = report["seed"]

    deadline = args.deadline
    watchdog = Watchdog(run.record)

    def remaining():
        return math.inf if deadline is None else deadline - time.time() - DEADLINE_RESERVE_S

    # the matmul ceiling, in this run (a resumed run keeps the first process's)
    if report.get("matmul") is None:
        size = args.matmul_size or (8192 if device.type == "cuda" else 256)
        if deadline is not None:
            watchdog.arm("matmul", max(min(60.0, remaining()), MIN_ITEM_S))
        try:
            mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            report["matmul"] = time_matmul(device, size, mm_dtype, reps=10 if device.type == "cuda" else 3, warm=3)
            log(f"{size}³ matmul: {report['matmul']['tflops']:.3g} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            report["matmul"] = {"error": f"{type(exc).__name__}: {exc}"}
        watchdog.disarm()
        _free(device)
        run.save()
    mm_tflops = (report["matmul"] or {}).get("tflops")

    x = make_inputs(args.n, args.d, args.v, dtype, device, seed)
    refs = {}
    availability = {}
    done = run.done_keys()
    todo = [it for it in items if it["key"] not in done]
    for i, item in enumerate(todo):
        key = item["key"]
        cap = None
        if deadline is not None:
            cap = item_cap(remaining(), item["max_s"], ITEM_FLOOR_S * (len(todo) - i - 1), len(todo) - i)
            if cap is None:
                log(f"{key}: not started, {max(remaining(), 0):.0f} s left")
                run.record(key, {"status": "no_time",
                                 "reason": f"{max(remaining(), 0):.0f} s left before the deadline"})
                continue
        run.start(key, cap)
        watchdog.arm(key, cap)
        t0 = time.perf_counter()
        log(f"{key} ..." + (f" (cap {cap:.0f} s)" if cap is not None else ""))
        try:
            if args.test_hang == key:
                while True:
                    time.sleep(1)
            if item["kind"] == "reference":
                refs[item["op"]] = reference(item["op"], x)
                fields = {"status": "ok", "wall_s": time.perf_counter() - t0,
                          "method": "torch_chunked backend on fp32 copies of the inputs"}
            elif item["kind"] == "triton_kernels":
                if availability.get("triton", "not run in this process") is not None:
                    raise Skip(f"the triton backend did not run in this process: "
                               f"{availability.get('triton') or 'resumed after it'}")
                try:
                    report["triton_kernels"] = triton_kernel_stats()
                except Exception as exc:  # noqa: BLE001
                    report["triton_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
                fields = {"status": "ok"}
            else:
                ref = refs.get(OP_OF[item["workload"]])
                if item["kind"] == "hykernels":
                    b = item["backend"]
                    if b not in availability:
                        availability[b] = backends.availability(b, device)
                    if availability[b] is not None:
                        raise Skip(availability[b])
                    fn, notes = op_fn(item["op"], b), {}
                else:
                    fn, notes = peer_fn(item["impl"], item["workload"], device, dtype, args.dtype,
                                        (args.n, args.d, args.v))
                fields = {**notes, **run_fn(fn, x, ref, device, args.repeats, args.dtype, mm_tflops)}
                log(f"  first call {fields['first_call_ms']:.0f} ms, fwd+bwd {fields['total_ms']:.4g} ms, "
                    f"peak {_common.fmt_mib(fields.get('peak_above_io_bytes'))} MiB, max rel err "
                    f"{_fmt(fields.get('max_rel_err'), '.1e')}")
        except Skip as exc:
            unavailable = item["kind"] in ("hykernels", "triton_kernels")
            fields = {"status": "unavailable" if unavailable else "skipped", "reason": str(exc)[-2000:]}
            log(f"  {fields['status']}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
        except Exception as exc:  # noqa: BLE001 - one failure does not stop the rest
            oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
            fields = {"status": "oom" if oom else "error", "reason": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
            log(f"  {fields['status']}: {fields['reason'][:300]}")
        watchdog.disarm()
        fields.setdefault("wall_s", time.perf_counter() - t0)
        fields["cap_s"] = cap
        _clear(x)
        _free(device)
        run.record(key, fields)
    report["complete"] = True
    run.save()
    log(f"wrote {out}")
    print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
