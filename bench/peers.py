"""What bench/run.py measures: the workloads and the implementations that run them.

Workloads (each: one forward giving a scalar loss, then loss.backward()):
  ce           the CE training step: mean cross-entropy over the ~90% non-ignored tokens
               (hykernels: fused_loss(rd_weight=1/T); peers: their fused linear CE)
  token_stats  per-token log-prob and entropy, loss = Σ_t a_t·(−logp_t) + b_t·entropy_t with
               random a, b > 0 (hykernels: token_stats; Liger: its per-token NLL/entropy path)
  rd_rlif      the RD + RLIF step of docs/math.md §5: loss = Σ_t r_t·(−logp_t) + s_t·(−min(ρ_t·A_t,
               clip(ρ_t)·A_t)) with ρ ≡ 1 (with gradient), random weights r, s > 0 and advantages A
               (hykernels: fused_loss(rd_weight, rlif_weight, advantages))
  prg          the PRG probe support (docs/math.md §3): answer_span_logprobs over answer rows, loss
               = Σ_s g_s·c_s with random g

Implementations (``IMPLS``, in the order a run takes them: hykernels first, then the peers, then
the references, ``reference_compiled`` last since compiling can take minutes):
  hk_cuda, hk_triton, hk_torch_chunked, hk_reference   the hykernels backends
  hk_torch_chunked_stats  token_stats (+ its backward) of torch_chunked on the CE workload
  liger_flce          Liger-Kernel's fused linear cross-entropy
  cce                 Apple's Cut Cross-Entropy
  liger_nll_entropy   Liger's per-token NLL/entropy path
  torch_lce           torch's chunked F.linear_cross_entropy (reduction="mean": gradients in forward)
  torch_lce_none      the same with reduction="none" (per-token NLL, logits recomputed in backward)
  reference           hidden @ weightᵀ in the input dtype, fp32 [N, V] logits, autograd
  reference_compiled  the same under torch.compile
Peers are optional (``pip install hykernels[bench]``): a missing one is a skip, never a failure.
On CPU, Triton kernels run only in the interpreter, at toy sizes.

An implementation is ``Impl.build(workload, device, dtype)`` -> ``fn(x) -> (loss, extras)`` where
``x`` is the input dict of measure.make_inputs and ``extras`` the per-token outputs checked
against the gold (logp, entropy, support).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

WORKLOADS = ("ce", "token_stats", "rd_rlif", "prg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.10
CLIP_EPS = 0.2  # fused_loss's default clip_eps=(0.2, 0.2)
# Triton on CPU is the interpreter, ~1000x slower than a GPU: only toy sizes.
INTERPRETER_MAX_NDV = 2 ** 25


class Skip(Exception):
    """An implementation cannot run this case here (reported as skipped, not as a failure)."""


def _hk():
    import hykernels  # lazily: TRITON_INTERPRET must be set before its Triton backend loads

    return hykernels


# --------------------------------------------------------------------------------------------
# the workloads' losses, written once for every path that has logits or per-token log-probs
# --------------------------------------------------------------------------------------------

def logits(h, w):
    """The naive lm_head: a GEMM in the input dtype, then the [N, V] logits in fp32 (fp64)."""
    z = h @ w.t()
    return z if z.dtype == torch.float64 else z.float()


def segment_mean(logp, x):
    s = torch.zeros(x["num_spans"], dtype=logp.dtype, device=logp.device).index_add(0, x["span_ids"], logp)
    return s / x["counts"].to(logp.dtype)


def loss_from_logp(workload: str, logp, entropy, x: dict):
    """A workload's loss from per-token log-probs (and entropy): (loss, extras)."""
    logp = torch.where(x["valid"], logp, 0.0)
    if workload == "ce":
        return -logp.sum() / x["T"], {}
    if workload == "token_stats":
        return (x["a"] * -logp + x["b"] * entropy).sum(), {"logp": logp, "entropy": entropy}
    if workload == "rd_rlif":
        rho = torch.exp(logp - logp.detach())  # ≡ 1, with the gradient of logp (old_logp=None)
        adv = x["adv"]
        pg = -torch.minimum(rho * adv, rho.clamp(1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
        return (x["rd"] * -logp + x["rlif"] * pg).sum(), {"logp": logp}
    c = segment_mean(logp, x)
    return (x["g"] * c).sum(), {"support": c}


def loss_from_logits(workload: str, z: torch.Tensor, x: dict, scale: float = 1.0):
    """The reference loss of a workload from materialised logits: (loss, extras)."""
    if scale != 1.0:
        z = z * scale
    y = x["targets"]
    if workload == "ce":
        return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX), {}
    lsm = torch.log_softmax(z, dim=-1)
    logp = lsm.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(lsm.exp() * lsm).sum(-1) if workload == "token_stats" else None
    return loss_from_logp(workload, logp, entropy, x)


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------

class Impl:
    name = ""
    description = ""
    workloads = WORKLOADS
    dtypes = tuple(DTYPES)
    needs: tuple = ()            # importable modules (optional peers)
    triton_kernels = False       # runs Triton kernels: on CPU only under the interpreter
    grads = dict.fromkeys(WORKLOADS, "bwd")  # which pass forms dH, dW
    default = True               # run when --impls is not given
    hidden = False               # not listed at all unless asked for (test-only)
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


class Hykernels(Impl):
    grads = {"ce": "fwd", "token_stats": "bwd", "rd_rlif": "fwd", "prg": "bwd"}

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"hk_{backend}"
        self.triton_kernels = backend == "triton"
        self.description = {
            "torch_chunked": "hykernels torch_chunked backend: token chunks of materialised logits",
            "triton": "hykernels triton backend: logits tiles on-chip only (CPU: the interpreter)",
            "cuda": "hykernels cuda backend: cuBLAS chunks + fused epilogues",
            "reference": "hykernels reference backend: the whole [N, V] logits in fp32 (its oracle)",
        }[backend]
        self.dtypes = ("float32", "bfloat16", "float16") if backend in ("triton", "cuda") else tuple(DTYPES)
        self.default = backend != "reference"  # ~ the bench's own reference: asked for by name (cpu-backends)

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
        b, kw = self.backend, dict(ignore_index=IGNORE_INDEX, backend=self.backend)
        if workload == "ce":
            return lambda x: (hk.fused_loss(x["hidden"], x["weight"], x["targets"], rd_weight=1.0 / x["T"], **kw)[0],
                              {})
        if workload == "rd_rlif":
            def rd_rlif(x):
                loss, st = hk.fused_loss(x["hidden"], x["weight"], x["targets"], rd_weight=x["rd"],
                                         rlif_weight=x["rlif"], advantages=x["adv"], **kw)
                return loss, {"logp": st.logp}
            return rd_rlif
        if workload == "token_stats":
            def stats(x):
                st = hk.token_stats(x["hidden"], x["weight"], x["targets"], **kw)
                return (x["a"] * -st.logp + x["b"] * st.entropy).sum(), {"logp": st.logp, "entropy": st.entropy}
            return stats

        def prg(x):
            c = hk.answer_span_logprobs(x["hidden"], x["weight"], x["targets"], x["span_ids"], x["num_spans"],
                                        reduce="mean", ignore_index=IGNORE_INDEX, backend=b)
            return (x["g"] * c).sum(), {"support": c}
        return prg


class HykernelsStats(Hykernels):
    """hykernels' token_stats on the cross-entropy workload: per-token log-probs, loss = mean
    −logp, the gradients from its backward (the logits recomputed: 8·N·D·V). The per-token path's
    counterpart of torch_lce_none; hk_<backend> runs the same workload through fused_loss."""

    grads = {"ce": "bwd"}
    workloads = ("ce",)

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"hk_{backend}_stats"
        self.description = f"hykernels {backend} backend, token_stats on the CE workload (logits recomputed in backward)"
        self.default = False  # asked for by name (the cpu-torch preset)

    def build(self, workload, device, dtype):
        hk = _hk()
        super().build(workload, device, dtype)  # the availability check
        return lambda x: (-(hk.token_stats(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                           backend=self.backend).logp.sum()) / x["T"], {})


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


class CCE(Impl):
    name = "cce"
    description = ("Apple Cut Cross-Entropy linear_cross_entropy (GPU: impl='cce', Triton; CPU: "
                   "impl='torch_compile'); rd_rlif and prg use reduction='none'")
    workloads = ("ce", "rd_rlif", "prg")
    dtypes = ("float32", "bfloat16", "float16")
    needs = ("cut_cross_entropy",)

    def build(self, workload, device, dtype):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        if workload == "ce":
            return lambda x: (linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                                   reduction="mean", impl=impl), {})

        def per_token(x):
            nll = linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX,
                                       reduction="none", impl=impl)
            return loss_from_logp(workload, -nll.float(), None, x)
        return per_token


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
            return loss_from_logp(workload, -nll.float(), None if entropy is None else entropy.float(), x)
        return run


