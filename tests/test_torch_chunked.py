"""The torch_chunked backend's own paths, against the reference backend on fresh random inputs:
2-D tiles (row chunks × vocabulary slices, ragged), several whole-row chunks, fused_loss's
recompute path when few whole rows fit, the e^{z−m}-keeping gradient against the general one,
the half-precision GEMM branches a GPU takes (forced on the CPU), the blockwise argmax, and the
tile plan at the benchmark shapes. The shared suites (test_token_stats, test_fused_loss) pass
chunk_size and so take whole-row tiles; this file covers the rest."""
import math

import pytest
import torch

import hykernels as hk
from hykernels._types import LogitOptions
from hykernels.backends import torch_chunked as tc

OPTIONS = {  # temperature, softcap, bias, a −inf bias entry
    "plain": (1.0, None, False, False),
    "temp_bias": (0.7, None, True, False),
    "softcap_temp": (1.3, 6.0, True, False),
    "masked_entry": (1.0, None, True, True),
}
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _problem(rng, dtype, options, n=37, d=19, v=103):
    temperature, softcap, with_bias, masked = OPTIONS[options]
    h = (torch.randn(n, d, generator=rng, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=rng, dtype=torch.float64) / math.sqrt(d)).to(dtype).requires_grad_()
    b = None
    if with_bias:
        b = torch.randn(v, generator=rng, dtype=torch.float64)
        if masked:
            b[[3, 70]] = -math.inf  # in both vocabulary slices
        b = b.to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=rng)
    y[torch.rand(n, generator=rng) < 0.3] = -100
    if masked:
        y[y == 3] = 4
        y[y == 70] = 71
    return h, w, b, y, dict(temperature=temperature, softcap=softcap)


def _leaves(h, w, b):
    return [t for t in (h, w, b) if t is not None]


def _stats_and_grads(backend, h, w, b, y, kw):
    st = hk.token_stats(h, w, y, bias=b, backend=backend, **kw)
    out = (st.logp.sum() + 0.3 * st.entropy.sum() - 0.2 * st.self_certainty.sum() + 0.05 * st.lse.sum())
    return (*st, *torch.autograd.grad(out, _leaves(h, w, b)))


def _loss_and_grads(backend, h, w, b, y, kw, terms):
    loss, st = hk.fused_loss(h, w, y, bias=b, backend=backend, **kw, **terms)
    return (loss, *st[:4], st.argmax, st.lse, *torch.autograd.grad(loss, _leaves(h, w, b)))


def _logits64(h, w, b, temperature, softcap):
    z = h.detach().double() @ w.detach().double().T + (0 if b is None else b.detach().double())
    return (z if softcap is None else softcap * torch.tanh(z / softcap)) / temperature


def _close(ours, gold, dtype, z=None):
    """Every output within the dtype's tolerance of the reference's; an argmax may differ only
    where the fp64 logits ``z`` of the two indices tie within that tolerance (a near-tie that
    rounding can break either way)."""
    tol = TOL[dtype]
    for a, g in zip(ours, gold):
        if not a.is_floating_point():
            rows = torch.nonzero(a != g).flatten()
            assert z is not None or not len(rows)
            for r in rows.tolist():
                assert abs(z[r, a[r]] - z[r, g[r]]) <= tol * max(1.0, z[r].abs().max().item()), (r, a[r], g[r])
            continue
        a, g = a.double(), g.double()
        fin = torch.isfinite(g)
        assert torch.equal(fin, torch.isfinite(a))
        scale = max(1.0, g[fin].abs().max().item()) if fin.any() else 1.0
        torch.testing.assert_close(a[fin], g[fin], rtol=tol, atol=tol * scale)


@pytest.fixture(autouse=True)
def checks_off(request):
    """A −inf bias entry (a masked logit) is refused by the value checks: they go off for it."""
    masked = getattr(getattr(request.node, "callspec", None), "params", {}).get("options") == "masked_entry"
    hk.set_checks(not masked)
    yield
    hk.set_checks(True)


def _small_tiles(monkeypatch, budget):
    """A workspace of ``budget`` bytes, and elementwise blocks of 100 entries (several per tile,
    the last one ragged)."""
    monkeypatch.setattr(tc, "MIN_TILE_BYTES", budget)
    monkeypatch.setattr(tc, "TILE_BYTES", budget)
    monkeypatch.setattr(tc, "BLOCK_ELEMENTS", 100)


