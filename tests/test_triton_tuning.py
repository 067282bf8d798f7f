"""The triton backend's tuning (hykernels/backends/triton/_tune.py) on the CPU: its key, dW's
restore while dw_gemm's accumulating launches are benchmarked, the disk cache across processes,
and the candidates offered at the lmhead bench shape. The kernels run in the interpreter with
a fake benchmark (no GPU here); the GPU's own timing is triton.testing.do_bench."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import BACKENDS
from hykernels._types import LogitOptions

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
ROOT = Path(__file__).resolve().parents[1]
# The lmhead bench shape (bench/presets.py) and an H200's multiprocessors.
BENCH_N, BENCH_D, BENCH_V, H200_SMS = 16384, 4096, 151936, 132


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """_tune with an empty in-process memory and its disk cache in a fresh folder."""
    from hykernels.backends.triton import _tune

    monkeypatch.setattr(_tune, "_memory", {})
    monkeypatch.setenv("HYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    return _tune


def _dw_problem(tma: bool, beta: bool = True, dw_dtype=torch.float32, seed=0):
    """dw_gemm's arguments on a small fp32 problem: (args, kwargs, G, H, DW before the launch)."""
    from hykernels.backends.triton import _configs

    g = torch.Generator().manual_seed(seed)
    rows, vocab, dim = 24, 72, 40
    G, H = torch.randn(rows, vocab, generator=g), torch.randn(rows, dim, generator=g)
    DW = torch.randn(vocab, dim, generator=g).to(dw_dtype)
    args = (*(_configs.operand(t, tma) for t in (G, H, DW)), rows, vocab, dim, G.stride(0), H.stride(0),
            DW.stride(0), 0.5)
    kwargs = dict(BETA=beta, TMA=tma, UPCAST=True, IEEE=True)
    return args, kwargs, G, H, DW, DW.clone()


def _device(tune, sms=1):
    return tune.Device("test-gpu", 90, sms, cuda=False)


class _Bench:
    """A fake benchmark: runs the launch ``repeat`` times (as do_bench does, many times) and
    returns the next of ``times``; records how often it was asked."""

    def __init__(self, times, repeat=3):
        self.times, self.repeat, self.calls = list(times), repeat, 0

    def __call__(self, fn):
        for _ in range(self.repeat):
            fn()
        self.calls += 1
        return self.times.pop(0)


def _named(args, kwargs):
    from hykernels.backends.triton._grad_gemm import dw_gemm

    return dw_gemm.arg_names, {**dict(zip(dw_gemm.arg_names, args)), **kwargs}


def test_key_holds_flags_operand_dtypes_and_row_bucket(tune):
    """BETA, TMA and dW's dtype (a descriptor's too) change the key; rows change it only across
    a power of two; the float scalars do not."""
    names, base = _named(*_dw_problem(tma=True)[:2])
    k = tune.key("dw_gemm", names, base)
    assert "DW:desc:float32" in k and "BETA=1" in k and "TMA=1" in k
    for other in (_named(*_dw_problem(tma=True, beta=False)[:2])[1], _named(*_dw_problem(tma=False)[:2])[1],
                  _named(*_dw_problem(tma=True, dw_dtype=torch.bfloat16)[:2])[1], dict(base, D=48),
                  dict(base, N=32), dict(base, UPCAST=False)):
        assert tune.key("dw_gemm", names, other) != k
    assert tune.key("dw_gemm", names, dict(base, N=31, alpha=3.0)) == k  # 24 and 31: bucket 16
    assert [tune.rows_bucket(n) for n in (0, 1, 511, 512, 1023, 1024)] == [1, 1, 256, 512, 512, 1024]


@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
def test_tuning_restores_dw_and_keeps_the_fastest(tune, tma):
    """Every candidate of dw_gemm with BETA is benchmarked on the real dW (several launches
    each), yet dW ends as one accumulation: α·GᵀH + dW; the fastest candidate is kept and the
    next launch at the key does not benchmark again."""
    from hykernels.backends.triton import _configs
    from hykernels.backends.triton._grad_gemm import dw_gemm

    args, kwargs, G, H, DW, before = _dw_problem(tma)
    offered = _configs.offered("dw_gemm", torch.float32, 90, 1, _named(args, kwargs)[1])
    assert len(offered) >= 2
    bench = _Bench([3.0, 1.0, 2.0][:len(offered)])
    meta = tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=bench)
    assert bench.calls == len(offered)
    assert meta["BLOCK_M"] == offered[1].m and meta["BLOCK_K"] == offered[1].k
    torch.testing.assert_close(DW, before + 0.5 * G.T @ H, rtol=1e-5, atol=1e-5)
    tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=_Bench([]))  # no bench
    torch.testing.assert_close(DW, before + G.T @ H, rtol=1e-5, atol=1e-5)


