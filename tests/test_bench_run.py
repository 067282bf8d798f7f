"""bench/run.py at a toy size on CPU: the harness runs, writes its JSON, checks every result
against the reference and flags a deliberately wrong implementation (--inject-wrong)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["reference", "hk_torch_chunked", "hk_triton", "hk_cuda", "reference_compiled"]


def _load_run():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "toy.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu", "--models", "toy", "--n", "64",
         "--prg-traces", "2", "--workloads", "ce", "prg", "--dtypes", "float32", "--impls", *IMPLS,
         "--inject-wrong", "--isolate", "impl", "--repeats", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, out


def test_report_fields(toy_run):
    report, _, out = toy_run
    for key in ("benchmark", "date", "command", "device", "device_name", "versions", "config", "ceiling",
                "implementations", "workloads", "timing", "memory", "correctness", "cases", "results"):
        assert key in report, key
    for key in ("python", "torch", "triton", "hykernels"):
        assert report["versions"][key]
    assert "bench/run.py" in report["command"] and "--inject-wrong" in report["command"]
    assert report["device"]["kind"] == "cpu" and report["device"]["cpu_count"] >= 1
    assert report["ceiling"]["matmul"]["tflops"] > 0
    # ce at N=64 and prg at 2 traces x (8+1) probes x 4 answer tokens = 72 rows
    assert [(c["workload"], c["N"], c["D"], c["V"]) for c in report["cases"]] == [("ce", 64, 48, 509),
                                                                                  ("prg", 72, 48, 509)]
    if report["plot"]:
        assert (out.parent / report["plot"]).stat().st_size > 0
    else:
        assert report["plot_skipped"]


def test_results_measured_and_checked(toy_run):
    report, _, _ = toy_run
    rows = {(r["impl"], r["workload"]): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == 2 * (len(IMPLS) + 1)
    for impl in ("reference", "hk_torch_chunked", "hk_triton"):
        for wl in ("ce", "prg"):
            r = rows[(impl, wl)]
            assert r["status"] == "ok", r
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["total_ms"] >= max(r["fwd_ms"], r["bwd_ms"])
            assert len(r["total_ms_all"]) == r["repeats"] == 2 and r["input_sets"] == 3
            assert r["useful_tflops"] > 0 and r["efficiency"] > 0
            assert isinstance(r["peak_extra_bytes"], int) and r["peak_above_io_bytes"] == r["peak_extra_bytes"] - r["io_bytes"]
            assert r["correctness"]["ok"] is True, r["correctness"]
            assert r["correctness"]["max_rel_err"] < 1e-4
            assert set(r["correctness"]["errors"]) >= {"loss", "grad_hidden", "grad_weight"}
    assert "support" in rows[("reference", "prg")]["correctness"]["errors"]
    # fused_loss forms the gradients in forward; the reference in backward
    assert rows[("hk_torch_chunked", "ce")]["grads_formed_in"] == "fwd"
    assert rows[("reference", "ce")]["grads_formed_in"] == "bwd"
    assert rows[("hk_triton", "prg")]["grads_formed_in"] == "bwd"
    # not built yet: skipped with the reason, never a failure
    assert rows[("hk_cuda", "ce")]["status"] == "skipped" and "cuda" in rows[("hk_cuda", "ce")]["reason"]
    # torch.compile: measured and right, or skipped with the reason
    for wl in ("ce", "prg"):
        r = rows[("reference_compiled", wl)]
        assert r["status"] in ("ok", "skipped"), r
        assert r["correctness"]["ok"] if r["status"] == "ok" else r["reason"]


def test_wrong_implementation_is_flagged(toy_run):
    report, stdout, _ = toy_run
    for r in report["results"]:
        if r["impl"] == "wrong":
            assert r["status"] == "ok" and r["correctness"]["ok"] is False
            assert r["correctness"]["max_rel_err"] > 0.05
    lines = stdout.strip().splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("| workload |"))):]
    assert table == lines[-len(table):], "the markdown table is printed last"
    header = [c.strip() for c in table[0].strip("|").split("|")]
    col = header.index("correct")
    cells = {}
    for row in table[2:]:
        parts = [c.strip() for c in row.strip("|").split("|")]
        cells[(parts[header.index("impl")], parts[header.index("workload")])] = parts[col]
    assert cells[("wrong", "ce")].startswith("**WRONG**") and cells[("wrong", "prg")].startswith("**WRONG**")
    assert cells[("reference", "ce")] == "ok" and cells[("hk_triton", "prg")] == "ok"
    assert ("hk_cuda", "ce") not in cells  # skipped ones are listed above the table, not in it
    assert any(ln.startswith("skipped hk_cuda") for ln in lines)


def test_static_skips_and_compare():
    run = _load_run()

    class MissingPeer(run.Impl):
        name = "missing"
        needs = ("hykernels_no_such_peer_module",)

    case = dict(workload="ce", model="toy", D=48, V=509, N=64, dtype="float32")
    assert "not installed" in MissingPeer().static_skip(case, "cpu")
    big = dict(case, D=576, V=49152, N=4096)
    assert "interpreter" in run.IMPLS["hk_triton"].static_skip(big, "cpu")
    assert run.IMPLS["hk_triton"].static_skip(big, "cuda") is None
    reason = run.IMPLS["cce"].static_skip(dict(case, workload="token_stats"), "cuda")
    assert "no token_stats path" in reason or "not installed" in reason  # CCE has no entropy output

    ref = {"loss": torch.tensor(2.0, dtype=torch.float64), "valid": torch.tensor([True, False]),
           "logp": torch.tensor([-1.0, 0.0], dtype=torch.float64), "grad_hidden": torch.ones(2, 8, dtype=torch.float64),
           "grad_weight": None}
    same = dict(ref, logp=torch.tensor([-1.0, 5.0], dtype=torch.float64))  # rows without a target are not compared
    assert run.compare(ref, same, "float32")["ok"]
    nan = dict(ref, grad_hidden=torch.full((2, 8), math.nan, dtype=torch.float64))
    res = run.compare(ref, nan, "float32")
    assert not res["ok"] and res["worst_output"] == "grad_hidden"
    assert not run.compare(ref, dict(ref, grad_weight=torch.ones(3, 8, dtype=torch.float64)), "float32")["ok"]
