"""bench/roofline.py: the triton backend's passes as FLOPs, L2 and HBM bytes, against a count by hand
from the kernels' loop bounds at one small shape (N=300, D=96, V=1000); the predicted times at given
rates, computed here from those counts; the other backends' and peers' models at the same shape;
checks that the model follows the code (tables, chunk budgets, traced implementations); the lmhead
shape's totals. Every expected number below is written out by hand, not taken from the module."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name):
    """A bench/ module (bench/ on sys.path, as run.py puts it)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def rl():
    return _bench("roofline")


def _small(rl, op):
    """N=300, D=96, V=1000 bf16 on a 2-SM GPU, a 512000-byte workspace (128 rows of fp32 logits,
    256 of bf16 gradient), an L2 of 100 kB (operands up to 50 kB stay resident), small tiles."""
    from hykernels.backends.triton import Blocks

    blocks = {"logits_fwd": Blocks(32, 64, 32, group_m=2), "logits_grad": Blocks(32, 64, 32, group_m=2),
              "dh_gemm": Blocks(32, 64, 64, group_m=2), "dw_gemm": Blocks(64, 32, 32, group_m=4),
              "grad_inplace": Blocks(m=1, n=256, k=0)}
    return rl.plan(op, 300, 96, 1000, "bfloat16", blocks_by_kernel=blocks, workspace_bytes=512_000, device_sms=2,
                   l2_bytes=100_000, fp32_accumulate=False)


def _counts(p):
    return {r["kernel"]: (r["launches"], r["programs"], r["dot_flops"], r["epilogue_flops"], r["useful_flops"],
                          r["hbm_bytes_read"], r["hbm_bytes_written"]) for r in p["passes"]}


# Shared below: a 32×64×32 dot step is 2·32·64·32 = 131072 FLOPs, 32×64×64 is 262144, 64×32×32
# is 131072. W is 1000·96·2 = 192000 bytes (> 50 kB: re-read per group of row blocks); the whole
# 300-row H is 300·96·2 = 57600 bytes, a 128-row chunk of it 24576 (< 50 kB: resident), 256 rows
# 49152 (resident). Useful FLOPs per GEMM pass: 2·300·96·1000 = 57600000.

def test_fused_loss_matches_a_hand_count(rl):
    p = _small(rl, "fused_loss")
    # chunk_rows: 512000 // (1000·4) = 128 rows (a multiple of 64): chunks of 128, 128, 44 rows
    assert (p["chunk_rows"], p["chunks"], p["workspace_bytes"]) == (128, 3, 128 * 1000 * 4)
    # split_for on 2 SMs: want ⌈2·2/⌈rows/128⌉⌉ = 4 splits, width ⌈⌈1000/4⌉/256⌉·256 = 256:
    # splits of 256, 256, 256, 232 vocabulary entries = 4+4+4+4 column tiles of 64
    assert p["splits"] == 4
    assert _counts(p) == {
        # logits_fwd: ⌈128/32⌉ = 4 row blocks (44 rows: 2), 16 column tiles, ⌈96/32⌉ = 3 k steps.
        # programs (4+4+2)·4 splits; epilogue 10 per element of (4+4+2)·32 rows × 16·64 columns.
        # read: H 57600, W once per group of 2 row blocks: 2+2+1 = 5 times 192000, targets 8·300;
        # written: fp32 logits 4·300·1000 and partials 24 B · 4 splits · 300 rows.
        "logits_fwd": (3, 10 * 4, 10 * 16 * 3 * 131072, 10 * (10 * 32 * 16 * 64), 57_600_000,
                       57_600 + 5 * 192_000 + 8 * 300, 4 * 300 * 1000 + 24 * 4 * 300),
        # grad_inplace: a row per program, ⌈1000/256⌉ = 4 column blocks of 256 (1024 columns):
        # 12 FLOPs per element; reads the fp32 logits and 32 B per row, writes bf16 gradient.
        "grad_inplace": (3, 300, 0, 12 * 300 * 1024, 0, 4 * 300 * 1000 + 32 * 300, 2 * 300 * 1000),
        # dh_gemm: output rows × 96 in 32×64 tiles: 4 (2) row blocks × ⌈96/64⌉ = 2 column blocks,
        # ⌈1000/64⌉ = 16 k steps; α per element of (4+4+2)·32 × 2·64. read: G 2·300·1000, W once
        # per group of 2 row blocks (2+2+1 times); written: dH 300·96·2.
        "dh_gemm": (3, 10 * 2, 10 * 2 * 16 * 262144, 10 * 32 * 2 * 64, 57_600_000,
                    2 * 300 * 1000 + 5 * 192_000, 300 * 96 * 2),
        # dw_gemm: output 1000 × 96 in 64×32 tiles: ⌈1000/64⌉ = 16 × 3 = 48 programs a launch,
        # ⌈128/32⌉ = 4 (44 rows: 2) k steps: (4+4+2)·48 tile steps. Epilogue α (+ β·dW after the
        # first chunk): (1+2+2)·16·64·3·32. read: G, the H chunks once each (resident), dW in
        # chunks 2 and 3: 2·192000; written: dW (bf16) 3·192000.
        "dw_gemm": (3, 3 * 48, 10 * 48 * 131072, 5 * 16 * 64 * 3 * 32, 57_600_000,
                    2 * 300 * 1000 + 57_600 + 2 * 192_000, 3 * 192_000),
    }
    assert sum(r["useful_flops"] for r in p["passes"]) == 6 * 300 * 96 * 1000
    assert all(r["atomics"] == 0 for r in p["passes"])