def torch_lce_source() -> str:
    """Where torch's chunked linear cross-entropy comes from: ``torch`` when this torch has
    ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions`` (2.13+), ``file:DIR`` when
    ``HYKERNELS_TORCH_LCE_SRC`` names a folder holding torch 2.13's pure-Python
    ``linear_cross_entropy.py`` and ``linear_cross_entropy_options.py`` (taken from its wheel, for an
    older torch such as the GPU machine's 2.11: the ops it calls exist there), else ''."""
    if hasattr(torch.nn, "LinearCrossEntropyOptions") and hasattr(F, "linear_cross_entropy"):
        return "torch"
    src = os.environ.get("HYKERNELS_TORCH_LCE_SRC")
    if src and all(os.path.isfile(os.path.join(src, f"{m}.py")) for m in _TORCH_LCE_FILES):
        return f"file:{src}"
    return ""


_TORCH_LCE_FILES = ("linear_cross_entropy_options", "linear_cross_entropy")


@functools.lru_cache(maxsize=None)
def _torch_lce_modules(src: str):
    """(options module, op module) of torch's chunked path loaded from the files in ``src``."""
    import sys

    mods = []
    for name in _TORCH_LCE_FILES:
        spec = importlib.util.spec_from_file_location(f"_hk_bench_torch_{name}", os.path.join(src, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return tuple(mods)


def torch_lce(hidden, weight, targets, reduction: str):
    """torch's ``F.linear_cross_entropy(hidden, weight, targets, reduction=..., ignore_index=-100,
    options=LinearCrossEntropyOptions())``: the chunked path with its automatic chunk size and
    accumulation policy. From files (torch_lce_source), the same dispatch F.linear_cross_entropy
    makes: options._adjust, then the chunked op."""
    src = torch_lce_source()
    if src == "torch":
        return F.linear_cross_entropy(hidden, weight, targets, reduction=reduction, ignore_index=IGNORE_INDEX,
                                      options=torch.nn.LinearCrossEntropyOptions())
    if not src:
        raise Skip("this torch has no F.linear_cross_entropy with LinearCrossEntropyOptions (torch >= 2.13) and "
                   "HYKERNELS_TORCH_LCE_SRC names no folder with its source")
    opts_mod, op_mod = _torch_lce_modules(src[len("file:"):])
    n, d = hidden.shape
    o = opts_mod.LinearCrossEntropyOptions()._adjust(num_batches=n, in_features=d, num_classes=weight.shape[0],
                                                     dtype=hidden.dtype, device=hidden.device)
    if reduction == "none":
        return op_mod._linear_cross_entropy_batch_chunked_no_reduction(
            hidden, weight, targets, None, None, IGNORE_INDEX, o.batch_chunk_size, o.acc_policy, o.acc_dtype)
    grad = torch.is_grad_enabled()
    return op_mod._linear_cross_entropy_batch_chunked(
        hidden, weight, targets, None, None, reduction, IGNORE_INDEX, 0.0, o.batch_chunk_size, o.acc_policy,
        o.acc_dtype, o.allow_retain_graph, hidden.requires_grad and grad, weight.requires_grad and grad, False)[0]


class TorchLCE(Impl):
    """torch's own chunked linear cross-entropy (torch.nn.functional.linear_cross_entropy with
    LinearCrossEntropyOptions(): no [N, V] logits). ``reduction="mean"`` forms the gradients in its
    forward pass (as hykernels' fused_loss); ``"none"`` returns per-token NLL and recomputes the
    logits in backward (as hykernels' token_stats), so it runs every per-token workload but
    token_stats (no entropy)."""

    def __init__(self, reduction: str):
        self.reduction = reduction
        self.name = "torch_lce" if reduction == "mean" else "torch_lce_none"
        self.workloads = ("ce",) if reduction == "mean" else ("ce", "rd_rlif", "prg")
        self.grads = dict.fromkeys(self.workloads, "fwd" if reduction == "mean" else "bwd")
        self.dtypes = ("float32", "bfloat16", "float16")
        self.description = (f"torch F.linear_cross_entropy(reduction={reduction!r}, "
                            f"options=LinearCrossEntropyOptions()): torch's chunked path, automatic chunk size "
                            f"and acc_policy" + (", gradients formed in forward" if reduction == "mean" else
                                                 ", per-token NLL, logits recomputed in backward"))

    def static_skip(self, case, device):
        if not torch_lce_source():
            return ("torch < 2.13 has no F.linear_cross_entropy options (set HYKERNELS_TORCH_LCE_SRC to a folder "
                    "with torch 2.13's linear_cross_entropy*.py)")
        return super().static_skip(case, device)

    def build(self, workload, device, dtype):
        if self.reduction == "mean":
            return lambda x: (torch_lce(x["hidden"], x["weight"], x["targets"], "mean"), {})

        def per_token(x):
            nll = torch_lce(x["hidden"], x["weight"], x["targets"], "none")
            return loss_from_logp(workload, -nll.float(), None, x)
        return per_token


class Reference(Impl):
    name = "reference"
    description = ("materialised logits: hidden @ weightᵀ in the input dtype, fp32 [N, V] logits, "
                   "F.cross_entropy / log_softmax, autograd")

    def build(self, workload, device, dtype):
        return lambda x: loss_from_logits(workload, logits(x["hidden"], x["weight"]), x)


class ReferenceCompiled(Impl):
    name = "reference_compiled"
    description = "the reference under torch.compile (default mode, static shapes)"
    warm_all_sets = True

    def build(self, workload, device, dtype):
        def fn(h, w, x):
            return loss_from_logits(workload, logits(h, w), x)

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
    default = False

    def build(self, workload, device, dtype):
        return lambda x: loss_from_logits(workload, logits(x["hidden"], x["weight"]), x, scale=1.25)


# The run order: hykernels paths first, then the peers, then the references (compile last).
IMPLS = {i.name: i for i in (Hykernels("cuda"), Hykernels("triton"), Hykernels("torch_chunked"),
                             HykernelsStats("torch_chunked"), LigerFLCE(),
                             CCE(), LigerNLLEntropy(), TorchLCE("mean"), TorchLCE("none"), Reference(),
                             ReferenceCompiled(), Hykernels("reference"), Wrong())}
PUBLIC_IMPLS = [n for n, i in IMPLS.items() if not i.hidden]
DEFAULT_IMPLS = [n for n, i in IMPLS.items() if i.default]


def in_run_order(names) -> list[str]:
    """``names`` (deduplicated) in the order of IMPLS."""
    order = list(IMPLS)
    return sorted(dict.fromkeys(names), key=order.index)
