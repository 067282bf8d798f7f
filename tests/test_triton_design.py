"""The triton backend's design (issue 14): chunk plan and memory, no atomics on the hot path,
determinism, the tensor-descriptor path, both fused_loss paths (6·N·D·V and recompute), and the
pieces the kernels share (grouped order, bf16 rounding). Values against the reference here;
the shared suites (test_token_stats, test_fused_loss) run every shape and option."""
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hykernels as hk
from conftest import BACKENDS, DEVICE
from hykernels._types import LogitOptions, LossTerms

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
triton = pytest.importorskip("triton")
tl = triton.language
from hykernels.backends.triton._tiles import _grouped, _narrow  # noqa: E402
KERNELS = Path(__file__).resolve().parents[1] / "hykernels" / "backends" / "triton"


# Tiny kernels around the shared jit pieces, at module level: the interpreter resolves a jit
# function's globals from its module.
@triton.jit
def _order(OUT, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped(pid, num_m, num_n, GROUP_M)
    tl.store(OUT + pid * 2, pid_m)
    tl.store(OUT + pid * 2 + 1, pid_n)


@triton.jit
def _narrow_kernel(X, Y, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, _narrow(tl.load(X + offs, mask=mask), Y.dtype.element_ty, UPCAST), mask=mask)


@pytest.fixture
def tb(monkeypatch):
    from triton_tiles import SMALL

    from hykernels.backends import triton as tb

    monkeypatch.setattr(tb._configs, "OVERRIDE", SMALL)
    return tb


def _problem(rng, n, d, v, dtype, bias=True):
    h = (torch.randn(n, d, generator=rng) * 2).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=rng) / math.sqrt(d)).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(v, generator=rng).to(DEVICE, dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=rng).to(DEVICE)
    y[::5] = -100
    return h, w, b, y


def _loss_and_grads(backend, h, w, b, y, **kw):
    loss, st = hk.fused_loss(h, w, y, bias=b, rd_weight=1.0 / len(y), entropy_weight=0.01, backend=backend,
                             softcap=8.0, temperature=0.8, **kw)
    leaves = [t for t in (h, w, b) if t is not None]
    return (loss, st.lse, *torch.autograd.grad(loss, leaves))


def _stats_grads(backend, h, w, b, y, **kw):
    st = hk.token_stats(h, w, y, bias=b, backend=backend, softcap=8.0, temperature=0.8, **kw)
    out = st.logp.sum() + 0.3 * st.entropy.sum() - 0.1 * st.self_certainty.sum()
    leaves = [t for t in (h, w, b) if t is not None]
    return (st.lse, *torch.autograd.grad(out, leaves))


