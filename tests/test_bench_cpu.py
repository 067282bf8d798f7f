"""Smoke test for bench/bench_cpu.py at a toy shape (runs the real script in subprocesses)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_toy_shape(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_cpu.py"), "--n", "64", "--d", "16", "--v", "301",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())

    for key in ("device", "versions", "command", "shape", "dtype", "results", "ratios", "targets",
                "correctness", "memory"):
        assert key in report, key
    assert report["shape"] == {"N": 64, "D": 16, "V": 301}
    assert report["dtype"] == "float32"
    for key in ("python", "torch", "triton"):
        assert report["versions"][key]
    assert report["device"]["cpu_count"] >= 1

    got = {(r["backend"], r["workload"]) for r in report["results"]}
    assert got == {(b, w) for b in ("reference", "torch_chunked") for w in ("token_stats", "fused_loss")}
    for r in report["results"]:
        assert r["fwd_s"] > 0 and r["bwd_s"] > 0 and r["total_s"] > 0
        assert isinstance(r["peak_extra_bytes"], int)

    for wl in ("token_stats", "fused_loss"):
        ratio = report["ratios"][wl]
        assert ratio["total_time"] > 0
        assert isinstance(ratio["time_target_met"], bool) and isinstance(ratio["memory_target_met"], bool)
        corr = report["correctness"][wl]
        assert corr["all_agree"], corr
        assert corr["fields"]["loss"]["max_abs_diff"] is not None

    assert "| backend | workload |" in proc.stdout
