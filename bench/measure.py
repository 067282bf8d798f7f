"""How bench/run.py measures: inputs, the fp32 gold, correctness, timing, memory, worker processes.

Inputs      fresh random data (never zeros), deterministic in (case, seed, input set): hidden ~
            randn[N, D], weight ~ randn[V, D]/√D, targets ~ U[0, V) with ~10% ignore_index rows.
Gold        an fp32 (fp64 for fp64 inputs) reference computed token chunk by token chunk,
            independent of hykernels, on input set 0.
Correctness each result's loss, per-token outputs and gradients (projected on 8 fixed random
            directions, ``fingerprint``) against the gold: ‖got − ref‖/‖ref‖ ≤ the dtype's
            tolerance, else WRONG.
Timing      warm-up first (its first step's outputs are the ones checked), then repeats rotating
            over ``input_sets`` sets; median reported. GPU: CUDA events; CPU: wall clock.
Memory      on the first timed repeat. GPU: torch.cuda.max_memory_allocated above what was
            allocated before; CPU: the RSS high-water mark (_common.HostPeak) in a fresh process.
Processes   ``worker(job_file)`` runs one implementation over a list of cases and appends one JSON
            line per finished case to the job's result file; ``Job`` spawns it (as
            ``bench/run.py --worker``) and hands back each line as soon as it is written, so the
            caller can save it before the next case starts.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import _common
from peers import DTYPES, IGNORE_FRACTION, IGNORE_INDEX, IMPLS, Skip, _hk, segment_mean

# Correctness: ‖got − ref‖ / ‖ref‖ per output against the fp32 (fp64) reference of the same run.
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2}
PROJECTIONS = 8  # gradients are compared through G·R with R [D, 8] random (see fingerprint)
RUN_PY = Path(__file__).resolve().parent / "run.py"


# --------------------------------------------------------------------------------------------
# inputs, the fp32 gold, fingerprints, comparison
# --------------------------------------------------------------------------------------------

def case_seed(seed: int, case: dict) -> int:
    return seed + 7919 * case["id"]


def make_inputs(case: dict, seed: int, device: torch.device) -> dict:
    """Fresh random inputs (never zeros), deterministic in (case shape, seed, device)."""
    n, d, v, dtype = case["N"], case["D"], case["V"], DTYPES[case["dtype"]]
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(generator=g, device=device, dtype=torch.float32)
    hidden = torch.randn(n, d, **f32).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, **f32) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    if case["workload"] != "prg":  # answer tokens all have targets
        targets[torch.rand(n, **f32) < IGNORE_FRACTION] = IGNORE_INDEX
    valid = targets != IGNORE_INDEX
    x = dict(hidden=hidden, weight=weight, targets=targets, valid=valid, T=max(int(valid.sum()), 1))
    if case["workload"] == "token_stats":
        x["a"] = (torch.rand(n, **f32) + 0.1) / x["T"] * valid
        x["b"] = (torch.rand(n, **f32) + 0.1) / x["T"] * valid
    if case["workload"] == "rd_rlif":
        x["rd"] = (torch.rand(n, **f32) + 0.1) / x["T"] * valid
        x["rlif"] = (torch.rand(n, **f32) + 0.1) / x["T"] * valid
        x["adv"] = torch.randn(n, **f32)
    if case["workload"] == "prg":
        span_len = case.get("span_len", 4)
        x["span_ids"] = torch.arange(n, device=device) // span_len
        x["num_spans"] = math.ceil(n / span_len)
        x["counts"] = torch.bincount(x["span_ids"], minlength=x["num_spans"])
        x["g"] = torch.randn(x["num_spans"], **f32)
    return x


def gold(case: dict, x: dict):
    """The fp32 (fp64) reference, token chunk by token chunk: (loss, extras, grad_hidden, grad_weight).
    Independent of hykernels; memory O(chunk·V). Every workload's gradient is that of
    Σ_t α_t·logp_t (+ β_t·entropy_t), so one chunked pass with per-token α, β gives both gradients
    (and the loss, but for rd_rlif's RLIF term: its value is −s·A, its gradient −s·A·∇logp)."""
    dt = torch.float64 if case["dtype"] == "float64" else torch.float32
    h, w, y, valid = x["hidden"].detach().to(dt), x["weight"].detach().to(dt), x["targets"], x["valid"]
    n, v = h.shape[0], w.shape[0]
    wl = case["workload"]
    if wl == "ce":
        alpha, beta = -valid.to(dt) / x["T"], None
    elif wl == "token_stats":
        alpha, beta = -x["a"].to(dt), x["b"].to(dt)
    elif wl == "rd_rlif":  # ρ ≡ 1 inside the clip: the RLIF term is −s·A·ρ, d/dlogp = −s·A
        alpha, beta = -(x["rd"] + x["rlif"] * x["adv"]).to(dt), None
    else:
        alpha, beta = (x["g"] / x["counts"]).to(dt)[x["span_ids"]], None
    w = w.requires_grad_()
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    logp_all, ent_all = torch.zeros(n, dtype=dt, device=h.device), torch.zeros(n, dtype=dt, device=h.device)
    loss = torch.zeros((), dtype=dt, device=h.device)
    chunk = max(1, (2 ** 26) // v)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h[s:e].clone().requires_grad_()
        lsm = torch.log_softmax(hc @ w.t(), dim=-1)
        logp = torch.where(valid[s:e], lsm.gather(1, y[s:e].clamp(min=0)[:, None]).squeeze(1), 0.0)
        ent = -(lsm.exp() * lsm).sum(-1)
        lc = (alpha[s:e] * logp).sum() + ((beta[s:e] * ent).sum() if beta is not None else 0.0)
        a, b = torch.autograd.grad(lc, (hc, w))
        gh[s:e] = a
        gw.add_(b)
        logp_all[s:e], ent_all[s:e] = logp.detach(), ent.detach()
        loss = loss + lc.detach()
    extras = {}
    if wl == "token_stats":
        extras = {"logp": logp_all, "entropy": ent_all}
    elif wl == "rd_rlif":
        extras = {"logp": logp_all}
        loss = -(x["rd"].to(dt) * logp_all).sum() - (x["rlif"] * x["adv"]).to(dt).sum()
    elif wl == "prg":
        extras = {"support": segment_mean(logp_all, x)}
    return loss, extras, gh, gw


def _projection(case: dict, device) -> torch.Tensor:
    dt = torch.float64 if case["dtype"] == "float64" else torch.float32
    g = torch.Generator().manual_seed(1234567)
    return torch.randn(case["D"], PROJECTIONS, generator=g, dtype=dt).to(device)


def fingerprint(case, loss, extras, grad_hidden, grad_weight, valid) -> dict:
    """What correctness is judged on, O(N + V): the loss, per-token outputs, and the gradients
    projected on PROJECTIONS fixed random directions (G·R: any error pattern changes G·R with
    probability one, and ‖ΔG·R‖/‖G·R‖ estimates ‖ΔG‖/‖G‖)."""
    r = _projection(case, loss.device)
    fp = {"loss": torch.as_tensor(loss).detach().double().cpu().reshape(()), "valid": valid.cpu()}
    for k, t in extras.items():
        fp[k] = t.detach().double().cpu()
    fp["grad_hidden"] = None if grad_hidden is None else (grad_hidden.to(r.dtype) @ r).double().cpu()
    fp["grad_weight"] = None if grad_weight is None else (grad_weight.to(r.dtype) @ r).double().cpu()
    return fp


def compare(ref: dict, got: dict, dtype: str) -> dict:
    """‖got − ref‖ / ‖ref‖ per output (per-token outputs on rows with a target); ok = all ≤ tol."""
    tol = TOLERANCE[dtype]
    errors = {}
    valid = ref["valid"]
    for key, r in ref.items():
        if key == "valid":
            continue
        g = got.get(key)
        if r is None or g is None:
            errors[key] = None if (r is None and g is None) else math.inf
            continue
        if key in ("logp", "entropy"):
            r, g = r[valid], g[valid]
        if g.shape != r.shape:
            errors[key] = math.inf
            continue
        denom = float(r.norm())
        err = float((g - r).norm()) / (denom if denom > 0 else 1.0)
        errors[key] = err if math.isfinite(err) else math.inf
    finite = [e for e in errors.values() if e is not None]
    worst = max(finite) if finite else None
    return {"ok": worst is not None and worst <= tol, "max_rel_err": worst, "tolerance": tol, "errors": errors,
            "worst_output": max((k for k in errors if errors[k] is not None), key=lambda k: errors[k], default=None)}


def check(row: dict, case: dict, fp_dir: Path, gold_row: dict | None, no_check: bool) -> None:
    """Set row["correctness"] (or a note why not) from the fingerprints saved by the workers."""
    if row["status"] != "ok":
        return
    fp_file, gold_file = fp_dir / f"{row['impl']}-{case['id']}.pt", fp_dir / f"_gold-{case['id']}.pt"
    if no_check or not gold_file.exists() or not fp_file.exists():
        why = "--no-check" if no_check else ((gold_row or {}).get("reason") or "no gold")
        row["correctness"] = None
        row["correctness_note"] = f"not checked: {why}"
        return
    row["correctness"] = compare(torch.load(gold_file), torch.load(fp_file), case["dtype"])


# --------------------------------------------------------------------------------------------
# one implementation on one case: timing and memory
# --------------------------------------------------------------------------------------------

def _clear(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def one_step(fn, x, device):
    """One forward + backward: (fwd_s, bwd_s, loss, extras)."""
    if device.type == "cuda":
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss, extras = fn(x)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize(device)
        return e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3, loss, extras
    t0 = time.perf_counter()
    loss, extras = fn(x)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, loss, extras


def measure_case(job: dict, case: dict, device: torch.device) -> tuple[dict, dict | None]:
    """(result row, fingerprint) of one implementation on one case."""
    impl = IMPLS[job["impl"]]
    k = job["input_sets"]
    seed = case_seed(job["seed"], case)
    sets = [make_inputs(case, seed + 104729 * i, device) for i in range(k)]
    fn = impl.build(case["workload"], device, DTYPES[case["dtype"]])
    row = {"grads_formed_in": impl.grads.get(case["workload"])}

    # warm-up 1 on set 0 (the gold's inputs): its outputs are the ones checked
    fwd, bwd, loss, extras = one_step(fn, sets[0], device)
    row["first_step_ms"] = (fwd + bwd) * 1e3  # includes compiling (Triton, torch.compile, the extension)
    fp = fingerprint(case, loss.detach(), extras, sets[0]["hidden"].grad, sets[0]["weight"].grad, sets[0]["valid"])
    del loss, extras
    _clear(sets[0])
    last = fwd + bwd
    for i in range(1, max(job["warmup"], k if impl.warm_all_sets else 1)):
        x = sets[i % k]
        fwd, bwd, loss, extras = one_step(fn, x, device)
        del loss, extras
        _clear(x)
        last = fwd + bwd
    repeats = job["repeats"]
    if job.get("case_budget_s") and last > 0:  # long cases: fewer repeats, never under min_repeats
        repeats = max(min(job["min_repeats"], repeats), min(repeats, int(job["case_budget_s"] / last)))
    gc.collect()
    if device.type == "cpu":
        _common.trim_malloc()

    fwds, bwds = [], []
    for r in range(repeats):
        x = sets[r % k]
        _clear(x)
        if r == 0:  # the first timed repeat is also the memory measurement (on set 0)
            peak = _common.PeakMemory(device)  # above the inputs of all sets
            peak.start()
        fwd, bwd, loss, extras = one_step(fn, x, device)
        if r == 0:
            extra_bytes = peak.stop()
            io = nbytes(x["hidden"].grad, x["weight"].grad, loss, *extras.values())
            row.update(peak_extra_bytes=extra_bytes, io_bytes=io, peak_above_io_bytes=extra_bytes - io,
                       memory_method=peak.method)
        del loss, extras
        _clear(x)
        fwds.append(fwd)
        bwds.append(bwd)
    tot = [a + b for a, b in zip(fwds, bwds)]
    n, d, v = case["N"], case["D"], case["V"]
    total = statistics.median(tot)
    row.update(status="ok", repeats=repeats, input_sets=k,
               fwd_ms=statistics.median(fwds) * 1e3, bwd_ms=statistics.median(bwds) * 1e3, total_ms=total * 1e3,
               fwd_ms_all=[t * 1e3 for t in fwds], bwd_ms_all=[t * 1e3 for t in bwds],
               total_ms_all=[t * 1e3 for t in tot], useful_tflops=6 * n * d * v / total / 1e12)
    if device.type == "cpu":
        row["torch_num_threads"] = torch.get_num_threads()
    return row, fp


def _oom(exc) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def worker(job_file: str) -> None:
    """One implementation (or ``_gold``) over the job's cases; one JSON line per finished case."""
    job = json.loads(Path(job_file).read_text())
    device = torch.device(job["device"])
    if job["impl"].startswith("hk_") and not job.get("hk_checks", False):
        _hk().set_checks(False)  # production setting: no device syncs for value checks
    out = Path(job["result_file"])
    for case in job["cases"]:
        t0 = time.perf_counter()
        try:
            if job["impl"] == "_gold":
                x = make_inputs(case, case_seed(job["seed"], case), device)
                loss, extras, gh, gw = gold(case, x)
                fp, row = fingerprint(case, loss, extras, gh, gw, x["valid"]), {"status": "ok"}
                del x, extras, gh, gw
            else:
                row, fp = measure_case(job, case, device)
        except Skip as exc:
            row, fp = {"status": "skipped", "reason": str(exc)}, None
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            kind = "oom" if _oom(exc) else "error"
            msg = (str(exc).strip().splitlines() or [""])[0][:400]
            row, fp = {"status": kind, "reason": f"{type(exc).__name__}: {msg}"}, None
            if kind == "error":
                traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if fp is not None:
            torch.save(fp, Path(job["fp_dir"]) / f"{job['impl']}-{case['id']}.pt")
        row.update(impl=job["impl"], case=case["id"], worker_case_s=time.perf_counter() - t0)
        with out.open("a") as f:  # the fingerprint is saved first: a line means the case is complete
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# the matmul ceiling and the device
# --------------------------------------------------------------------------------------------

def time_matmul(device: torch.device, size: int, dtype: torch.dtype, reps: int, warm: int) -> dict:
    """torch.matmul size³ over 3 rotating random input sets: median time and TFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(size, size, generator=g, device=device).to(dtype),
             torch.randn(size, size, generator=g, device=device).to(dtype)) for _ in range(3)]
    times = []
    for i in range(warm + reps):
        a, b = sets[i % 3]
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            torch.matmul(a, b)
            e1.record()
            torch.cuda.synchronize(device)
            t = e0.elapsed_time(e1) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            t = time.perf_counter() - t0
        if i >= warm:
            times.append(t)
    t = statistics.median(times)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "repeats": reps, "median_ms": t * 1e3,
            "tflops": 2 * size ** 3 / t / 1e12,
            "method": f"torch.matmul {size}³ over 3 rotating random input sets, {warm} warm-up, median of {reps}"}


def cuda_device_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    info = {"kind": "cuda", "name": torch.cuda.get_device_name(device), "capability": [p.major, p.minor],
            "total_memory_bytes": p.total_memory, "multi_processor_count": p.multi_processor_count,
            "cuda": torch.version.cuda, "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = q
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def ceiling_worker(job_file: str) -> None:
    """The matmul every efficiency is measured against (GPU: bf16 8192³; CPU: fp32 2048³), and the device."""
    job = json.loads(Path(job_file).read_text())
    device = torch.device(job["device"])
    if device.type == "cuda":
        info, mm = cuda_device_info(device), time_matmul(device, 8192, torch.bfloat16, reps=20, warm=5)
    else:
        info, mm = _common.cpu_device_info(), time_matmul(device, 2048, torch.float32, reps=5, warm=2)
    Path(job["result_file"]).write_text(json.dumps({"device": info, "matmul": mm}))


# --------------------------------------------------------------------------------------------
# worker processes, seen from the parent
# --------------------------------------------------------------------------------------------

class Job:
    """``bench/run.py --<kind> job.json`` in a fresh process. ``rows()`` yields each result line the
    worker appends to ``job["result_file"]`` as soon as it is complete, then ends with the process;
    stderr goes to a file beside the job (its tail is the reason of a crashed worker's cases)."""

    def __init__(self, kind: str, job: dict, tmp: Path, env_extra: dict | None = None,
                 timeout: float | None = None):
        self.tag = f"{kind}-{job.get('impl', '')}-{len(list(tmp.iterdir()))}"
        job_file = tmp / f"job-{self.tag}.json"
        job_file.write_text(json.dumps(job))
        self.result_file = Path(job["result_file"]) if "result_file" in job else None
        self.err_file = tmp / f"stderr-{self.tag}.txt"
        self.timeout, self.t0 = timeout, time.perf_counter()
        env = dict(os.environ, **(env_extra or {}))
        with self.err_file.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, str(RUN_PY), f"--{kind}", str(job_file)],
                                         stdout=err, stderr=subprocess.STDOUT, env=env)
        self.rc = None
        self._offset = 0

    def _new_lines(self) -> list[dict]:
        if self.result_file is None or not self.result_file.exists():
            return []
        with self.result_file.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def rows(self, poll_s: float = 0.2):
        while True:
            rc = self.proc.poll()
            yield from self._new_lines()
            if rc is not None:
                self.rc = rc
                yield from self._new_lines()
                return
            if self.timeout is not None and time.perf_counter() - self.t0 > self.timeout:
                self.kill()
                self.rc = 124
                yield from self._new_lines()
                return
            time.sleep(poll_s)

    def wait(self) -> int:
        for _ in self.rows():
            pass
        return self.rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def error_tail(self, lines: int = 1) -> str:
        try:
            text = self.err_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        why = "; ".join(text[-lines:]) if text else ""
        return f"timed out after {self.timeout:.0f} s{': ' + why if why else ''}" if self.rc == 124 else why