def test_token_stats_and_backward_match_a_hand_count(rl):
    fwd, bwd = _small(rl, "token_stats"), _small(rl, "token_stats_bwd")
    # token_stats: one launch over all 300 rows; split_for: want ⌈2·2/⌈300/128⌉⌉ = 2 splits,
    # width ⌈500/256⌉·256 = 512: splits of 512 and 488 = 8+8 column tiles of 64;
    # ⌈300/32⌉ = 10 row blocks = 5 groups of 2: W read 5 times; no logits kept.
    assert fwd["splits"] == 2
    assert _counts(fwd) == {"logits_fwd": (1, 10 * 2, 10 * 16 * 3 * 131072, 10 * (10 * 32 * 16 * 64), 57_600_000,
                                           57_600 + 5 * 192_000 + 8 * 300, 24 * 2 * 300)}
    # backward: 512000 // (1000·2) = 256 rows of bf16 gradient: chunks of 256 and 44 rows
    assert (bwd["chunk_rows"], bwd["chunks"], bwd["workspace_bytes"]) == (256, 2, 256 * 1000 * 2)
    assert _counts(bwd) == {
        # logits_grad: 8 (2) row blocks × ⌈1000/64⌉ = 16 column tiles, 3 k steps; 13 FLOPs per
        # element; read H, W per group of 2 row blocks (4+1 times), 32 B per row; written G.
        "logits_grad": (2, 10 * 16, 10 * 16 * 3 * 131072, 13 * (10 * 32 * 16 * 64), 57_600_000,
                        57_600 + 5 * 192_000 + 32 * 300, 2 * 300 * 1000),
        "dh_gemm": (2, 10 * 2, 10 * 2 * 16 * 262144, 10 * 32 * 2 * 64, 57_600_000,
                    2 * 300 * 1000 + 5 * 192_000, 300 * 96 * 2),
        # dw_gemm: ⌈256/32⌉ = 8 (44 rows: 2) k steps; β only in the second chunk
        "dw_gemm": (2, 2 * 48, 10 * 48 * 131072, 3 * 16 * 64 * 3 * 32, 57_600_000,
                    2 * 300 * 1000 + 57_600 + 192_000, 2 * 192_000),
    }


def test_blocks_as_launch_constexprs(rl):
    """The dict _configs.launch returns (the tuned config) serves as well as a Blocks."""
    from hykernels.backends.triton import Blocks

    a = rl.plan("token_stats_bwd", 300, 96, 1000, "float32", blocks_by_kernel={"dh_gemm": Blocks(32, 64, 16)})
    b = rl.plan("token_stats_bwd", 300, 96, 1000, "float32",
                blocks_by_kernel={"dh_gemm": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)})
    assert _counts(a) == _counts(b)


