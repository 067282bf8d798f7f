"""Bad input gets a clear error naming the argument; dispatch and the checks switch."""
import pytest
import torch

import hykernels as hk
from conftest import BACKENDS
from hykernels.backends import torch_chunked


def inputs(n=6, d=5, v=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(v, d, generator=g, dtype=dtype),
            torch.randint(0, v, (n,), generator=g))


def ok_terms(n=6):
    return dict(rd_weight=torch.full((n,), 1.0 / n))


BAD_STATS_CALLS = [
    ("hidden", TypeError, lambda h, w, y: hk.token_stats(h.numpy(), w, y)),
    ("hidden", TypeError, lambda h, w, y: hk.token_stats(h.long(), w.long(), y)),
    ("hidden", ValueError, lambda h, w, y: hk.token_stats(h[0], w, y[0])),
    ("weight", ValueError, lambda h, w, y: hk.token_stats(h, w[:, :4], y)),
    ("weight", ValueError, lambda h, w, y: hk.token_stats(h, w[None], y)),
    ("weight", TypeError, lambda h, w, y: hk.token_stats(h, w.double(), y)),
    ("weight", ValueError, lambda h, w, y: hk.token_stats(h, w[:0], y)),
    ("bias", ValueError, lambda h, w, y: hk.token_stats(h, w, y, bias=torch.zeros(10))),
    ("bias", TypeError, lambda h, w, y: hk.token_stats(h, w, y, bias=torch.zeros(11, dtype=torch.float64))),
    ("targets", TypeError, lambda h, w, y: hk.token_stats(h, w, y.float())),
    ("targets", ValueError, lambda h, w, y: hk.token_stats(h, w, y[:-1])),
    ("targets", ValueError, lambda h, w, y: hk.token_stats(h, w, y.masked_fill(y == y[2], 11))),
    ("targets", ValueError, lambda h, w, y: hk.token_stats(h, w, y.masked_fill(y == y[2], -1))),
    ("hidden", ValueError, lambda h, w, y: hk.token_stats(h.index_fill(0, torch.tensor([3]), float("nan")), w, y)),
    ("weight", ValueError, lambda h, w, y: hk.token_stats(h, w.index_fill(0, torch.tensor([7]), float("inf")), y)),
    ("bias", ValueError, lambda h, w, y: hk.token_stats(h, w, y, bias=torch.full((11,), float("nan")))),
    ("temperature", ValueError, lambda h, w, y: hk.token_stats(h, w, y, temperature=0.0)),
    ("temperature", ValueError, lambda h, w, y: hk.token_stats(h, w, y, temperature=float("nan"))),
    ("softcap", ValueError, lambda h, w, y: hk.token_stats(h, w, y, softcap=-1.0)),
    ("ignore_index", TypeError, lambda h, w, y: hk.token_stats(h, w, y, ignore_index=1.5)),
    ("chunk_size", ValueError, lambda h, w, y: hk.token_stats(h, w, y, chunk_size=0)),
    ("backend", ValueError, lambda h, w, y: hk.token_stats(h, w, y, backend="fastest")),
]


@pytest.mark.parametrize("arg,exc,call", BAD_STATS_CALLS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_STATS_CALLS)])
def test_bad_logit_inputs_name_the_argument(arg, exc, call):
    with pytest.raises(exc, match=rf"^{arg}"):
        call(*inputs())


def test_mixed_devices_are_rejected():
    h, w, y = inputs()
    with pytest.raises(ValueError, match="^weight: expected a tensor on cpu"):
        hk.token_stats(h, w.to("meta"), y)
    with pytest.raises(ValueError, match="^targets: expected a tensor on cpu"):
        hk.token_stats(h, w, y.to("meta"))


BAD_LOSS_TERMS = [
    ("fused_loss: no loss term", {}),
    ("advantages: required when rlif_weight", dict(rlif_weight=1.0)),
    ("rlif_weight: required when advantages", dict(rd_weight=1.0, advantages=torch.ones(6))),
    ("ref_logp: required when kl_weight", dict(kl_weight=0.1)),
    ("kl_weight: required when ref_logp", dict(rd_weight=1.0, ref_logp=torch.zeros(6))),
    ("old_logp: given without rlif_weight", dict(rd_weight=1.0, old_logp=torch.zeros(6))),
    ("rd_weight: expected shape", dict(rd_weight=torch.ones(5))),
    ("rd_weight: expected a floating dtype", dict(rd_weight=torch.ones(6, dtype=torch.long))),
    ("advantages: contains non-finite", dict(rlif_weight=1.0, advantages=torch.tensor([1.0, float("nan"), 0, 0, 0, 0]))),
    ("clip_eps: expected", dict(rd_weight=1.0, clip_eps=(1.5, 0.2))),
    ("clip_eps: expected", dict(rd_weight=1.0, clip_eps=(0.2,))),
    ("rd_weight: expected a tensor on cpu", dict(rd_weight=torch.ones(6, device="meta"))),
]


