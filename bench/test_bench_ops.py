"""pytest-benchmark wrappers for hykernels' core ops, one per (op, backend usable here).

Not collected by the default test run (pyproject's testpaths = ["tests"]) and not run in CI:

    python -m pytest bench/test_bench_ops.py --benchmark-only -q                 # measure
    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-autosave
    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-compare  # vs the last save
    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-compare-fail=median:10%

Shape: HK_BENCH_SHAPE="N,D,V" and HK_BENCH_DTYPE (default: small on CPU, fp32; on a GPU
8192,2048,32768 bf16). On CPU the triton backend runs in the interpreter at its own toy shape.
Each round draws from 3 rotating sets of fresh random inputs (~10% ignore_index rows); on a GPU
every round ends with a device synchronize so wall time covers the kernels.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # read when the Triton kernels are decorated: before hykernels loads them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("pytest_benchmark")

import hykernels as hk  # noqa: E402
from hykernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("reference", "torch_chunked", "triton", "cuda") if backends.availability(b, DEVICE) is None]
DTYPE = getattr(torch, os.environ.get("HK_BENCH_DTYPE", "bfloat16" if DEVICE.type == "cuda" else "float32"))
_DEFAULT = "8192,2048,32768" if DEVICE.type == "cuda" else "512,128,4096"
SHAPE = tuple(int(s) for s in os.environ.get("HK_BENCH_SHAPE", _DEFAULT).split(","))
INTERPRETER_SHAPE = (128, 64, 1024)  # the Triton interpreter is ~1000x slower than a GPU
SETS = 3
SPAN = 4  # answer tokens per probe (answer_span_logprobs)


def _shape(backend):
    return INTERPRETER_SHAPE if backend == "triton" and DEVICE.type == "cpu" else SHAPE


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(backend, seed):
    n, d, v = _shape(backend)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    kw = dict(generator=g, device=DEVICE)
    hidden = torch.randn(n, d, **kw).to(DTYPE).requires_grad_()
    weight = (torch.randn(v, d, **kw) / math.sqrt(d)).to(DTYPE).requires_grad_()
    targets = torch.randint(0, v, (n,), **kw)
    targets[torch.rand(n, **kw) < 0.1] = -100
    span_ids = torch.arange(n, device=DEVICE) // SPAN
    return dict(hidden=hidden, weight=weight, targets=targets, span_ids=span_ids, num_spans=math.ceil(n / SPAN),
                answer_targets=torch.randint(0, v, (n,), **kw), T=int((targets != -100).sum()))


def _rotating(backend):
    sets = [_inputs(backend, 1000 + i) for i in range(SETS)]
    state = {"i": 0}

    def setup():
        x = sets[state["i"] % SETS]
        state["i"] += 1
        x["hidden"].grad = x["weight"].grad = None
        return (x,), {}
    return setup


def _run(benchmark, backend, step, rounds=None):
    if rounds is None:
        rounds = 3 if backend == "triton" and DEVICE.type == "cpu" else 10
    benchmark.extra_info.update(shape=dict(zip("NDV", _shape(backend))), dtype=str(DTYPE), device=str(DEVICE))

    def timed(x):
        out = step(x)
        _sync()
        return out
    benchmark.pedantic(timed, setup=_rotating(backend), rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.fixture(autouse=True)
def _fast_checks():
    hk.set_checks(False)  # production setting: no device syncs for value checks
    yield
    hk.set_checks(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_step(benchmark, backend):
    """The CE training step: fused_loss(rd_weight=1/T) forward + backward."""
    def step(x):
        loss, _ = hk.fused_loss(x["hidden"], x["weight"], x["targets"], rd_weight=1.0 / x["T"], backend=backend)
        loss.backward()
    _run(benchmark, backend, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_forward(benchmark, backend):
    """token_stats under torch.no_grad(): scoring rollouts."""
    def step(x):
        with torch.no_grad():
            return hk.token_stats(x["hidden"], x["weight"], x["targets"], backend=backend)
    _run(benchmark, backend, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_backward(benchmark, backend):
    """token_stats forward + backward of a loss of logp and entropy."""
    def step(x):
        st = hk.token_stats(x["hidden"], x["weight"], x["targets"], backend=backend)
        (st.entropy.sum() - st.logp.sum()).backward()
    _run(benchmark, backend, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_answer_span_logprobs(benchmark, backend):
    """PRG probe support: answer_span_logprobs(reduce='mean') forward + backward."""
    def step(x):
        c = hk.answer_span_logprobs(x["hidden"], x["weight"], x["answer_targets"], x["span_ids"], x["num_spans"],
                                    backend=backend)
        c.sum().backward()
    _run(benchmark, backend, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prg_gains(benchmark, backend):
    """prg_gains over 4096 traces of 9 probes (K = 8; 32 traces in the Triton interpreter)."""
    interpreted = backend == "triton" and DEVICE.type == "cpu"
    traces = 32 if interpreted else 4096
    g = torch.Generator(device=DEVICE).manual_seed(7)
    support = [torch.randn(traces * 9, generator=g, device=DEVICE) for _ in range(SETS)]
    offsets = torch.arange(0, traces * 9 + 1, 9, device=DEVICE)
    state = {"i": 0}

    def step():
        state["i"] += 1
        out = hk.prg_gains(support[state["i"] % SETS], offsets, backend=backend)
        _sync()
        return out
    benchmark.extra_info.update(traces=traces, probes_per_trace=9, device=str(DEVICE))
    benchmark.pedantic(step, rounds=3 if interpreted else 10, warmup_rounds=1, iterations=1)