def test_lmhead_shape(rl):
    """N=16384, D=4096, V=151936 bf16: fused_loss is 6·N·D·V useful FLOPs, token_stats and its
    backward 8·N·D·V; both workspaces under 0.3 GiB; no pass of either uses an atomic."""
    n, d, v = 16384, 4096, 151936
    fused = rl.roofline("fused_loss", n, d, v, "bfloat16")
    fwd, bwd = (rl.roofline(op, n, d, v, "bfloat16") for op in ("token_stats", "token_stats_bwd"))
    assert fused["total"]["useful_flops"] == 6 * n * d * v
    assert fwd["total"]["useful_flops"] + bwd["total"]["useful_flops"] == 8 * n * d * v
    assert (fused["chunk_rows"], bwd["chunk_rows"]) == (512, 1024)
    assert max(fused["workspace_bytes"], bwd["workspace_bytes"]) <= 0.3 * 2**30
    for r in (fused, fwd, bwd):
        assert all(p["atomics"] == 0 for p in r["passes"])
        assert r["total"]["flops"] >= r["total"]["useful_flops"]
        assert r["total"]["roofline_ms"] >= r["ideal_ms"] > 0
    # the backend's docstring: per 512-row chunk, W (1.24 GB) read once by logits_fwd and dh_gemm;
    # dw_gemm reads and writes dW (bf16) once per chunk but the first
    wb = v * d * 2
    per = {p["kernel"]: p for p in fused["passes"]}
    assert per["logits_fwd"]["hbm_bytes_read"] == 32 * (512 * d * 2 + wb + 8 * 512)
    assert per["dh_gemm"]["hbm_bytes_read"] == 32 * (512 * v * 2 + wb)
    assert per["dw_gemm"]["hbm_bytes_read"] == 32 * (512 * v * 2 + 512 * d * 2) + 31 * wb


def test_fused_loss_recomputes_when_no_row_fits(rl):
    p = rl.plan("fused_loss", 300, 96, 1000, "bfloat16", workspace_bytes=3000)  # < 4·1000: not one fp32 row
    assert p["path"].startswith("recompute")
    assert [r["kernel"] for r in p["passes"]] == ["logits_fwd", "logits_grad", "dh_gemm", "dw_gemm"]
    assert sum(r["useful_flops"] for r in p["passes"]) == 8 * 300 * 96 * 1000


def test_bench_report_sets_measured_time_beside_the_roofline(rl):
    report = _bench("report")
    case = dict(id=0, workload="ce", model="4096:151936", D=4096, V=151936, N=16384, dtype="bfloat16")
    section = rl.bench_section([case], 132)
    (entry,) = section["cases"]
    assert entry["total_ms"] == entry["fwd_ms"] == entry["ops"]["fused_loss"]["total"]["roofline_ms"]
    row = dict(impl="hk_triton", case=0, status="ok", fwd_ms=2 * entry["total_ms"], bwd_ms=0.1,
               total_ms=2 * entry["total_ms"])
    rep = dict(device={"kind": "cuda"}, device_name="GPU", config={}, cases=[case], results=[row],
               roofline=section)
    report.annotate(rep)
    assert row["roofline"]["measured_over_roofline"] == pytest.approx(2.0)
    assert "×roofline" in report.markdown_table(rep) and "| 2.00 (" in report.markdown_table(rep)
    rep["device"] = {"kind": "cpu"}  # the interpreter: no ratio against a GPU's roofline
    del row["roofline"]
    report.annotate(rep)
    assert "roofline" not in row and "×roofline" not in report.markdown_table(rep)


# --------------------------------------------------------------------------------------------
# L2 operand bytes, epilogue bytes, dW read-modify-write and predicted time at the small shape
# --------------------------------------------------------------------------------------------

def _by_kernel(p):
    return {r["kernel"]: r for r in p["passes"]}


def test_l2_epilogue_and_dw_bytes_match_a_hand_count(rl):
    p = _by_kernel(_small(rl, "fused_loss"))
    # L2 operand traffic: per program and k step an m×k and an n×k tile of 2-byte entries.
    # logits_fwd 32×64×32: (32 + 64)·32·2 = 6144 B per step; (4+4+2) row blocks × 16 column
    # tiles × 3 k steps. dh_gemm 32×64×64: (32 + 64)·64·2 = 12288 B per step; (4+4+2)·2 tiles ×
    # 16 k steps. dw_gemm 64×32×32: (64 + 32)·32·2 = 6144 B per step; 48 tiles × (4+4+2) k steps.
    assert p["logits_fwd"]["l2_bytes"] == 10 * 16 * 3 * 6144
    assert p["dh_gemm"]["l2_bytes"] == 20 * 16 * 12288
    assert p["dw_gemm"]["l2_bytes"] == 48 * 10 * 6144
    assert p["grad_inplace"]["l2_bytes"] == 0
    # epilogue bytes: what each kernel writes, and dW's read-back (BETA, chunks 2 and 3)
    assert p["logits_fwd"]["epilogue_bytes"] == 4 * 300 * 1000 + 24 * 4 * 300
    assert p["grad_inplace"]["epilogue_bytes"] == 4 * 300 * 1000 + 32 * 300 + 2 * 300 * 1000
    assert p["dh_gemm"]["epilogue_bytes"] == 300 * 96 * 2
    assert p["dw_gemm"]["epilogue_bytes"] == 3 * 192_000 + 2 * 192_000
    # dW traffic (read-modify-write) and W reads from HBM (W once per group of 2 row blocks: 5x)
    assert p["dw_gemm"]["dw_bytes"] == 5 * 192_000
    assert sum(r["dw_bytes"] for r in p.values()) == 5 * 192_000
    assert p["logits_fwd"]["w_read_bytes"] == p["dh_gemm"]["w_read_bytes"] == 5 * 192_000
    assert p["dw_gemm"]["w_read_bytes"] == 0