@pytest.fixture
def sliced(monkeypatch):
    """A workspace of 16 rows × 24 vocabulary entries: 3 row chunks (16, 16, 5) × 5 ragged
    slices (24, 24, 24, 24, 7) of the 37 × 103 problem; fused_loss then takes its recompute path."""
    _small_tiles(monkeypatch, 16 * 24 * 4)
    monkeypatch.setattr(tc, "TILE_ROWS", 16)
    monkeypatch.setattr(tc, "SLICE_ALIGN", 8)
    x = tc._Call(torch.zeros(37, 19), torch.zeros(103, 19), None, torch.zeros(37, dtype=torch.long), LogitOptions())
    assert (x.rows, x.cols, len(x.chunks()), len(x.slices())) == (16, 24, 3, 5)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_sliced_tiles_match_the_reference(rng, sliced, dtype, options):
    h, w, b, y, kw = _problem(rng, dtype, options)
    _close(_stats_and_grads("torch_chunked", h, w, b, y, kw), _stats_and_grads("reference", h, w, b, y, kw), dtype,
           _logits64(h, w, b, **kw))


TERMS = {
    "ce": lambda n, g: dict(rd_weight=1.0 / n),
    "ce_smooth_zloss": lambda n, g: dict(rd_weight=1.0 / n, label_smoothing=0.1, z_loss=1e-3),
    "rd_rlif_kl": lambda n, g: dict(rd_weight=torch.rand(n, generator=g, dtype=torch.float64) / n,
                                     rlif_weight=torch.rand(n, generator=g, dtype=torch.float64) / n,
                                     advantages=torch.randn(n, generator=g, dtype=torch.float64),
                                     ref_logp=-3 * torch.rand(n, generator=g, dtype=torch.float64),
                                     kl_weight=0.04 / n),
    "entropy": lambda n, g: dict(rd_weight=1.0 / n, entropy_weight=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("path", ["recompute", "whole_row_chunks"])
def test_fused_loss_paths_match_the_reference(rng, monkeypatch, dtype, options, terms, path):
    """fused_loss's recompute path (fewer than FUSED_MIN_ROWS whole rows fit) and its 6·N·D·V
    path over several whole-row chunks without chunk_size, each with every loss-term family."""
    if path == "recompute":
        _small_tiles(monkeypatch, 9 * 103 * 4)  # 9 whole rows < FUSED_MIN_ROWS
        monkeypatch.setattr(tc, "TILE_ROWS", 16)
        monkeypatch.setattr(tc, "SLICE_ALIGN", 8)
        calls = []
        real = tc.token_stats_backward
        monkeypatch.setattr(tc, "token_stats_backward", lambda *a: calls.append(1) or real(*a))
    else:
        monkeypatch.setattr(tc, "FUSED_MIN_ROWS", 4)
        _small_tiles(monkeypatch, 10 * 103 * 4)  # 10 whole rows fit: chunks of 8, 8, 8, 8, 5
    h, w, b, y, kw = _problem(rng, dtype, options)
    t = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in TERMS[terms](len(y), rng).items()}
    ours = _loss_and_grads("torch_chunked", h, w, b, y, kw, t)
    _close(ours, _loss_and_grads("reference", h, w, b, y, kw, t), dtype, _logits64(h, w, b, **kw))
    if path == "recompute":
        assert calls, "the recompute path was not taken"


@pytest.mark.parametrize("options", ["plain", "temp_bias", "masked_entry"])
def test_kept_exponentials_give_the_general_gradient(rng, options):
    """Without an entropy term the fused pass keeps e^{z−m} in the tile and scales it; an entropy
    weight of 0 takes the general pass (exponentials formed again): both the same gradient."""
    h, w, b, y, kw = _problem(rng, torch.float64, options)
    terms = dict(rd_weight=1.0 / len(y), label_smoothing=0.05)
    fast = _loss_and_grads("torch_chunked", h, w, b, y, kw, terms)
    general = _loss_and_grads("torch_chunked", h, w, b, y, kw, dict(terms, entropy_weight=0.0))
    _close(fast, general, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["whole_rows", "sliced"])
def test_half_gemm_branches(rng, monkeypatch, dtype, tiles):
    """The branches a GPU takes (gradient GEMMs in the half dtype; fp16 tiles scaled by a power of
    two and unscaled after), forced on the CPU, against the reference."""
    monkeypatch.setattr(tc, "_fast_half_gemms", lambda device, dt: True)
    if tiles == "sliced":
        _small_tiles(monkeypatch, 16 * 24 * 6)
        monkeypatch.setattr(tc, "TILE_ROWS", 16)
        monkeypatch.setattr(tc, "SLICE_ALIGN", 8)
    h, w, b, y, kw = _problem(rng, dtype, "temp_bias")
    x = tc._Call(h, w, b, y, LogitOptions(), grad_gemms=True)
    assert x.grad_dtype == dtype and x.gbuf is not None and (len(x.slices()) > 1) == (tiles == "sliced")
    ours = _stats_and_grads("torch_chunked", h, w, b, y, kw)
    _close(ours, _stats_and_grads("reference", h, w, b, y, kw), torch.bfloat16, _logits64(h, w, b, **kw))
    # tiny per-token weights (1/T of a 16k batch): fp16 gradient tiles need the power-of-two scale
    st = hk.token_stats(h, w, y, bias=b, backend="torch_chunked", **kw)
    g_ours = torch.autograd.grad(st.logp.sum() * 2**-20, h)[0].double()
    st = hk.token_stats(h, w, y, bias=b, backend="reference", **kw)
    g_ref = torch.autograd.grad(st.logp.sum() * 2**-20, h)[0].double()
    assert ((g_ours - g_ref).norm() / g_ref.norm()).item() < 2e-2


@pytest.mark.parametrize("vocab", [1, 63, 64, 130, 1000])
def test_blockwise_argmax_is_torch_max(rng, vocab):
    """The first maximum of each column, from block maxima: ties (small integers), −inf, NaN and a
    ragged last block, as torch.max(z, 0) finds them."""
    zt = torch.randint(-3, 3, (vocab, 40), generator=rng).double()
    zt[:, 0] = -math.inf
    zt[vocab // 2, 1] = math.nan
    zt[:, 2] = 7.0
    m, arg = tc._column_max(zt)
    m_ref, arg_ref = zt.max(0)
    assert torch.equal(arg, arg_ref)
    torch.testing.assert_close(m, m_ref, equal_nan=True)


def test_plan_at_the_benchmark_shapes():
    """fused_loss keeps whole rows (its 6·N·D·V pass), a multiple of 8 of them; token_stats takes
    1024-row tiles by a vocabulary slice where few whole rows fit; 2·N·D bytes (torch's default)
    bound the tile."""
    o = LogitOptions()
    assert tc.plan(8192, 32768, 1024, o, 4, whole_rows=True) == (128, 32768)  # 16 MiB, as torch's 128 rows
    assert tc.plan(8192, 32768, 1024, o, 4) == (1024, 4096)
    assert tc.plan(8192, 32768, 1024, o, 6) == (1024, 2688)  # bf16: fp32 tile + its bf16 copy, 6 B per entry
    assert tc.plan(8192, 30000, 1024, o, 4, whole_rows=True) == (136, 30000)  # 139 fit: a multiple of 8
    assert tc.plan(2048, 151936, 1024, o, 4, whole_rows=True) == (6, 151936)  # < FUSED_MIN_ROWS: recompute
    assert tc.plan(2048, 151936, 1024, o, 4) == (1024, 1024)
    assert tc.plan(300, 1000, 64, o, 4) == (300, 1000)  # the 4 MiB floor holds every row
    assert tc.plan(300, 1000, 64, LogitOptions(chunk_size=7), 4) == (7, 1000)
    # elementwise blocks of about BLOCK_ELEMENTS entries, whatever the tile's width
    for shape in ((32768, 128), (4096, 1024), (103, 37)):
        blocks = tc._blocks(torch.empty(shape))
        assert blocks[0].start == 0 and blocks[-1].stop == shape[0]
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        assert (blocks[0].stop - blocks[0].start) * shape[1] <= max(tc.BLOCK_ELEMENTS, shape[1])
