"""bench/run.py at toy sizes on CPU: the harness runs, writes its JSON, checks every result against
the reference, flags a deliberately wrong implementation (--inject-wrong), keeps what finished when
it is interrupted, and runs bench_cpu.py's old benchmark as the cpu-backends preset."""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
IMPLS = ["reference", "hk_torch_chunked", "hk_triton", "hk_cuda", "reference_compiled"]


def _bench(name):
    """A bench/ module (bench/ on sys.path, as run.py puts it)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, str(RUN), "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "toy.json"
    proc = _run("--models", "toy", "--n", "64", "--prg-traces", "2", "--workloads", "ce", "rd_rlif", "prg",
                "--dtypes", "float32", "--impls", *IMPLS, "--inject-wrong", "--isolate", "impl", "--repeats", "2",
                "--warmup", "1", "--out", str(out))
    return json.loads(out.read_text()), proc.stdout, out


def test_report_fields(toy_run):
    report, _, out = toy_run
    for key in ("benchmark", "date", "command", "device", "device_name", "versions", "config", "ceiling",
                "implementations", "workloads", "timing", "memory", "correctness", "cases", "results"):
        assert key in report, key
    assert report["complete"] is True and not report.get("interrupted")
    assert report["progress"] == {"results": len(report["results"]), "of": len(report["results"])}
    for key in ("python", "torch", "triton", "hykernels"):
        assert report["versions"][key]
    assert "bench/run.py" in report["command"] and "--inject-wrong" in report["command"]
    assert report["device"]["kind"] == "cpu" and report["device"]["cpu_count"] >= 1
    assert report["ceiling"]["matmul"]["tflops"] > 0
    # ce, rd_rlif at N=64 and prg at 2 traces x (8+1) probes x 4 answer tokens = 72 rows
    assert [(c["workload"], c["N"], c["D"], c["V"]) for c in report["cases"]] == [
        ("ce", 64, 48, 509), ("rd_rlif", 64, 48, 509), ("prg", 72, 48, 509)]
    # the run order: hykernels paths first, then the references, compile last (whatever the order given)
    assert report["config"]["impls"] == ["hk_cuda", "hk_triton", "hk_torch_chunked", "reference",
                                         "reference_compiled", "wrong"]
    if report["plot"]:
        assert (out.parent / report["plot"]).stat().st_size > 0
    else:
        assert report["plot_skipped"]


def test_results_measured_and_checked(toy_run):
    report, _, _ = toy_run
    rows = {(r["impl"], r["workload"]): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == 3 * (len(IMPLS) + 1)
    for impl in ("reference", "hk_torch_chunked", "hk_triton"):
        for wl in ("ce", "rd_rlif", "prg"):
            r = rows[(impl, wl)]
            assert r["status"] == "ok", r
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["total_ms"] >= max(r["fwd_ms"], r["bwd_ms"])
            assert len(r["total_ms_all"]) == r["repeats"] == 2 and r["input_sets"] == 3
            assert r["useful_tflops"] > 0 and r["efficiency"] > 0
            assert isinstance(r["peak_extra_bytes"], int)
            assert r["peak_above_io_bytes"] == r["peak_extra_bytes"] - r["io_bytes"]
            assert r["correctness"]["ok"] is True, r["correctness"]
            assert r["correctness"]["max_rel_err"] < 1e-4
            assert set(r["correctness"]["errors"]) >= {"loss", "grad_hidden", "grad_weight"}
    assert "support" in rows[("reference", "prg")]["correctness"]["errors"]
    assert "logp" in rows[("hk_torch_chunked", "rd_rlif")]["correctness"]["errors"]
    # fused_loss forms the gradients in forward; the reference in backward
    assert rows[("hk_torch_chunked", "ce")]["grads_formed_in"] == "fwd"
    assert rows[("hk_triton", "rd_rlif")]["grads_formed_in"] == "fwd"
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
    assert all(cells[("wrong", wl)].startswith("**WRONG**") for wl in ("ce", "rd_rlif", "prg"))
    assert cells[("reference", "ce")] == "ok" and cells[("hk_triton", "prg")] == "ok"
    assert ("hk_cuda", "ce") not in cells  # skipped ones are listed above the table, not in it
    assert any(ln.startswith("skipped hk_cuda") for ln in lines)


def test_interrupted_run_keeps_finished_results(tmp_path):
    """Each result is in the JSON as soon as it finishes (what a kill -9 would leave); SIGTERM
    (what `timeout` sends) stops the worker and writes the table of what finished."""
    out = tmp_path / "cut.json"
    proc = subprocess.Popen(
        [sys.executable, str(RUN), "--device", "cpu", "--models", "toy", "--n", "64", "200", "--workloads", "ce",
         "token_stats", "--dtypes", "float32", "--impls", "hk_torch_chunked", "reference", "--isolate", "case",
         "--repeats", "1", "--warmup", "1", "--no-plot", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        deadline, snapshot = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                report = json.loads(out.read_text())  # rewritten atomically: always whole
                if any(r["status"] == "ok" for r in report["results"]):
                    snapshot = report
                    break
            time.sleep(0.05)
        assert snapshot is not None, "no finished result appeared in the JSON while the run was going"
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # what a kill -9 would have left: finished results, checked, the run marked incomplete
    assert snapshot["complete"] is False and snapshot["progress"]["of"] == 8
    ok = [r for r in snapshot["results"] if r["status"] == "ok"]
    assert ok[0]["impl"] == "hk_torch_chunked" and ok[0]["total_ms"] > 0 and ok[0]["correctness"]["ok"]
    # after SIGTERM: the worker is gone, the JSON and the table hold what finished
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    final = json.loads(out.read_text())
    assert final["complete"] is False and final["interrupted"].startswith("SIGTERM")
    assert len(final["results"]) >= len(snapshot["results"]) and final["progress"]["results"] < 8
    assert "INTERRUPTED" in stdout and stdout.strip().splitlines()[-1].startswith("| ")


def test_cpu_backends_preset(tmp_path):
    """bench_cpu.py's benchmark as a preset: the hykernels reference backend against torch_chunked
    (token_stats and the RD+RLIF fused_loss), with the time and memory ratios and their targets."""
    out = tmp_path / "cpu-backends.json"
    proc = _run("--preset", "cpu-backends", "--models", "16:301", "--n", "64", "--repeats", "1", "--no-plot",
                "--out", str(out))
    report = json.loads(out.read_text())
    cfg = report["config"]
    assert cfg["preset"] == "cpu-backends" and cfg["isolate"] == "case" and cfg["baseline"] == "hk_reference"
    assert cfg["targets"] == {"time_ratio_max": 1.5, "peak_memory_ratio_max": 0.25}
    rows = {(r["impl"], r["workload"]): r for r in report["results"]}
    assert set(rows) == {(i, w) for i in ("hk_torch_chunked", "hk_reference") for w in ("token_stats", "rd_rlif")}
    for r in rows.values():
        assert r["status"] == "ok" and r["correctness"]["ok"], r
        assert isinstance(r["peak_extra_bytes"], int) and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
    for wl in ("token_stats", "rd_rlif"):
        vs = rows[("hk_torch_chunked", wl)]["vs_baseline"]
        assert vs["impl"] == "hk_reference" and vs["time"] > 0
        assert isinstance(vs["time_target_met"], bool) and isinstance(vs["memory_target_met"], bool)
        assert "vs_baseline" not in rows[("hk_reference", wl)]
    assert isinstance(report["all_targets_met"], bool)
    assert "time ×hk_reference" in proc.stdout


def test_cpu_torch_preset(tmp_path):
    """Issue 21's comparison as a preset: torch_chunked's fused_loss and token_stats (+ backward) on
    the CE workload beside torch's chunked F.linear_cross_entropy, each paired with torch's path of
    the same design (mean: gradients in forward; none: recomputed), fp32 and bf16, its second
    model at its own N (n_by_model); every result checked against the fp32 gold."""
    out = tmp_path / "cpu-torch.json"
    proc = _run("--preset", "cpu-torch", "--models", "16:301", "24:1000", "--n", "64", "--repeats", "1",
                "--no-plot", "--out", str(out))
    report = json.loads(out.read_text())
    cfg = report["config"]
    assert cfg["baseline"] == "torch_lce" and cfg["pairs"]["hk_torch_chunked_stats"] == "torch_lce_none"
    assert {(c["model"], c["N"]) for c in report["cases"]} == {("16:301", 64), ("24:1000", 64)}
    rows = {(r["impl"], r["model"], r["dtype"]): r for r in report["results"]}
    impls = ("hk_torch_chunked", "hk_torch_chunked_stats", "torch_lce", "torch_lce_none")
    assert set(rows) == {(i, m, d) for i in impls for m in ("16:301", "24:1000") for d in ("float32", "bfloat16")}
    for r in rows.values():
        assert r["status"] == "ok" and r["correctness"]["ok"], r
    for m in ("16:301", "24:1000"):
        for d in ("float32", "bfloat16"):
            assert rows[("hk_torch_chunked_stats", m, d)]["vs_pair"]["impl"] == "torch_lce_none"
            assert rows[("hk_torch_chunked_stats", m, d)]["vs_baseline"]["impl"] == "torch_lce"
            assert rows[("hk_torch_chunked", m, d)]["vs_pair"]["impl"] == "torch_lce"
            assert "time_target_met" in rows[("hk_torch_chunked", m, d)]["vs_pair"]
            assert "time_target_met" not in rows[("hk_torch_chunked_stats", m, d)]["vs_baseline"]
            # a peer's ratio to the baseline is information: with pairs, only the pairs are judged
            assert "time_target_met" not in rows[("torch_lce_none", m, d)]["vs_baseline"]
    assert isinstance(report["all_targets_met"], bool)
    assert "time ×pair" in proc.stdout and "torch_lce_none" in proc.stdout
    # the n_by_model rule: the preset's own second model runs at its own N
    args = _bench("run").argparse.Namespace(workloads=["ce"], models=["1024:32768", "1024:128256"], n=[8192],
                                            n_by_model={"1024:128256": [4096]}, dtypes=["float32"], prg_steps=8,
                                            prg_answer_len=4, prg_traces=[1])
    assert [(c["V"], c["N"]) for c in _bench("run").build_cases(args)] == [(32768, 8192), (128256, 4096)]


def test_merge(toy_run, tmp_path):
    report, _, out = toy_run
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(RUN), "--merge", str(out), str(out), "--no-plot", "--out", str(merged)],
                   check=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    m = json.loads(merged.read_text())
    assert len(m["cases"]) == 2 * len(report["cases"]) and len(m["results"]) == 2 * len(report["results"])
    assert [c["id"] for c in m["cases"]] == list(range(len(m["cases"])))
    assert len(m["merged_from"]) == 2 and m["complete"] is True


def test_static_skips_and_compare():
    peers, measure = _bench("peers"), _bench("measure")

    class MissingPeer(peers.Impl):
        name = "missing"
        needs = ("hykernels_no_such_peer_module",)

    case = dict(workload="ce", model="toy", D=48, V=509, N=64, dtype="float32")
    assert "not installed" in MissingPeer().static_skip(case, "cpu")
    big = dict(case, D=576, V=49152, N=4096)
    assert "interpreter" in peers.IMPLS["hk_triton"].static_skip(big, "cpu")
    assert peers.IMPLS["hk_triton"].static_skip(big, "cuda") is None
    reason = peers.IMPLS["cce"].static_skip(dict(case, workload="token_stats"), "cuda")
    assert "no token_stats path" in reason or "not installed" in reason  # CCE has no entropy output
    # hykernels first, then the peers, then the references; reference_compiled is not in the lmhead preset
    assert list(peers.IMPLS)[:6] == ["hk_cuda", "hk_triton", "hk_torch_chunked", "hk_torch_chunked_stats",
                                     "liger_flce", "cce"]
    assert peers.in_run_order(["reference_compiled", "reference", "cce", "hk_cuda"]) == [
        "hk_cuda", "cce", "reference", "reference_compiled"]
    assert "reference_compiled" not in _bench("run").PRESETS["lmhead"]["impls"]

    ref = {"loss": torch.tensor(2.0, dtype=torch.float64), "valid": torch.tensor([True, False]),
           "logp": torch.tensor([-1.0, 0.0], dtype=torch.float64), "grad_hidden": torch.ones(2, 8, dtype=torch.float64),
           "grad_weight": None}
    same = dict(ref, logp=torch.tensor([-1.0, 5.0], dtype=torch.float64))  # rows without a target are not compared
    assert measure.compare(ref, same, "float32")["ok"]
    nan = dict(ref, grad_hidden=torch.full((2, 8), math.nan, dtype=torch.float64))
    res = measure.compare(ref, nan, "float32")
    assert not res["ok"] and res["worst_output"] == "grad_hidden"
    assert not measure.compare(ref, dict(ref, grad_weight=torch.ones(3, 8, dtype=torch.float64)), "float32")["ok"]


def test_gold_rd_rlif_matches_autograd():
    """The chunked gold of the RD+RLIF workload (value −s·A, gradient −s·A·∇logp for the RLIF
    term) against autograd through the reference's min/clip formula."""
    peers, measure = _bench("peers"), _bench("measure")
    case = dict(id=0, workload="rd_rlif", model="toy", D=12, V=37, N=20, dtype="float64")
    x = measure.make_inputs(case, 5, torch.device("cpu"))
    loss, extras, gh, gw = measure.gold(case, x)
    ref_loss, ref_extras = peers.loss_from_logits("rd_rlif", peers.logits(x["hidden"], x["weight"]), x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(extras["logp"], ref_extras["logp"].detach())
    torch.testing.assert_close(gh, x["hidden"].grad)
    torch.testing.assert_close(gw, x["weight"].grad)


def _bench_imports() -> dict:
    """bench module -> the bench modules it imports (anywhere in the file, lazily or not)."""
    import ast

    names = {p.stem for p in (ROOT / "bench").glob("*.py")}
    graph = {}
    for name in names:
        tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted(deps & names - {name})
    return graph


def test_bench_has_no_import_cycle():
    """bench/'s modules import each other as a DAG (a lazy import inside a function counts too):
    the presets live in presets.py so that roofline.py need not import run.py."""
    graph = _bench_imports()
    assert graph["roofline"] and "run" not in graph["roofline"]
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle in bench/: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph[node]:
            visit(dep, path + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])
    # the check finds a cycle when there is one
    graph["presets"] = graph["presets"] + ["run"]
    state.clear()
    with pytest.raises(AssertionError, match="import cycle"):
        for name in graph:
            visit(name, [])