# Rates for the hand count: 100 TFLOP/s matmul, 10 TFLOP/s vector, 1 TB/s HBM, 2 TB/s L2.
HAND_RATES = dict(peak_flops=100e12, vector_flops=10e12, hbm_bytes_per_s=1e12, l2_bytes_per_s=2e12)


def _hand_fused_loss_seconds():
    """The small fused_loss at HAND_RATES, pass by pass: max(compute, HBM main loop, L2) +
    max(epilogue FLOPs / vector, epilogue bytes / HBM). Two programs fit the 2-SM GPU at once and
    every launch's grid is a multiple of 2 (16, 16, 8; 8, 8, 4; 48): no wave is partly empty."""
    logits = max(10 * 16 * 3 * 131072 / 100e12,  # dot FLOPs
                 (57_600 + 5 * 192_000 + 8 * 300) / 1e12,  # H, W 5x, targets
                 10 * 16 * 3 * 6144 / 2e12) + max(10 * (10 * 32 * 16 * 64) / 10e12,
                                                  (4 * 300 * 1000 + 24 * 4 * 300) / 1e12)
    grad = max(12 * 300 * 1024 / 10e12, (4 * 300 * 1000 + 32 * 300 + 2 * 300 * 1000) / 1e12)
    dh = max(20 * 16 * 262144 / 100e12, (2 * 300 * 1000 + 5 * 192_000) / 1e12,
             20 * 16 * 12288 / 2e12) + max(20 * 32 * 64 / 10e12, 300 * 96 * 2 / 1e12)
    dw = max(10 * 48 * 131072 / 100e12, (2 * 300 * 1000 + 57_600) / 1e12,
             48 * 10 * 6144 / 2e12) + max(5 * 16 * 64 * 3 * 32 / 10e12, (3 + 2) * 192_000 / 1e12)
    return {"logits_fwd": logits, "grad_inplace": grad, "dh_gemm": dh, "dw_gemm": dw}


def _small_roofline(rl, **rates):
    from hykernels.backends.triton import Blocks

    blocks = {"logits_fwd": Blocks(32, 64, 32, group_m=2), "logits_grad": Blocks(32, 64, 32, group_m=2),
              "dh_gemm": Blocks(32, 64, 64, group_m=2), "dw_gemm": Blocks(64, 32, 32, group_m=4),
              "grad_inplace": Blocks(m=1, n=256, k=0)}
    return rl.roofline("fused_loss", 300, 96, 1000, "bfloat16", blocks_by_kernel=blocks, workspace_bytes=512_000,
                       device_sms=2, l2_bytes=100_000, fp32_accumulate=False, **rates)


def test_predicted_time_matches_a_hand_count(rl):
    r = _small_roofline(rl, **HAND_RATES)
    want = _hand_fused_loss_seconds()
    got = {p["kernel"]: p["roofline_ms"] / 1e3 for p in r["passes"]}
    assert got == pytest.approx(want, rel=1e-12)
    assert r["total"]["roofline_ms"] / 1e3 == pytest.approx(sum(want.values()), rel=1e-12)
    # bounds: the logits and both gradient GEMMs wait on L2 (2 TB/s), grad_inplace is all epilogue
    assert {p["kernel"]: p["bound"] for p in r["passes"]} == {"logits_fwd": "L2", "grad_inplace": "epilogue",
                                                              "dh_gemm": "L2", "dw_gemm": "L2"}
    # the check can fail: another L2 rate gives another time
    other = _small_roofline(rl, **{**HAND_RATES, "l2_bytes_per_s": 4e12})
    assert other["total"]["roofline_ms"] / 1e3 != pytest.approx(sum(want.values()), rel=1e-3)


