#!/usr/bin/env python
"""Side-by-side lm_head benchmarks: hykernels against the materialised reference and the peers.

    python bench/run.py                                  # the preset for this machine (gpu or cpu)
    python bench/run.py --preset toy                     # seconds, CPU: the harness's own smoke run
    python bench/run.py --models smollm2-135m --n 256 1024 4096 --dtypes float32 \\
        --impls reference reference_compiled hk_torch_chunked --workloads ce token_stats prg

For every case (workload × model shape × N × dtype) and implementation it measures the forward
time, the backward time (reported separately, with which pass forms the gradients: fused designs
form them in forward and their backward only scales them), forward+backward, the peak memory above
the inputs, outputs and gradients, useful TFLOP/s = 6·N·D·V / (fwd+bwd) (hytuning.md §8) and the
efficiency against a matmul measured in the same run (GPU: bf16 8192³; CPU: fp32 2048³). Each
implementation's result is compared with an fp32 reference computed in the same run (fp64 for fp64
inputs); a wrong one is flagged WRONG in the table.

Workloads (each: one forward, then loss.backward()):
  ce           the CE training step: loss = mean cross-entropy over the ~90% non-ignored tokens
               (hykernels: fused_loss(rd_weight=1/T); peers: their fused linear CE)
  token_stats  per-token log-prob and entropy, loss = Σ_t a_t·(−logp_t) + b_t·entropy_t with
               random a, b > 0 (hykernels: token_stats; Liger: its per-token NLL/entropy path)
  prg          the PRG probe support (hytuning.md §3): answer_span_logprobs over answer rows, N =
               traces·(K+1)·answer_len rows (K = --prg-steps, spans of --prg-answer-len tokens),
               loss = Σ_s g_s·c_s with random g

Implementations: reference (hidden @ weightᵀ in the input dtype, fp32 logits, F.cross_entropy /
log_softmax, autograd), reference_compiled (the same under torch.compile), hk_torch_chunked,
hk_triton, hk_cuda (hykernels backends), liger_flce (Liger-Kernel's fused linear CE),
liger_nll_entropy (Liger's per-token NLL/entropy path), cce (Apple's Cut Cross-Entropy). Peers
are optional (`pip install hykernels[bench]`): a missing one is skipped, never a failure. On CPU
Triton kernels (hk_triton, liger_flce) run only in the interpreter, at toy sizes.

Timing: inputs are fresh random data (never zeros), drawn per case from one
recorded seed; --input-sets (≥ 3) sets rotate through warm-up and repeats; warm-up runs first;
the median of the repeats is reported. GPU: CUDA events around forward and backward; memory from
torch.cuda.max_memory_allocated. CPU: wall clock; memory from the kernel's RSS high-water mark
(VmHWM after clear_refs, see _common.py), each (implementation, case) in a fresh process.

Results: bench/results/<device>-<date>.json (or --out) with the device, versions and the exact
command; a PNG plot beside it (time and memory against N, one line per implementation; needs
matplotlib); a markdown table printed last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

# hykernels is imported lazily: TRITON_INTERPRET must be set before its Triton backend loads.

# --------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------

# name -> (hidden size D, vocabulary V) of the model's lm_head
MODELS = {
    "smollm2-135m": (576, 49152),
    "qwen2.5-1.5b": (1536, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
    "toy": (48, 509),  # ragged: neither is a multiple of any block size
}
WORKLOADS = ("ce", "token_stats", "prg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.10
# Correctness: ‖got − ref‖ / ‖ref‖ per output against the fp32 (fp64) reference of the same run.
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2}
# Triton on CPU is the interpreter, ~1000x slower than a GPU: only toy sizes.
INTERPRETER_MAX_NDV = 2 ** 25
PROJECTIONS = 8  # gradients are compared through G·R with R [D, 8] random (see fingerprint)

PRESETS = {
    "gpu": dict(models=["smollm2-135m", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b"], n=[4096, 16384, 65536],
                dtypes=["bfloat16"], workloads=list(WORKLOADS), prg_traces=[64, 512], repeats=10, warmup=3),
    "cpu": dict(models=["smollm2-135m"], n=[256, 1024, 4096], dtypes=["float32"], workloads=list(WORKLOADS),
                prg_traces=[16, 64], repeats=3, warmup=1),
    # issue 7's matrix: a Qwen-size and a Llama-3 lm_head at D=4096, bf16 (cuda against every path)
    "lmhead": dict(models=["4096:151936", "llama-3-8b"], n=[8192, 16384], dtypes=["bfloat16"],
                   workloads=["ce", "token_stats"], prg_traces=[64], repeats=10, warmup=3),
    "toy": dict(models=["toy"], n=[64, 200], dtypes=["float32"], workloads=list(WORKLOADS), prg_traces=[2],
                repeats=3, warmup=1),
}


def shape_of(model: str) -> tuple[int, int]:
    """A MODELS name, or 'D:V' for a custom shape."""
    if model in MODELS:
        return MODELS[model]
    m = re.fullmatch(r"(\d+):(\d+)", model)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}: one of {sorted(MODELS)} or D:V")
    return int(m.group(1)), int(m.group(2))


def build_cases(args) -> list[dict]:
    cases = []
    for workload in args.workloads:
        for model in args.models:
            d, v = shape_of(model)
            if workload == "prg":
                rows = [t * (args.prg_steps + 1) * args.prg_answer_len for t in args.prg_traces]
            else:
                rows = args.n
            for dtype in args.dtypes:
                for n in rows:
                    cases.append(dict(id=len(cases), workload=workload, model=model, D=d, V=v, N=n, dtype=dtype))
    return cases


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------

class Skip(Exception):
    """An implementation cannot run this case here (reported as skipped, not as a failure)."""


def _hk():
    import hykernels
    return hykernels


def _logits(h, w):
    """The naive lm_head: a GEMM in the input dtype, then the [N, V] logits in fp32 (fp64)."""
    z = h @ w.t()
    return z if z.dtype == torch.float64 else z.float()


def _segment_mean(logp, x):
    s = torch.zeros(x["num_spans"], dtype=logp.dtype, device=logp.device).index_add(0, x["span_ids"], logp)
    return s / x["counts"].to(logp.dtype)


def _loss_from_logits(workload: str, z: torch.Tensor, x: dict, scale: float = 1.0):
    """The reference loss of a workload from materialised logits: (loss, extras)."""
    if scale != 1.0:
        z = z * scale
    y = x["targets"]
    if workload == "ce":
        return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX), {}
    lsm = torch.log_softmax(z, dim=-1)
    logp = torch.where(x["valid"], lsm.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    if workload == "token_stats":
        entropy = -(lsm.exp() * lsm).sum(-1)
        loss = (x["a"] * -logp + x["b"] * entropy).sum()
        return loss, {"logp": logp, "entropy": entropy}
    c = _segment_mean(logp, x)
    return (x["g"] * c).sum(), {"support": c}


def _from_per_token(workload: str, logp, entropy, x: dict):
    """A workload's loss from per-token log-probs (and entropy) of a peer's per-token path."""
    logp = torch.where(x["valid"], logp.float(), 0.0)
    if workload == "ce":
        return -logp.sum() / x["T"], {}
    if workload == "token_stats":
        entropy = entropy.float()
        return (x["a"] * -logp + x["b"] * entropy).sum(), {"logp": logp, "entropy": entropy}
    c = _segment_mean(logp, x)
    return (x["g"] * c).sum(), {"support": c}


class Impl:
    name = ""
    description = ""
    workloads = WORKLOADS
    dtypes = tuple(DTYPES)
    needs: tuple = ()            # importable modules (optional peers)
    triton_kernels = False       # runs Triton kernels: on CPU only under the interpreter
    grads = {"ce": "bwd", "token_stats": "bwd", "prg": "bwd"}  # which pass forms dH, dW
    hidden = False               # not listed unless asked for (test-only)
    warm_all_sets = False        # warm up on every input set (compilers that may specialise on data)

    def static_skip(self, case: dict, device: str) -> str | None:
        """Why this cannot run ``case`` on ``device``, decided without running it (None: try)."""
        for mod in self.needs:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} not installed (optional peer: pip install hykernels[bench])"
        if case["workload"] not in self.workloads:
            return f"no {case['workload']} path"
        if case["dtype"] not in self.dtypes:
            return f"takes {', '.join(self.dtypes)} inputs"
        if self.triton_kernels and device == "cpu":
            ndv = case["N"] * case["D"] * case["V"]
            if ndv > INTERPRETER_MAX_NDV:
                return (f"Triton on CPU runs only in the interpreter: toy sizes only "
                        f"(N·D·V = {ndv:.2g} > {INTERPRETER_MAX_NDV:.2g})")
        return None

    def build(self, workload: str, device: torch.device, dtype: torch.dtype):
        """A callable x -> (loss, extras); raises Skip when it cannot run here."""
        raise NotImplementedError


class Reference(Impl):
    name = "reference"
    description = ("materialised logits: hidden @ weightᵀ in the input dtype, fp32 [N, V] logits, "
                   "F.cross_entropy / log_softmax, autograd")

    def build(self, workload, device, dtype):
        return lambda x: _loss_from_logits(workload, _logits(x["hidden"], x["weight"]), x)


class ReferenceCompiled(Impl):
    name = "reference_compiled"
    description = "the reference under torch.compile (default mode, static shapes)"
    warm_all_sets = True

    def build(self, workload, device, dtype):
        def fn(h, w, x):
            return _loss_from_logits(workload, _logits(h, w), x)

        try:
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale graphs
            compiled = torch.compile(fn, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - any failure to set up compile is a skip
            raise Skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}") from exc
        state = {"ok": False}

        def run(x):
            if state["ok"]:
                return compiled(x["hidden"], x["weight"], x)
            try:  # the first call compiles forward and backward; a failure there is the compiler's
                loss, _ = compiled(x["hidden"], x["weight"], x)
                loss.backward()
                del loss, _
            except Exception as exc:  # noqa: BLE001
                msg = (str(exc).strip().splitlines() or [""])[0][:300]
                raise Skip(f"torch.compile failed here: {type(exc).__name__}: {msg}") from exc
            x["hidden"].grad = x["weight"].grad = None
            state["ok"] = True
            return compiled(x["hidden"], x["weight"], x)

        return run


class Wrong(Impl):
    name = "wrong"
    description = "TEST ONLY (--inject-wrong): the reference with logits scaled by 1.25, a temperature bug"
    hidden = True

    def build(self, workload, device, dtype):
        return lambda x: _loss_from_logits(workload, _logits(x["hidden"], x["weight"]), x, scale=1.25)


class Hykernels(Impl):
    grads = {"ce": "fwd", "token_stats": "bwd", "prg": "bwd"}

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"hk_{backend}"
        self.triton_kernels = backend == "triton"
        self.description = {
            "torch_chunked": "hykernels torch_chunked backend: token chunks of materialised logits",
            "triton": "hykernels triton backend: logits tiles on-chip only (CPU: the interpreter)",
            "cuda": "hykernels cuda backend: cuBLAS chunks + fused epilogues",
        }[backend]
        self.dtypes = ("float32", "bfloat16", "float16") if backend in ("triton", "cuda") else tuple(DTYPES)

    def static_skip(self, case, device):
        from hykernels import backends

        if self.backend == "cuda":  # answers at once off a GPU (no extension build attempted)
            reason = backends.availability("cuda", torch.device(device))
            if reason is not None:
                return reason
        return super().static_skip(case, device)

    def build(self, workload, device, dtype):
        hk = _hk()
        from hykernels import backends

        reason = backends.availability(self.backend, device)
        if reason is not None:
            raise Skip(reason)
        b = self.backend
        if workload == "ce":
            return lambda x: (hk.fused_loss(x["hidden"], x["weight"], x["targets"], rd_weight=1.0 / x["T"],
                                            ignore_index=IGNORE_INDEX, backend=b)[0], {})
        if workload == "token_stats":
            def stats(x):
                st = hk.token_stats(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX, backend=b)
                return (x["a"] * -st.logp + x["b"] * st.entropy).sum(), {"logp": st.logp, "entropy": st.entropy}
            return stats

        def prg(x):
            c = hk.answer_span_logprobs(x["hidden"], x["weight"], x["targets"], x["span_ids"], x["num_spans"],
                                        reduce="mean", ignore_index=IGNORE_INDEX, backend=b)
            return (x["g"] * c).sum(), {"support": c}
        return prg


class LigerFLCE(Impl):
    name = "liger_flce"
    description = ("Liger-Kernel fused linear cross-entropy (liger_fused_linear_cross_entropy, Triton; "
                   "gradients formed in forward)")
    workloads = ("ce",)
    dtypes = ("float32", "bfloat16", "float16")
    needs = ("liger_kernel",)
    triton_kernels = True
    grads = {"ce": "fwd"}

    def build(self, workload, device, dtype):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda x: (liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                           ignore_index=IGNORE_INDEX, reduction="mean"), {})


class LigerNLLEntropy(Impl):
    name = "liger_nll_entropy"
    description = ("Liger-Kernel per-token NLL/entropy path (LigerFusedLinearScaledCrossEntropyFunction; "
                   "SM90: its CuTe DSL kernel; elsewhere its torch fallback in 512-token chunks)")
    dtypes = ("float32", "bfloat16", "float16")
    needs = ("liger_kernel",)

    def build(self, workload, device, dtype):
        try:
            from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod
        except ImportError as exc:
            raise Skip(f"this liger-kernel version has no per-token NLL/entropy path ({exc})") from exc
        fn = mod.LigerFusedLinearScaledCrossEntropyFunction
        try:
            impl = mod._resolve_implementation(device)
        except Exception as exc:  # noqa: BLE001 - e.g. the SM90 kernel's CuTe DSL is missing
            raise Skip(f"its kernel for this device does not load: {type(exc).__name__}: {exc}") from exc
        if impl is None:
            raise Skip("no implementation for this device")
        ent = workload == "token_stats"

        def run(x):
            out = fn.apply(x["hidden"], x["weight"], x["targets"], 1.0, IGNORE_INDEX, 1, ent)
            nll, entropy = out if ent else (out, None)
            return _from_per_token(workload, -nll, entropy, x)
        return run


class CCE(Impl):
    name = "cce"
    description = ("Apple Cut Cross-Entropy linear_cross_entropy (GPU: impl='cce', Triton; CPU: "
                   "impl='torch_compile'); prg uses reduction='none'")
    workloads = ("ce", "prg")
    dtypes = ("float32", "bfloat16", "float16")
    needs = ("cut_cross_entropy",)

    def build(self, workload, device, dtype):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        if workload == "ce":
            return lambda x: (linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                                   reduction="mean", impl=impl), {})

        def prg(x):
            nll = linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                       reduction="none", impl=impl)
            return _from_per_token(workload, -nll, None, x)
        return prg


IMPLS = {i.name: i for i in (Reference(), ReferenceCompiled(), Hykernels("torch_chunked"), Hykernels("triton"),
                             Hykernels("cuda"), LigerFLCE(), LigerNLLEntropy(), CCE(), Wrong())}
PUBLIC_IMPLS = [n for n, i in IMPLS.items() if not i.hidden]


# --------------------------------------------------------------------------------------------
# inputs, the fp32 gold, fingerprints
# --------------------------------------------------------------------------------------------

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
    if case["workload"] == "prg":
        span_len = case.get("span_len", 4)
        x["span_ids"] = torch.arange(n, device=device) // span_len
        x["num_spans"] = math.ceil(n / span_len)
        x["counts"] = torch.bincount(x["span_ids"], minlength=x["num_spans"])
        x["g"] = torch.randn(x["num_spans"], **f32)
    return x


def gold(case: dict, x: dict):
    """The fp32 (fp64) reference, token chunk by token chunk: (loss, extras, grad_hidden, grad_weight).
    Independent of hykernels; memory O(chunk·V)."""
    dt = torch.float64 if case["dtype"] == "float64" else torch.float32
    h, w, y, valid = x["hidden"].detach().to(dt), x["weight"].detach().to(dt), x["targets"], x["valid"]
    n, v = h.shape[0], w.shape[0]
    wl = case["workload"]
    if wl == "ce":
        alpha, beta = -valid.to(dt) / x["T"], None
    elif wl == "token_stats":
        alpha, beta = -x["a"].to(dt), x["b"].to(dt)
    else:
        alpha, beta = (x["g"] / x["counts"]).to(dt)[x["span_ids"]], None
    w = w.requires_grad_()
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    logp_all, ent_all, loss = torch.zeros(n, dtype=dt, device=h.device), torch.zeros(n, dtype=dt, device=h.device), 0.0
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
    elif wl == "prg":
        extras = {"support": _segment_mean(logp_all, x)}
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


# --------------------------------------------------------------------------------------------
# worker: one implementation over a list of cases, in a fresh process
# --------------------------------------------------------------------------------------------

def _clear(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _one_step(fn, x, device):
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
    seed = job["seed"] + 7919 * case["id"]
    sets = [make_inputs(case, seed + 104729 * i, device) for i in range(k)]
    fn = impl.build(case["workload"], device, DTYPES[case["dtype"]])
    row = {"grads_formed_in": impl.grads.get(case["workload"])}

    # warm-up 1 on set 0 (the gold's inputs): its outputs are the ones checked
    fwd, bwd, loss, extras = _one_step(fn, sets[0], device)
    fp = fingerprint(case, loss.detach(), extras, sets[0]["hidden"].grad, sets[0]["weight"].grad, sets[0]["valid"])
    del loss, extras
    _clear(sets[0])
    last = fwd + bwd
    for i in range(1, max(job["warmup"], k if impl.warm_all_sets else 1)):
        x = sets[i % k]
        fwd, bwd, loss, extras = _one_step(fn, x, device)
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
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            else:
                peak = _common.HostPeak()
                peak.start()
        fwd, bwd, loss, extras = _one_step(fn, x, device)
        if r == 0:
            if device.type == "cuda":
                extra_bytes = torch.cuda.max_memory_allocated(device) - base
                method = "torch.cuda.max_memory_allocated - memory_allocated before (inputs of all sets)"
            else:
                extra_bytes = peak.stop()
                method = peak.method
            io = _nbytes(x["hidden"].grad, x["weight"].grad, loss, *extras.values())
            row.update(peak_extra_bytes=extra_bytes, io_bytes=io, peak_above_io_bytes=extra_bytes - io,
                       memory_method=method)
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
    return row, fp


def _oom(exc) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def worker(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    device = torch.device(job["device"])
    if job["impl"].startswith("hk_") and not job.get("hk_checks", False):
        _hk().set_checks(False)  # production setting: no device syncs for value checks
    out = Path(job["result_file"])
    for case in job["cases"]:
        t0 = time.perf_counter()
        try:
            if job["impl"] == "_gold":
                x = make_inputs(case, job["seed"] + 7919 * case["id"], device)
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
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def ceiling_worker(job_file: str) -> None:
    """The matmul every efficiency is measured against, and the device description."""
    job = json.loads(Path(job_file).read_text())
    device = torch.device(job["device"])
    if device.type == "cuda":
        size, dtype, reps, warm = 8192, torch.bfloat16, 20, 5
        p = torch.cuda.get_device_properties(device)
        info = {"kind": "cuda", "name": torch.cuda.get_device_name(device), "capability": [p.major, p.minor],
                "total_memory_bytes": p.total_memory,
                "multi_processor_count": p.multi_processor_count, "cuda": torch.version.cuda,
                "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = q
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        size, dtype, reps, warm = 2048, torch.float32, 5, 2
        info = _common.cpu_device_info()
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
    res = {"device": info, "matmul": {"size": size, "dtype": str(dtype).replace("torch.", ""), "repeats": reps,
                                      "median_ms": t * 1e3, "tflops": 2 * size ** 3 / t / 1e12,
                                      "method": f"torch.matmul {size}³ over 3 rotating random input sets, "
                                                f"{warm} warm-up, median of {reps}"}}
    Path(job["result_file"]).write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------

def _spawn(kind: str, job: dict, tmp: Path, env_extra: dict, timeout: float | None) -> tuple[int, str]:
    job_file = tmp / f"job-{kind}-{job.get('impl', '')}-{len(list(tmp.iterdir()))}.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{kind}", str(job_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s: {(exc.stderr or '')[-2000:] if isinstance(exc.stderr, str) else ''}"
    return proc.returncode, (proc.stderr or "")[-4000:]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


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
    head = (f"lm_head bench on {report['device_name']}: median of repeats, ms; peak = MiB above inputs, outputs "
            f"and gradients; TFLOP/s = 6·N·D·V / (fwd+bwd)")
    if ceil:
        head += f"; eff = vs {ceil['dtype']} {ceil['size']}³ matmul ({ceil['tflops']:.3g} TFLOP/s, this run)"
    lines = [head, "",
             "| workload | model | dtype | N | impl | grads in | fwd ms | bwd ms | fwd+bwd ms | peak MiB | TFLOP/s "
             "| eff % | max rel err | correct |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if r["status"] == "skipped":
            continue
        c = r.get("correctness") or {}
        err = c.get("max_rel_err")
        eff = r.get("efficiency")
        lines.append(
            f"| {r['workload']} | {r['model']} | {r['dtype']} | {r['N']} | {r['impl']} | "
            f"{r.get('grads_formed_in') or '-'} | {_fmt_ms(r.get('fwd_ms'))} | {_fmt_ms(r.get('bwd_ms'))} | "
            f"{_fmt_ms(r.get('total_ms'))} | {_common.fmt_mib(r.get('peak_above_io_bytes'))} | "
            f"{'-' if r.get('useful_tflops') is None else format(r['useful_tflops'], '.3g')} | "
            f"{'-' if eff is None else format(100 * eff, '.3g')} | {'-' if err is None else format(err, '.1e')} | "
            f"{_correct_cell(r)} |")
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
        d, v = report_shape(report, model)
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


def report_shape(report, model):
    for c in report["cases"]:
        if c["model"] == model:
            return c["D"], c["V"]
    return None, None


def parent(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    isolate = args.isolate or ("case" if device == "cpu" else "impl")
    impls = list(args.impls) + (["wrong"] if args.inject_wrong and "wrong" not in args.impls else [])
    cases = build_cases(args)
    for c in cases:
        c["span_len"] = args.prg_answer_len
    date = _dt.date.today().isoformat()
    base_job = dict(device=device, seed=seed, repeats=args.repeats, min_repeats=min(3, args.repeats),
                    warmup=args.warmup, input_sets=args.input_sets, case_budget_s=args.case_budget,
                    hk_checks=args.hk_checks)
    results, log = [], lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="hykernels-run-") as tmp:
        tmp = Path(tmp)
        fp_dir = tmp / "fp"
        fp_dir.mkdir()

        # 1. the matmul ceiling and the device description
        log(f"device {device}: matmul ceiling ...")
        ceil_file = tmp / "ceiling.json"
        ceil_job = dict(device=device, result_file=str(ceil_file))
        if device == "cpu":  # nothing else runs in this process yet: measure here, save a process start
            (tmp / "ceiling-job.json").write_text(json.dumps(ceil_job))
            ceiling_worker(str(tmp / "ceiling-job.json"))
            rc, err = 0, ""
        else:
            rc, err = _spawn("ceiling", ceil_job, tmp, {}, args.worker_timeout)
        ceiling = json.loads(ceil_file.read_text()) if rc == 0 and ceil_file.exists() else {"error": err}
        dev_info = ceiling.get("device") or {"kind": device}
        device_name = dev_info.get("name") or dev_info.get("lscpu_model_name") or device
        if "matmul" in ceiling:
            log(f"  {ceiling['matmul']['dtype']} {ceiling['matmul']['size']}³ matmul: "
                f"{ceiling['matmul']['tflops']:.3g} TFLOP/s")

        # 2. which (impl, case) pairs run, and the skips decided up front
        todo = {}
        for name in impls:
            for c in cases:
                reason = IMPLS[name].static_skip(c, device)
                if reason is None:
                    todo.setdefault(name, []).append(c)
                else:
                    results.append(dict(impl=name, case=c["id"], status="skipped", reason=reason))

        # 3. the gold (one process, all cases that anything runs), then each implementation
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
            job = dict(base_job, impl=name, cases=group, result_file=str(res_file), fp_dir=str(fp_dir))
            t0 = time.perf_counter()
            la_before = _common.loadavg()
            if name == "_gold" and device == "cpu":  # untimed: no need for a fresh process
                (tmp / "gold-job.json").write_text(json.dumps(job))
                worker(str(tmp / "gold-job.json"))
                rc, err = 0, ""
            else:
                rc, err = _spawn("worker", job, tmp, env, args.worker_timeout)
            rows = [json.loads(line) for line in res_file.read_text().splitlines()] if res_file.exists() else []
            done = {r["case"] for r in rows}
            for c in group:  # a crashed worker: its remaining cases are errors
                if c["id"] not in done:
                    rows.append(dict(impl=name, case=c["id"], status="error",
                                     reason=f"worker exited with {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"))
            for r in rows:
                r["loadavg_before"], r["loadavg_after"] = la_before, _common.loadavg()
                if r["status"] == "ok" and name != "_gold":
                    log(f"  N={cases[r['case']]['N']}: fwd+bwd {r['total_ms']:.4g} ms, "
                        f"peak {_common.fmt_mib(r.get('peak_above_io_bytes'))} MiB")
                elif r["status"] != "ok":
                    log(f"  {r['status']}: {r.get('reason')}")
            log(f"  ({time.perf_counter() - t0:.1f} s)")
            if name == "_gold":
                gold_rows = {r["case"]: r for r in rows}
            else:
                results += rows

        # 4. correctness against the gold of the same inputs, efficiency against the matmul
        for r in results:
            c = cases[r["case"]]
            r.update({k: c[k] for k in ("workload", "model", "D", "V", "N", "dtype")})
            if r["status"] != "ok":
                continue
            fp_file, gold_file = fp_dir / f"{r['impl']}-{c['id']}.pt", fp_dir / f"_gold-{c['id']}.pt"
            if args.no_check or not gold_file.exists() or not fp_file.exists():
                why = "--no-check" if args.no_check else (gold_rows.get(c["id"], {}).get("reason") or "no gold")
                r["correctness"] = None
                r["correctness_note"] = f"not checked: {why}"
                continue
            r["correctness"] = compare(torch.load(gold_file), torch.load(fp_file), c["dtype"])
        for r in results:
            if r["status"] == "ok" and "matmul" in ceiling:
                r["efficiency"] = r["useful_tflops"] / ceiling["matmul"]["tflops"]

    order = {name: i for i, name in enumerate(impls)}
    results.sort(key=lambda r: (r["case"], order.get(r["impl"], 99)))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{_slug(device if device == 'cpu' else device_name)}-{date}.json"
    report = {
        "benchmark": "hykernels lm_head: side-by-side with the reference and the peers (bench/run.py)",
        "date": date,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "argv": sys.argv,
        "device_name": device_name,
        "device": dev_info,
        "versions": {**_common.versions("liger-kernel", "cut-cross-entropy", "matplotlib", "transformers"),
                     "hykernels_commit": _common.git_commit()},
        "config": {"device": device, "preset": args.preset, "models": args.models, "n": args.n,
                   "dtypes": args.dtypes, "workloads": args.workloads, "impls": impls, "repeats": args.repeats,
                   "warmup": args.warmup, "input_sets": args.input_sets, "case_budget_s": args.case_budget,
                   "isolate": isolate, "seed": seed, "prg_traces": args.prg_traces, "prg_steps": args.prg_steps,
                   "prg_answer_len": args.prg_answer_len, "hk_value_checks": args.hk_checks,
                   "interpreter_max_ndv": INTERPRETER_MAX_NDV},
        "ceiling": ceiling,
        "implementations": {n: {"description": IMPLS[n].description, "workloads": list(IMPLS[n].workloads),
                                "grads_formed_in": IMPLS[n].grads} for n in impls},
        "workloads": {
            "ce": "loss = mean CE over non-ignored tokens (~10% rows ignore_index=-100); hykernels: "
                  "fused_loss(rd_weight=1/T)",
            "token_stats": "loss = Σ a_t·(−logp_t) + b_t·entropy_t, a, b ~ (U(0,1)+0.1)/T on rows with a target",
            "prg": f"answer_span_logprobs(reduce='mean') over N answer rows in spans of {args.prg_answer_len} "
                   f"(N = traces·(K+1)·{args.prg_answer_len}, K = {args.prg_steps}); loss = Σ g_s·c_s, g ~ randn",
            "inputs": "hidden ~ randn[N, D], weight ~ randn[V, D]/sqrt(D), targets ~ U[0, V); fresh per case and "
                      "input set from the recorded seed",
        },
        "timing": ("GPU: CUDA events around forward and backward; CPU: wall clock. Warm-up first (the first "
                   "warm-up's outputs are the ones checked), then repeats rotating over input_sets sets of "
                   "inputs; median reported; total = median of per-repeat fwd+bwd. Gradients are set to None "
                   "before each repeat. On CPU each (implementation, case) runs in a fresh process"
                   if isolate == "case" else
                   "GPU: CUDA events around forward and backward; CPU: wall clock. Warm-up first (the first "
                   "warm-up's outputs are the ones checked), then repeats rotating over input_sets sets of "
                   "inputs; median reported; total = median of per-repeat fwd+bwd. Gradients are set to None "
                   "before each repeat. One process per implementation"),
        "memory": ("measured on the first timed repeat: peak_extra_bytes = peak above what was allocated "
                   "before it (all input sets); peak_above_io_bytes = that minus io_bytes (the gradients and "
                   "the outputs, which any implementation must hold), hytuning.md §8"),
        "correctness": {"method": "each implementation's loss, per-token outputs (rows with a target) and "
                                  "gradients (projected on 8 fixed random directions) against an fp32 reference "
                                  "(fp64 for fp64 inputs) computed chunk by chunk in the same run on the same "
                                  "inputs: ok when every ‖got − ref‖/‖ref‖ ≤ the dtype's tolerance",
                        "tolerance": TOLERANCE},
        "cases": cases,
        "results": results,
    }
    return emit(report, out, args)


def emit(report: dict, out: Path, args) -> int:
    """Write the JSON and the plot beside it, print the skips and the markdown table (last)."""
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    report["machine_busy_warning"] = busy_warning(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    why_not = None if args.no_plot else plot(report, png)
    report["plot"] = None if (args.no_plot or why_not) else png.name  # beside the JSON
    report["plot_skipped"] = "--no-plot" if args.no_plot else why_not
    out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")
    if report["plot"]:
        log(f"wrote {png}")
    else:
        log(f"no plot: {report['plot_skipped']}")
    for line in skipped_summary(report):
        print(line)
    if report["machine_busy_warning"]:
        print("WARNING: " + report["machine_busy_warning"])
    print(markdown_table(report), flush=True)
    bad = [r for r in report["results"]
           if r["status"] == "error" or (r.get("correctness") and not r["correctness"]["ok"])]
    return 1 if (args.strict and bad) else 0


def merge(args) -> int:
    """One report from several runs' JSON (e.g. a GPU matrix split over several calls): cases and
    results concatenated, each part keeping its own ceiling and efficiency; table and plot redone."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    report = dict(parts[0])
    cases, results, impls = [], [], []
    for part in parts:
        remap = {}
        for c in part["cases"]:
            remap[c["id"]] = len(cases)
            cases.append(dict(c, id=len(cases)))
        results += [dict(r, case=remap[r["case"]]) for r in part["results"]]
        impls += [i for i in part["config"]["impls"] if i not in impls]
    report.update(cases=cases, results=results, config=dict(parts[0]["config"], impls=impls),
                  command=shlex.join([sys.executable] + sys.argv), argv=sys.argv,
                  timestamp_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  merged_from=[{"file": str(f), "command": p["command"], "timestamp_utc": p["timestamp_utc"],
                                "ceiling": p.get("ceiling"), "config": p["config"]}
                               for f, p in zip(args.merge, parts)])
    names = {p["device_name"] for p in parts}
    if len(names) > 1:
        report["device_name"] = " + ".join(sorted(names))
    if not args.out:
        raise SystemExit("--merge needs --out")
    return emit(report, Path(args.out), args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models: " + ", ".join(f"{k} (D={d}, V={v})" for k, (d, v) in MODELS.items())
                                       + ", or D:V")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="defaults for the options below (default: gpu with CUDA, else cpu)")
    p.add_argument("--models", nargs="+", help="model shapes (names below or D:V)")
    p.add_argument("--n", type=int, nargs="+", help="rows N for the ce and token_stats workloads")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS)
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=PUBLIC_IMPLS, metavar="IMPL",
                   help=f"implementations (default: all of {', '.join(PUBLIC_IMPLS)})")
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
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>.json)")
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
        worker(args.worker)
        return 0
    if args.ceiling:
        ceiling_worker(args.ceiling)
        return 0
    if args.merge:
        return merge(args)
    preset = args.preset or ("gpu" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
                             else "cpu")
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
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