def test_a_failing_candidate_is_skipped_with_a_warning(tune):
    from hykernels.backends.triton._grad_gemm import dw_gemm

    args, kwargs, G, H, DW, before = _dw_problem(False)

    def bench(fn, seen=[]):
        seen.append(1)
        if len(seen) == 1:
            raise RuntimeError("out of resources")
        fn()
        return 1.0

    with pytest.warns(RuntimeWarning, match="candidates failed"):
        tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=bench)
    torch.testing.assert_close(DW, before + 0.5 * G.T @ H, rtol=1e-5, atol=1e-5)


def _cache_files(tune):
    return sorted(tune.cache_dir().iterdir())


def test_choice_is_reused_by_a_fresh_process(tune):
    """The tuned choice is written under HYKERNELS_CACHE_DIR; a new process at the same key
    launches it with no benchmark at all (its benchmark raises) and gets the same result."""
    from hykernels.backends.triton._grad_gemm import dw_gemm

    args, kwargs, *_ = _dw_problem(False)
    meta = tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=_Bench([2.0, 1.0]))
    (path,) = _cache_files(tune)
    data = json.loads(path.read_text())
    assert data["config"]["m"] == meta["BLOCK_M"] and "dw_gemm" in data["key"] and "BETA=1" in data["key"]
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        import torch
        from hykernels.backends.triton import _tune
        from hykernels.backends.triton._grad_gemm import dw_gemm
        from test_triton_tuning import _dw_problem
        def bench(fn):
            raise AssertionError("benchmarked although cached")
        args, kwargs, G, H, DW, before = _dw_problem(False)
        meta = _tune.launch("dw_gemm", dw_gemm, torch.float32, _tune.Device("test-gpu", 90, 1, cuda=False),
                            args, kwargs, bench=bench)
        torch.testing.assert_close(DW, before + 0.5 * G.T @ H, rtol=1e-5, atol=1e-5)
        print("meta", meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"])
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"meta {meta['BLOCK_M']} {meta['BLOCK_N']} {meta['BLOCK_K']}" in r.stdout


@pytest.mark.parametrize("damage", ["garbage", "other_key", "not_a_candidate"])
def test_a_damaged_cache_file_is_ignored_with_a_warning(tune, damage):
    from hykernels.backends.triton._grad_gemm import dw_gemm

    args, kwargs, *_ = _dw_problem(False)
    tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=_Bench([2.0, 1.0]))
    (path,) = _cache_files(tune)
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text('{"key": [1, "trunc')
    elif damage == "other_key":
        path.write_text(json.dumps(dict(data, key=data["key"].replace("dw_gemm", "dh_gemm"))))
    else:
        path.write_text(json.dumps(dict(data, config=dict(data["config"], m=48))))
    tune._memory.clear()
    bench = _Bench([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache file"):
        tune.launch("dw_gemm", dw_gemm, torch.float32, _device(tune), args, kwargs, bench=bench)
    assert bench.calls == 2  # tuned again
    assert json.loads(path.read_text())["key"] == data["key"]  # and replaced by a sound file


def test_cache_writes_are_atomic(tune, monkeypatch):
    """A write that fails half way leaves the previous file whole and no temporary file."""
    from hykernels.backends.triton import _configs

    dev, k = _device(tune), ("dw_gemm", "D=40")
    b1, b2 = _configs.candidates("dw_gemm", torch.float32, 90)[:2]
    path = tune.write_cached("dw_gemm", dev, k, b1, {})
    assert tune.read_cached("dw_gemm", torch.float32, dev, k) == b1

    def broken(obj, f, **kw):
        f.write('{"key": ')
        raise OSError("disk full")

    monkeypatch.setattr(tune.json, "dump", broken)
    with pytest.warns(RuntimeWarning, match="could not write"):
        assert tune.write_cached("dw_gemm", dev, k, b2, {}) is None
    assert _cache_files(tune) == [path]
    assert tune.read_cached("dw_gemm", torch.float32, dev, k) == b1


def test_cache_folder(monkeypatch, tmp_path):
    from hykernels.backends.triton import _tune

    monkeypatch.setenv("HYKERNELS_CACHE_DIR", str(tmp_path / "x"))
    assert _tune.cache_dir() == tmp_path / "x"
    monkeypatch.setenv("HYKERNELS_CACHE_DIR", "")
    assert _tune.cache_dir() is None
    assert _tune.write_cached("dw_gemm", _tune.Device("g", 90, 1), ("k",), None, {}) is None
    monkeypatch.delenv("HYKERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _tune.cache_dir() == tmp_path / "xdg" / "hykernels"


def _bench_launches():
    """(op, kernel, named arguments) of every lm_head launch at the bench shape: fused_loss's
    512-row chunks, token_stats over all rows, its backward's 1024-row chunks (bf16 gradient)."""
    from hykernels.backends import triton as tb

    fused = tb.chunk_rows(BENCH_N, BENCH_V, LogitOptions(), 4)
    backward = tb.chunk_rows(BENCH_N, BENCH_V, LogitOptions(), 2)
    assert (fused, backward) == (512, 1024)
    dims = dict(V=BENCH_V, D=BENCH_D)
    for op, rows, kernels in (("fused_loss", fused, ("logits_fwd", "dh_gemm", "dw_gemm")),
                              ("token_stats", BENCH_N, ("logits_fwd",)),
                              ("token_stats_backward", backward, ("logits_grad", "dh_gemm", "dw_gemm"))):
        splits = tb.split_for(rows, BENCH_V, H200_SMS)[1]
        for kernel in kernels:
            for tma in (False, True):  # pointers (unaligned shapes) or descriptors (TMA)
                yield op, kernel, dict(dims, N=rows, num_splits=splits, TMA=tma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_offered_candidate_fills_the_h200_at_the_bench_shape(dtype):
    """At N=16384, D=4096, V=151936 on 132 SMs, each kernel's offered candidates on sm_90 launch
    at least one program per SM (dh_gemm's 128×256 and 128×128 tiles would launch 64 and 128
    programs per 512-row chunk), and every kernel keeps at least one candidate."""
    from hykernels.backends.triton import _configs

    pruned = set()
    for op, kernel, named in _bench_launches():
        offered = _configs.offered(kernel, dtype, 90, H200_SMS, named)
        assert offered, (op, kernel)
        for b in offered:
            programs = _configs.grid(kernel, {**named, **_configs._meta(kernel, b)})[0]
            assert programs >= H200_SMS, (op, kernel, b, programs)
        pruned |= {(kernel, b) for b in _configs.candidates(kernel, dtype, 90) if b not in offered}
    if dtype != torch.float32:
        assert ("dh_gemm", _configs.candidates("dh_gemm", dtype, 90)[0]) in pruned  # the check can fail


def test_offered_keeps_the_largest_grid_when_nothing_fills_the_gpu():
    from hykernels.backends.triton import _configs

    named = dict(N=64, V=1000, D=64, num_splits=1)
    offered = _configs.offered("dh_gemm", torch.bfloat16, 90, H200_SMS, named)
    sizes = [_configs.grid("dh_gemm", {**named, **_configs._meta("dh_gemm", b)})[0] for b in offered]
    best = max(_configs.grid("dh_gemm", {**named, **_configs._meta("dh_gemm", b)})[0]
               for b in _configs.candidates("dh_gemm", torch.bfloat16, 90))
    assert offered and set(sizes) == {best} and best < H200_SMS


def test_grid_matches_the_kernels_tile_order():
    """_configs.grid is what the kernels decompose with _grouped (one program per output tile)."""
    from hykernels.backends.triton import _configs

    meta = dict(N=100, V=1000, D=200, num_splits=3, BLOCK_M=64, BLOCK_N=128)
    assert _configs.grid("logits_fwd", meta) == (2 * 3,)
    assert _configs.grid("logits_grad", meta) == (2 * math.ceil(1000 / 128),)
    assert _configs.grid("dh_gemm", meta) == (2 * 2,)
    assert _configs.grid("dw_gemm", meta) == (math.ceil(1000 / 64) * 2,)


def test_tma_only_candidates_go_to_descriptor_launches_only():
    """The 128×128 logits tiles are spill-free only with descriptors (TMA stores): never offered
    to a pointer launch, offered to a descriptor launch at the bench shape."""
    from hykernels.backends.triton import _configs

    for kernel, rows in (("logits_fwd", 512), ("logits_grad", 1024)):
        tma_only = [b for b in _configs.candidates(kernel, torch.bfloat16, 90) if b.tma]
        assert tma_only and not [b for b in _configs.candidates(kernel, torch.bfloat16, 80) if b.tma]
        named = dict(N=rows, V=BENCH_V, D=BENCH_D, num_splits=66)
        assert not set(tma_only) & set(_configs.offered(kernel, torch.bfloat16, 90, H200_SMS, dict(named, TMA=False)))
        assert set(tma_only) <= set(_configs.offered(kernel, torch.bfloat16, 90, H200_SMS, dict(named, TMA=True)))