def test_wave_quantisation_of_a_grid(rl):
    """A grid of 3 programs on 2 SMs runs 2 waves: 4/3 of its FLOPs' time (8 warps: one per SM);
    a 4-warp tile fits two per SM: one wave."""
    from hykernels.backends.triton import Blocks

    def dh_ms(b):
        r = rl.roofline("fused_loss", 96, 96, 1000, "bfloat16", blocks_by_kernel={"dh_gemm": b}, device_sms=2,
                        workspace_bytes=10**8, peak_flops=100e12, l2_bytes_per_s=1e30, hbm_bytes_per_s=1e30,
                        vector_flops=1e30)
        return next(p for p in r["passes"] if p["kernel"] == "dh_gemm")

    # 96 rows × 96 dims in 32×32 tiles: 9 programs; steps of 64 over 1000: 16 (1024 padded)
    p8 = dh_ms(Blocks(32, 32, 64, num_warps=8))
    assert p8["programs"] == 9 and p8["dot_flops"] == 9 * 16 * 2 * 32 * 32 * 64
    assert p8["compute_ms"] / 1e3 == pytest.approx(10 / 9 * 9 * 16 * 2 * 32 * 32 * 64 / 100e12)  # 5 waves of 2
    p4 = dh_ms(Blocks(32, 32, 64, num_warps=4))
    assert p4["compute_ms"] / 1e3 == pytest.approx(12 / 9 * 9 * 16 * 2 * 32 * 32 * 64 / 100e12)  # 3 waves of 4


# --------------------------------------------------------------------------------------------
# the other backends and the peers, at the small shape
# --------------------------------------------------------------------------------------------

def _rates(rl, **kw):
    return rl.Rates(**{**dict(matmul=100e12, fp32_matmul=100e12, vector=10e12, hbm=1e12, l2=2e12, sms=2,
                              l2_bytes=100_000), **kw})


def test_cuda_model_matches_a_hand_count(rl, monkeypatch):
    """cuda.plan with a 1.1 MB workspace: 137500 fp32 per lane, 137 rows of V=1000 → 128 (a
    multiple of 64): chunks of 128, 128, 44; a row fits, so fused_loss's single pass."""
    from hykernels.backends import cuda as cb

    monkeypatch.setattr(cb, "WORKSPACE_BYTES", 1_100_000)
    m = rl.model_hk_cuda(300, 96, 1000, "bfloat16", _rates(rl))
    assert (m["chunk_rows"], m["chunks"]) == (128, 3)
    assert m["epilogue_bytes_per_logit"] == 14  # fp32 GEMM write 4, stats read 4, grad read 4 + write 2
    wb = rl.model_hk_cuda(300, 96, 1000, "bfloat16", _rates(rl), write_back=True)
    assert wb["epilogue_bytes_per_logit"] == 18  # + the transformed logits stored back
    capped = rl.model_hk_cuda(300, 96, 1000, "bfloat16", _rates(rl), opts=rl.LogitOptions(softcap=30.0))
    assert capped["epilogue_bytes_per_logit"] == 18  # a softcap: the stored logits differ from the GEMM's
    p = {r["pass"].split(" ")[0]: r for r in m["passes"]}
    assert p["logit_stats"]["hbm_bytes_read"] + p["logit_stats"]["hbm_bytes_written"] == 4 * 300 * 1000 + 56 * 300
    assert wb["total"]["hbm_bytes_written"] - m["total"]["hbm_bytes_written"] == 4 * 300 * 1000
    assert p["logit_grad"]["hbm_bytes_read"] + p["logit_grad"]["hbm_bytes_written"] == 6 * 300 * 1000 + 32 * 300
    # dW: zero-filled (192000 B), then read and written by each of the 3 addmm_; the backward's
    # in-place scaling reads and writes it once more
    assert m["total"]["dw_bytes"] == 192_000 + 3 * 2 * 192_000 + 2 * 192_000
    # the logits GEMM: cuBLAS 128×256 tiles (2-CTA multicast: 2·2·128·256/(2·128·2 + 256·2) = 128
    # FLOP per L2 byte); the 44-row chunk gets a 64-row tile (85.33 FLOP/B); V=1000 → 4 tiles of 256
    dot = 2 * (128 + 128 + 64) * 1024 * 96
    g = p["logits"]
    assert g["dot_flops"] == dot
    assert g["l2_bytes"] == pytest.approx(2 * 2 * 128 * 1024 * 96 / 128 + 2 * 64 * 1024 * 96 / (65536 / 768))
    assert g["hbm_bytes_read"] == 300 * 96 * 2 + 3 * 192_000  # H once, W (fits the L2) once per chunk
    assert g["hbm_bytes_written"] == 4 * 300 * 1000
    seconds = max(dot / 100e12, g["l2_bytes"] / 2e12, (300 * 96 * 2 + 3 * 192_000) / 1e12) + 4 * 300 * 1000 / 1e12
    assert g["roofline_ms"] / 1e3 == pytest.approx(seconds)
    # efficiency = 6·N·D·V / t / matmul rate
    s = m["summary"] if "summary" in m else rl.summarize(dict(m, N=300, D=96, V=1000, dtype="bfloat16"), _rates(rl))
    assert s["efficiency"] == pytest.approx(6 * 300 * 96 * 1000 / (m["total"]["roofline_ms"] / 1e3) / 100e12)