def _close(ours, gold, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, g in zip(ours, gold):
        torch.testing.assert_close(a.float(), g.float(), rtol=tol, atol=tol * max(1.0, g.float().abs().max().item()))


def test_bench_shape_chunk_plan_fits_the_memory_target(tb):
    """At N=16384, D=4096, V=151936 the fused path keeps 512 rows of fp32 logits: a workspace of
    297 MiB, under the 0.3 GiB target with the O(N) statistics; token_stats' backward keeps
    1024 rows of bf16 gradient in the same budget."""
    assert tb.WORKSPACE_BYTES == 300 * 2**20
    n, v = 16384, 151936
    rows = tb.chunk_rows(n, v, LogitOptions(), 4)
    assert rows == 512 and rows % tb.ROW_ALIGN == 0
    workspace = rows * tb._padded(v) * 4
    statistics = n * 4 * 12  # TokenStats, lse_lo, coefficients: a dozen fp32 [N] vectors at most
    assert workspace + statistics <= 0.3 * 2**30
    assert tb.chunk_rows(n, v, LogitOptions(), 2) == 1024


@pytest.mark.parametrize("n,vocab,chunk,entry", [(37, 103, 16, 4), (5000, 32003, None, 4), (100, 10**7, None, 4),
                                                (100, 10**8, None, 4), (100, 10**8, None, 2), (3, 50, None, 2)])
def test_chunk_rows_stay_within_the_budget(tb, n, vocab, chunk, entry):
    rows = tb.chunk_rows(n, vocab, LogitOptions(chunk_size=chunk), entry)
    assert 0 <= rows <= n
    assert rows * tb._padded(vocab) * entry <= tb.WORKSPACE_BYTES
    if rows == 0:  # not even one row fits: fused_loss recomputes
        assert tb._padded(vocab) * entry > tb.WORKSPACE_BYTES or chunk is not None
    elif chunk is None and rows < n and rows >= tb.ROW_ALIGN:
        assert rows % tb.ROW_ALIGN == 0


def test_split_plan_aligns_splits_to_every_candidate_tile(tb, monkeypatch):
    """Split boundaries are multiples of every candidate BLOCK_N, so the partials the host merges
    do not depend on the tile the autotuner picks."""
    monkeypatch.setattr(tb._configs, "OVERRIDE", None)
    for kernel in ("logits_fwd", "logits_grad"):
        for dtype in (torch.bfloat16, torch.float32):
            for b in tb._configs.candidates(kernel, dtype, 90):
                assert tb._configs.SPLIT_ALIGN % b.n == 0


def test_lm_head_kernels_use_no_atomics():
    """dH and dW are GEMMs that own their output tiles: no atomic in any lm_head kernel (the
    segment kernels' span sums keep theirs: a few adds per answer row)."""
    for name in ("_tiles.py", "_logits_fwd.py", "_logits_grad.py", "_grad_gemm.py"):
        assert not re.search(r"\batomic_\w+\(", (KERNELS / name).read_text()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_are_deterministic(tb, rng, dtype):
    h, w, b, y = _problem(rng, 45, 20, 150, dtype)
    first = _loss_and_grads("triton", h, w, b, y, chunk_size=16)
    second = _loss_and_grads("triton", h, w, b, y, chunk_size=16)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_tensor_descriptor_path_matches_reference(tb, rng, monkeypatch, dtype):
    """The TMA operands (forced on: the interpreter runs descriptors too) on aligned shapes."""
    monkeypatch.setattr(tb._configs, "DESCRIPTORS", True)
    h, w, b, y = _problem(rng, 40, 32, 200, dtype)
    _close(_loss_and_grads("triton", h, w, b, y, chunk_size=16), _loss_and_grads("reference", h, w, b, y), dtype)
    _close(_stats_grads("triton", h, w, b, y, chunk_size=16), _stats_grads("reference", h, w, b, y), dtype)


def test_descriptors_need_alignment(tb):
    assert tb._configs.DESCRIPTORS is None
    x = torch.zeros(4, 24, dtype=torch.bfloat16)
    assert not tb._configs.use_descriptors(x)  # CPU: never
    op = tb._configs.operand(x, False)
    assert op is x


class _FakeCuda:
    """What use_descriptors reads of a CUDA tensor: device, dtype, address, strides."""

    def __init__(self, dtype, cols=64, ptr=1 << 20):
        self.device, self.dtype, self._ptr, self._cols = torch.device("cuda", 0), dtype, ptr, cols

    def data_ptr(self):
        return self._ptr

    def stride(self, dim=None):
        return (self._cols, 1) if dim is None else (self._cols, 1)[dim]

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


def test_descriptors_on_sm90_for_aligned_half_precision_only(tb, monkeypatch):
    """Half-precision operands on sm_90 take descriptors when 16-byte aligned; fp32 inputs never
    (IEEE FMA dots: TMA spilled registers), nor sm_80."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    use = tb._configs.use_descriptors
    assert use(_FakeCuda(torch.bfloat16), _FakeCuda(torch.bfloat16), _FakeCuda(torch.float32))  # fp32 dW is fine
    assert not use(_FakeCuda(torch.bfloat16, cols=20), _FakeCuda(torch.bfloat16))  # 40-byte rows
    assert not use(_FakeCuda(torch.float16, ptr=(1 << 20) + 8))
    assert not use(_FakeCuda(torch.float32), _FakeCuda(torch.float32))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not use(_FakeCuda(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_recomputes_when_a_row_does_not_fit(tb, rng, monkeypatch, dtype):
    """A workspace smaller than one chunk of fp32 logits: fused_loss takes the statistics +
    recompute path (8·N·D·V), whose backward chunks the gradient tile in the budget."""
    from hykernels import _grad

    calls = []
    real = _grad.loss_by_recompute
    monkeypatch.setattr(tb, "loss_by_recompute", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, b, y = _problem(rng, 37, 19, 103, dtype)
    monkeypatch.setattr(tb, "WORKSPACE_BYTES", 16 * tb._padded(103) * 4 - 1)  # 16 rows of bf16, not of fp32
    ours = _loss_and_grads("triton", h, w, b, y, chunk_size=16)
    assert calls
    _close(ours, _loss_and_grads("reference", h, w, b, y), dtype)


def test_fused_and_recompute_paths_agree(tb, rng, monkeypatch):
    """The in-place gradient over kept logits and the recomputed one give the same result (fp32)."""
    h, w, b, y = _problem(rng, 33, 21, 130, torch.float32)
    fused = _loss_and_grads("triton", h, w, b, y, chunk_size=16)
    monkeypatch.setattr(tb, "WORKSPACE_BYTES", 16)
    recomputed = _loss_and_grads("triton", h, w, b, y, chunk_size=16)
    for a, c in zip(fused, recomputed):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


class _Storages(TorchDispatchMode):
    """The new storages torch ops create: {data_ptr: (bytes, dtype)} (views add none)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                storage = t.untyped_storage()
                self.seen.setdefault(storage.data_ptr(), (storage.nbytes(), t.dtype))
        return out


@pytest.mark.parametrize("dtype,fp32_acc,fp32_dw", [(torch.bfloat16, False, False), (torch.bfloat16, True, True),
                                                    (torch.float16, False, True)])
def test_gradient_accumulators(tb, rng, monkeypatch, dtype, fp32_acc, fp32_dw):
    """bf16 dW accumulates in the returned gradient (no fp32 V×D buffer) unless
    HYKERNELS_FP32_ACCUMULATE; fp16 always keeps an fp32 one (range). The chunk workspace is the
    largest other buffer."""
    monkeypatch.setattr(tb, "FP32_ACCUMULATE", fp32_acc)
    n, d, v = 40, 24, 500
    h, w, b, y = _problem(rng, n, d, v, dtype, bias=False)
    terms = LossTerms(rd_weight=torch.ones(n, device=DEVICE), vocab_size=v)
    # the backend itself, below the custom op (a dispatch mode does not see inside an op)
    with _Storages() as rec:
        tb.fused_loss(h.detach(), w.detach(), None, y, LogitOptions(chunk_size=16), terms, (True, True, False))
    fp32_vd = [k for k, dt in rec.seen.values() if dt == torch.float32 and k >= v * d * 4]
    assert bool(fp32_vd) == fp32_dw
    grads = {v * d * w.element_size(), n * d * h.element_size()}
    others = [k for k, dt in rec.seen.values() if k not in grads and k < v * d * 4]
    assert max(others) <= 16 * tb._padded(v) * 4  # one chunk of fp32 logits


def test_grouped_order_visits_every_tile_once():
    """_tiles._grouped is a permutation of the tile grid, also when the row blocks are not a
    multiple of GROUP_M."""
    for num_m, num_n, group in ((7, 5, 3), (8, 3, 8), (1, 9, 4), (10, 1, 4)):
        out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32, device=DEVICE)
        _order[(num_m * num_n,)](out, num_m, num_n, GROUP_M=group)
        pairs = {tuple(p) for p in out.tolist()}
        assert pairs == {(i, j) for i in range(num_m) for j in range(num_n)}
        # the first group's row blocks come first, sweeping the columns together
        assert {p[0] for p in out[: min(group, num_m) * num_n].tolist()} == set(range(min(group, num_m)))


def test_bf16_stores_round_to_nearest_even():
    """_tiles._narrow: what the kernels store in bf16 equals torch's rounding (the interpreter's
    own conversion truncates)."""
    from hykernels.backends.triton._configs import interpreting

    x = torch.randn(1000, device=DEVICE) * torch.logspace(-30, 30, 1000, device=DEVICE)
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.empty(1000, dtype=dtype, device=DEVICE)
        _narrow_kernel[(1,)](x, y, 1000, BLOCK=1024, UPCAST=interpreting())
        assert torch.equal(y, x.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tuned_128x128_logits_tiles_match_reference(rng, monkeypatch, tmp_path, dtype):
    """The 128×128 logits candidates of the tables (offered with descriptors on sm_90: the tile
    is folded into the statistics in two halves, z and the gradient tile leave by TMA stores),
    launched through the tuned path and run by the interpreter: fused_loss (logits_fwd with
    STORE_Z), token_stats and its backward (logits_grad) against the reference."""
    from hykernels.backends.triton import _configs, _tune

    wide = {k: next(b for b in _configs.TABLES[k][0] if b.tma) for k in ("logits_fwd", "logits_grad")}
    assert all((b.m, b.n) == (128, 128) for b in wide.values())
    gemm = {k: _configs.TABLES[k][1][:1] for k in ("dh_gemm", "dw_gemm")}  # one candidate: no benchmark
    monkeypatch.setattr(_configs, "TABLES", {**{k: ((b,), (b,)) for k, b in wide.items()},
                                             **{k: (t, t) for k, t in gemm.items()}})
    monkeypatch.setattr(_configs, "OVERRIDE", None)
    monkeypatch.setattr(_configs, "explicit", lambda device: None)
    monkeypatch.setattr(_configs, "DESCRIPTORS", True)
    monkeypatch.setattr(_tune, "device_info", lambda device: _tune.Device("interpreter", 90, 1, cuda=False))
    monkeypatch.setattr(_tune, "_memory", {})
    monkeypatch.setenv("HYKERNELS_CACHE_DIR", str(tmp_path))
    launched = []
    real = _tune.run
    monkeypatch.setattr(_tune, "run", lambda kernel, fn, b, *a: launched.append((kernel, b)) or real(kernel, fn, b, *a))
    h, w, b, y = _problem(rng, 40, 32, 300, dtype)
    _close(_loss_and_grads("triton", h, w, b, y, chunk_size=16), _loss_and_grads("reference", h, w, b, y), dtype)
    _close(_stats_grads("triton", h, w, b, y, chunk_size=16), _stats_grads("reference", h, w, b, y), dtype)
    assert {(k, b) for k, b in launched if k in wide} == set(wide.items())
    if dtype == torch.float32:  # the argmax of the second half's columns (ties are unlikely in fp32)
        ours, ref = (hk.token_stats(h, w, y, bias=b, backend=name).argmax for name in ("triton", "reference"))
        assert torch.equal(ours, ref) and (ref % 128 >= 64).any()
