"""Triton-specific checks; the shared correctness suite runs the triton backend too."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hykernels as hk
from conftest import BACKENDS, DEVICE

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")


def test_triton_kernels_compile_for_sm80_and_sm90():
    """tests/compile_triton.py builds every candidate of _configs.TABLES that each architecture is
    offered and every explicit Blocks the tests launch with (tests/triton_tiles.py, INTERPRETER),
    spill-free and within its shared memory: one "ok  " line per compile. On sm_90a the tuned
    bf16/fp16 candidates with descriptors issue wgmma and TMA loads in their main loop, and the
    same check rejects the mma.sync (sm_80) and pointer (cp.async) builds of each kernel's first
    bf16 candidate."""
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_tiles import OVERRIDES, tile

    from hykernels._types import PRG_VARIANTS
    from hykernels.backends.triton import _configs

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_triton.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    # Per Blocks: logits_fwd with and without STORE_Z, dw_gemm with and without BETA, the others
    # once; plain pointers everywhere (not for ``tma`` candidates) and descriptors on sm_90 for
    # bf16/fp16. Per dtype and architecture grad_inplace at GRAD_INPLACE and at each explicit
    # tile; per architecture segment_sum and PRG once per variant.
    variants = {"logits_fwd": 2, "logits_grad": 1, "dh_gemm": 1, "dw_gemm": 2}
    explicit = {tile(b): b for b in (*OVERRIDES, _configs.INTERPRETER)}.values()
    expected = hopper = rejected = 0
    for cap in (80, 90):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            half = dtype != torch.float32
            for kernel, n in variants.items():
                tuned = _configs.candidates(kernel, dtype, cap)
                for b in (*tuned, *explicit):
                    ptr, tma = not b.tma, cap >= 90 and half
                    expected += n * (ptr + tma)
                    hopper += n * tma * (b in tuned)
                rejected += n * (dtype == torch.bfloat16)  # the first candidate's pointer build
            expected += 1 + len(explicit)  # grad_inplace at GRAD_INPLACE and at each explicit tile
        expected += 1 + len(PRG_VARIANTS)
    assert r.stdout.count("ok  ") == expected, r.stdout
    assert r.stdout.count("main loop: HGMMA + TMA") == hopper > 0, r.stdout
    assert r.stdout.count("main loop rejected: ") == rejected > 0, r.stdout


class _Allocations(TorchDispatchMode):
    """Records the element count of every floating tensor a torch op creates (the Triton
    interpreter moves arguments around as uint8 views of whole storages: not counted)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numels.append(t.numel())
        return out


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
def test_no_logits_sized_buffer(rng, backend):
    """Neither fused path allocates anything of N×V elements: the largest buffers are the
    gradients (V·D) and, for torch_chunked, one chunk's [16, V] tile."""
    n, d, v = 64, 16, 2000
    h = torch.randn(n, d, generator=rng).to(DEVICE).requires_grad_()
    w = torch.randn(v, d, generator=rng).to(DEVICE).requires_grad_()
    y = torch.randint(0, v, (n,), generator=rng).to(DEVICE)
    with _Allocations() as rec:
        s = hk.token_stats(h, w, y, backend=backend, chunk_size=16)
        (s.logp.sum() + s.entropy.sum()).backward()
        loss, _ = hk.fused_loss(h, w, y, rd_weight=1.0, entropy_weight=0.1, backend=backend, chunk_size=16)
        loss.backward()
    assert max(rec.numels) <= max(v * d, 16 * v) < n * v


@needs_triton
def test_default_interpreter_blocks_match_reference(rng, monkeypatch):
    """The block choice without a test override: several row blocks, several vocab tiles."""
    from hykernels.backends import triton as tb

    monkeypatch.setattr(tb._configs, "OVERRIDE", None)
    h = (torch.randn(70, 40, generator=rng) * 3).to(DEVICE)
    w = (torch.randn(1500, 40, generator=rng) / 6).to(DEVICE)
    y = torch.randint(0, 1500, (70,), generator=rng).to(DEVICE)
    y[::7] = -100
    a = hk.token_stats(h, w, y, backend="triton", softcap=20.0)
    b = hk.token_stats(h, w, y, backend="reference", softcap=20.0)
    for name in ("logp", "entropy", "self_certainty", "confidence", "lse"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=2e-5, atol=2e-5)
    assert torch.equal(a.argmax, b.argmax)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 7])
def test_vocab_splits_merge_exactly(rng, monkeypatch, splits):
    from triton_tiles import NARROW

    from hykernels.backends import triton as tb

    monkeypatch.setattr(tb._configs, "OVERRIDE", dataclasses.replace(NARROW, splits=splits))
    h = (torch.randn(20, 12, generator=rng) * 5).to(DEVICE)
    w = torch.randn(221, 12, generator=rng).to(DEVICE)
    y = torch.randint(0, 221, (20,), generator=rng).to(DEVICE)
    a = hk.token_stats(h, w, y, backend="triton")
    b = hk.token_stats(h, w, y, backend="reference")
    for name in ("logp", "entropy", "self_certainty", "confidence", "lse"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax, b.argmax)


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,v", [(2048, 4096, 151936), (1000, 2048, 128256)])
def test_triton_bf16_at_realistic_shapes(n, d, v):
    """On a GPU: bf16 token_stats and fused_loss gradients at model-sized vocabularies, against
    the fp64 oracle under the tolerance rule (same-dtype torch + tol)."""
    import oracle
    from test_token_stats import assert_within_rule

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    h = (torch.randn(n, d, generator=g) * 2).to("cuda", torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to("cuda", torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[::5] = -100
    rd = torch.rand(n, generator=g).cuda() / n
    loss, st = hk.fused_loss(h, w, y, rd_weight=rd, entropy_weight=0.01 / n, backend="triton", softcap=30.0)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    gold_stats = oracle.stats(h64, w64, y, softcap=30.0)
    base_stats = oracle.stats(h, w, y, softcap=30.0, gold=False)
    gold = oracle.loss(gold_stats, y, rd_weight=rd.double(), entropy_weight=0.01 / n)
    base = oracle.loss(base_stats, y, rd_weight=rd, entropy_weight=0.01 / n)
    assert_within_rule("loss", loss, gold, base, torch.bfloat16)
    assert_within_rule("logp", st.logp, gold_stats["logp"], base_stats["logp"], torch.bfloat16)
    for name, ours, gg, bg in zip(("d_hidden", "d_weight"), (dh, dw), torch.autograd.grad(gold, (h64, w64)),
                                  torch.autograd.grad(base, (h, w))):
        assert_within_rule(name, ours, gg, bg, torch.bfloat16)