def test_liger_flce_model_matches_a_hand_count(rl):
    """Liger's chunk rule: ⌈V/D⌉ = 11, next_pow2(⌈300/11⌉ = 28) = 32 rows: 9 chunks of 32 and one
    of 12; bf16 logits written (2 B), read twice and overwritten by the CE kernel (6 B)."""
    m = rl.model_liger_flce(300, 96, 1000, "bfloat16", _rates(rl))
    assert (m["chunk_rows"], m["chunks"]) == (32, 10)
    assert m["epilogue_bytes_per_logit"] == 8
    ce = next(r for r in m["passes"] if r["pass"].startswith("liger_cross_entropy_kernel"))
    assert (ce["hbm_bytes_read"], ce["hbm_bytes_written"]) == (4 * 300 * 1000, 2 * 300 * 1000)
    assert ce["roofline_ms"] / 1e3 == pytest.approx(max(10 * 300 * 1000 / 10e12, 6 * 300 * 1000 / 1e12))
    # dW: zero-filled, then read and written by each chunk's addmm
    assert m["total"]["dw_bytes"] == 192_000 + 10 * 2 * 192_000
    assert m["total"]["w_read_bytes"] == 2 * 10 * 192_000  # the logits GEMM and dH, per chunk


def test_cce_model_and_its_filter(rl):
    """CCE: 128×128×32 tiles; every tile recomputes its logits in the backward; the filter's kept
    fraction on the bench's inputs (logits ~ N(0, 1)) from the normal tail, computed here."""
    import math

    full = rl.model_cce(300, 96, 1000, "bfloat16", _rates(rl))
    tiles = 3 * 8  # ⌈300/128⌉ × ⌈1000/128⌉
    rec = next(r for r in full["passes"] if r["pass"].startswith("backward: recompute"))
    assert rec["dot_flops"] == tiles * 2 * 128 * 128 * 96
    assert rec["l2_bytes"] == tiles * 3 * 32 * (128 + 128) * 2
    grads = next(r for r in full["passes"] if r["pass"].startswith("backward: dE"))
    assert grads["dot_flops"] == 2 * 2 * tiles * 128 * 128 * 96
    assert grads["l2_bytes"] == tiles * 3 * (128 + 128) * 96 * 2
    half = rl.model_cce(300, 96, 1000, "bfloat16", _rates(rl), kept=0.5)
    assert next(r for r in half["passes"] if r["pass"].startswith("backward: dE"))["dot_flops"] == \
        grads["dot_flops"] / 2
    eps = 2.0 ** -7 / 32  # bf16 eps / 32
    t = math.log(eps * 151936) + 0.5
    q = 0.5 * math.erfc(t / math.sqrt(2))
    want = 1 - (1 - q) ** (128 * 128) * (1 - 0.9 * 128 / 151936) ** 128
    assert rl.cce_kept_fraction_random(151936) == pytest.approx(want)
    assert 0.3 < want < 0.4