@pytest.mark.parametrize("message,terms", BAD_LOSS_TERMS, ids=[m.split(":")[0] + str(i) for i, (m, _) in enumerate(BAD_LOSS_TERMS)])
def test_bad_loss_terms_name_the_argument(message, terms):
    h, w, y = inputs()
    with pytest.raises((ValueError, TypeError), match="^" + message):
        hk.fused_loss(h, w, y, **terms)


def test_unavailable_backend_says_why():
    h, w, y = inputs()
    for name in ("cuda",):
        with pytest.raises(hk.BackendUnavailableError, match=f"backend '{name}' is unavailable on cpu: "):
            hk.token_stats(h, w, y, backend=name)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
def test_triton_refuses_fp64_by_name():
    with pytest.raises(TypeError, match="^hidden: backend 'triton' takes float16, bfloat16, float32 inputs, got float64"):
        hk.token_stats(*inputs(dtype=torch.float64)[:2], backend="triton")


def test_auto_dispatch_on_cpu_is_chunked(monkeypatch):
    calls = []
    real = torch_chunked.token_stats
    monkeypatch.setattr(torch_chunked, "token_stats", lambda *a: calls.append(1) or real(*a))
    hk.token_stats(*inputs())
    assert calls == [1]


def test_checks_off_masks_out_of_range_targets_and_propagates_nan():
    h, w, y = inputs()
    y_bad = y.clone()
    y_bad[1], y_bad[4] = 11, -7
    hk.set_checks(False)
    try:
        s = hk.token_stats(h, w, y_bad)
        assert s.logp[1] == 0 and s.logp[4] == 0  # masked like ignore_index: nothing read out of bounds
        ref = hk.token_stats(h, w, y)
        keep = torch.ones(6, dtype=torch.bool)
        keep[[1, 4]] = False
        assert torch.equal(s.logp[keep], ref.logp[keep])
        h_nan = h.clone()
        h_nan[2, 0] = float("nan")
        assert torch.isnan(hk.token_stats(h_nan, w, y).lse[2])
        loss, _ = hk.fused_loss(h, w, y_bad, **ok_terms())
        assert torch.isfinite(loss)
    finally:
        hk.set_checks(True)
    with pytest.raises(ValueError, match="^targets"):
        hk.token_stats(h, w, y_bad)


def test_chunked_backend_never_holds_more_than_one_chunk(monkeypatch):
    """Every logits tile the chunked backend forms has at most chunk_size rows."""
    rows = []
    real = torch_chunked._Call.logits
    monkeypatch.setattr(torch_chunked._Call, "logits",
                        lambda self, sl, vs: rows.append(sl.stop - sl.start) or real(self, sl, vs))
    h, w, y = inputs(n=23)
    h.requires_grad_()
    s = hk.token_stats(h, w, y, backend="torch_chunked", chunk_size=5)
    s.entropy.sum().backward()
    loss, _ = hk.fused_loss(h, w, y, backend="torch_chunked", chunk_size=5, rd_weight=1.0)
    loss.backward()
    assert rows and max(rows) <= 5 and sum(rows) == 3 * 23


def test_default_chunk_bounds_the_tile():
    """The tile stays within half the hidden states' fp32 bytes (2·N·D, torch's chunked
    linear_cross_entropy's default), clamped to [MIN_TILE_BYTES, TILE_BYTES], a chunk is a
    multiple of ROW_ALIGN rows when more fit, and at least one row."""
    from hykernels._types import LogitOptions

    tc = torch_chunked
    for n, d, v in ((10**6, 4096, 151936), (8192, 1024, 32768), (2048, 1024, 151936), (300, 64, 1000)):
        rows = tc.chunk_rows(n, v, d, LogitOptions())
        budget = max(tc.MIN_TILE_BYTES, min(tc.TILE_BYTES, 2 * n * d))
        assert 1 <= rows <= n and (rows * v * 4 <= budget or rows == 1)
        # as many rows as fit, rounded down to a multiple of ROW_ALIGN
        assert rows == n or (rows + tc.ROW_ALIGN) * v * 4 > budget
        assert rows == n or rows < tc.ROW_ALIGN or rows % tc.ROW_ALIGN == 0
    assert tc.chunk_rows(8192, 32768, 1024, LogitOptions()) == 128  # 16 MiB, as torch's 128-row chunk there
    assert tc.chunk_rows(7, 32768, 64, LogitOptions()) == 7
    assert tc.chunk_rows(100, 1000, 64, LogitOptions(chunk_size=5)) == 5


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from hykernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.availability("triton", torch.device("cpu"))
    assert reason is not None and "CUDA device" in reason and "TRITON_INTERPRET=1" in reason
