"""bench/roofline.py: the triton backend's passes as FLOPs and HBM bytes, against a count by hand
from the kernels' loop bounds at one small shape, and the lmhead shape's totals."""
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