def test_liger_cute_models(rl):
    """The SM90 FLCE needs V % 256 == 0 (Qwen's 151936 is not: 593.5 tiles); the fused scaled CE
    runs any shape, recomputing the logits in its backward (8·N·D·V in waves of 1024 tokens)."""
    r = rl.Rates()
    assert not rl.model_liger_cute_flce(16384, 4096, 151936, "bfloat16", r)["available"]
    ok = rl.model_liger_cute_flce(4096, 4096, 128256, "bfloat16", r)
    assert ok["available"] and ok["total"]["dot_flops"] == 6 * 4096 * 4096 * 128256 / 128256 * 128256
    scaled = rl.model_liger_cute_scaled(300, 96, 1000, "bfloat16", _rates(rl))
    dz = next(p for p in scaled["passes"] if p["pass"].startswith("backward dZ"))
    assert dz["launches"] == 1 and dz["dot_flops"] == 2 * 1024 * 1024 * 128  # one wave; V → 1024, D → 128
    assert not rl.model_liger_cute_scaled(300, 96, 1000, "float32", _rates(rl))["available"]


def test_torch_lce_model_counts_its_passes(rl):
    """torch's chunked F.linear_cross_entropy traced on fake CUDA tensors (bf16, CUDA defaults:
    'compact', fp32 acc, chunks of next_pow2(⌈300/⌈1000/96⌉⌉)/2 = 16 rows). Per logit of the fp32
    tile, besides the GEMM's 4-byte write: amax reads 4, sub_ 4+4, exp_ 4+4, sum 4, mul 4+4 and
    the bf16 copy 4+2: 38 bytes, plus the [rows]-sized outputs of the two reductions."""
    m = rl.model_torch_lce(300, 96, 1000, "bfloat16", _rates(rl))
    if not m["available"]:
        pytest.skip(m["reason"])
    assert (m["chunk_rows"], m["chunks"]) == (16, 19)
    tile = [r for r in m["passes"] if r["pass"].endswith("[rows×V]")]
    tile_bytes = sum(r["hbm_bytes_read"] + r["hbm_bytes_written"] for r in tile)
    assert sorted(r["pass"].split(" ")[0] for r in tile) == ["_to_copy", "amax.out", "exp_", "mul.out", "sub_.Tensor",
                                                            "sum.dim_IntList"]
    assert 38 * 300 * 1000 <= tile_bytes <= 38 * 300 * 1000 + 16 * 300
    gemms = [r for r in m["passes"] if r["kind"] == "gemm"]
    assert sum(r["useful_flops"] for r in gemms) == 6 * 300 * 96 * 1000
    # reduction='none' recomputes the logits GEMM in backward: 8·N·D·V
    none = rl.model_torch_lce(300, 96, 1000, "bfloat16", _rates(rl), reduction="none")
    assert sum(r["useful_flops"] for r in none["passes"] if r["kind"] == "gemm") == 8 * 300 * 96 * 1000


# --------------------------------------------------------------------------------------------
# the model follows the code
# --------------------------------------------------------------------------------------------

def test_model_follows_the_triton_tables_and_budget(rl, monkeypatch):
    """Change a _configs table or the chunk budget: the plan and the prediction change with it."""
    from hykernels.backends import triton as tb
    from hykernels.backends.triton import Blocks

    n, d, v = 16384, 4096, 151936
    base = rl.roofline("fused_loss", n, d, v, "bfloat16")
    half, fp32 = tb._configs.TABLES["dh_gemm"]
    monkeypatch.setitem(tb._configs.TABLES, "dh_gemm", ((Blocks(128, 128, 64),) + half, fp32))
    moved = rl.roofline("fused_loss", n, d, v, "bfloat16")
    assert (moved["blocks"]["dh_gemm"]["BLOCK_M"], moved["blocks"]["dh_gemm"]["BLOCK_N"]) == (128, 128)
    dh = {r["kernel"]: r for r in moved["passes"]}["dh_gemm"]
    # per 512-row chunk: 4 × 32 tiles, ⌈151936/64⌉ = 2374 k steps of (128 + 128)·64·2 bytes
    assert dh["l2_bytes"] == 32 * (512 // 128) * (4096 // 128) * 2374 * (128 + 128) * 64 * 2
    assert moved["total"]["roofline_ms"] < base["total"]["roofline_ms"]  # 128 programs fill 132 SMs, 64 did not
    monkeypatch.undo()
    monkeypatch.setattr(tb, "WORKSPACE_BYTES", 150 * 2**20)  # half the budget: 256-row chunks
    small = rl.roofline("fused_loss", n, d, v, "bfloat16")
    assert (small["chunk_rows"], small["chunks"]) == (256, 64)
    wb = v * d * 2
    assert small["total"]["w_read_bytes"] == 2 * 64 * wb  # logits_fwd and dh_gemm read W once per chunk
    assert small["total"]["dw_bytes"] == (64 + 63) * wb  # dW written 64 times, read back 63
    assert small["total"]["roofline_ms"] > base["total"]["roofline_ms"]


def test_model_follows_the_cuda_plan(rl, monkeypatch):
    from hykernels.backends import cuda as cb

    r = rl.Rates()
    base = rl.model_hk_cuda(16384, 4096, 151936, "bfloat16", r)
    assert (base["chunk_rows"], base["chunks"]) == cb.plan(16384, 151936, rl.LogitOptions())[:1] + (26,)
    monkeypatch.setattr(cb, "WORKSPACE_BYTES", 192 * 2**20)  # a quarter: 128-row chunks
    small = rl.model_hk_cuda(16384, 4096, 151936, "bfloat16", r)
    assert small["chunk_rows"] == cb.plan(16384, 151936, rl.LogitOptions())[0] == 128
    assert small["total"]["dw_bytes"] > 4 * base["total"]["dw_bytes"] * 0.9
    assert small["total"]["roofline_ms"] > base["total"]["roofline_ms"]


def test_model_follows_the_torch_chunked_code(rl):
    """The traced model runs the backend's own fused_loss: its chunk size is the backend's, and a
    chunk_size option it honours changes the trace."""
    from hykernels._types import LogitOptions

    r = _rates(rl)
    auto = rl.model_hk_torch_chunked(300, 96, 1000, "bfloat16", r)
    assert auto["available"], auto.get("reason")
    gemm_flops = sum(p["useful_flops"] for p in auto["passes"] if p["kind"] == "gemm")
    assert gemm_flops == 6 * 300 * 96 * 1000
    forced = rl.model_hk_torch_chunked(300, 96, 1000, "bfloat16", r, opts=LogitOptions(chunk_size=64))
    assert (forced["chunk_rows"], forced["chunks"]) == (64, 5)
    assert sum(p["launches"] for p in forced["passes"]) > sum(p["launches"] for p in auto["passes"]) or \
        auto["chunk_rows"] == 64


# --------------------------------------------------------------------------------------------
# the lmhead shape and the command line
# --------------------------------------------------------------------------------------------

def test_every_model_at_the_lmhead_shape(rl):
    """N=16384, D=4096, V=151936 bf16: every analytic model predicts at least the useful FLOPs'
    time at the matmul rate (efficiency ≤ 1) and names a bound; the fused designs run 6·N·D·V."""
    names = ["hk_triton", "hk_cuda", "liger_flce", "liger_cute_flce", "liger_cute_scaled", "cce"]
    ms = {m["name"]: m for m in rl.step_models(16384, 4096, 151936, "bfloat16", rl.Rates(), names)}
    assert not ms["liger_cute_flce"]["available"]  # V % 256 != 0
    for name in ("hk_triton", "hk_cuda", "liger_flce", "liger_cute_scaled", "cce"):
        s = ms[name]["summary"]
        assert 0 < s["efficiency"] <= s["efficiency_high"] <= 1.0 + 1e-9, name
        assert s["bound"] in ("compute", "HBM", "L2", "epilogue")
    assert ms["hk_triton"]["summary"]["executed_ndv"] == 6.0
    assert ms["cce"]["summary"]["executed_ndv"] == pytest.approx(8.0, rel=0.01)
    # the figures: dW read-modify-write and W re-reads ~80 GB a step each in the triton backend
    assert ms["hk_triton"]["summary"]["dw_gb"] == pytest.approx(80, rel=0.05)
    assert ms["hk_triton"]["summary"]["w_read_gb"] == pytest.approx(80, rel=0.01)


def test_command_line_prints_the_table(rl, capsys):
    assert rl.main(["--models", "96:1000", "--n", "300", "--impls", "hk_triton", "hk_cuda", "liger_flce",
                    "--matmul-tflops", "500", "--hbm-tbs", "3", "--l2-tbs", "6"]) == 0
    out = capsys.readouterr().out
    assert "matmul 500 TFLOP/s, HBM 3 TB/s, L2 6 TB/s" in out
    assert out.count("| hk_triton |") == 1 and "| liger_flce |" in out and "efficiency" in out
