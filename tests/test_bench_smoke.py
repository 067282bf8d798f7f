"""bench/gpu_check.sh and bench/smoke.py on CPU: the script parses; its `first` stage (the one device
call: gpu tests, then smoke over every backend and peer) runs end to end at a tiny shape with exactly
its 8 files, keeps them when killed in mid-run (a test step killed by its limit included), and its
worst case stays inside the 540 s budget; the `smoke` stage runs; smoke.py's per-item caps and
watchdog (an item that hangs is ended, a fresh process resumes the rest); the Triton register/spill
report reads a compiled kernel's cache."""
import collections
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
TINY = "--n 64 --d 32 --v 301 --dtype float32 --repeats 2"
GPU_MARKER_RE = r"mark\.gpu\b"  # the test files gpu_check.sh runs with -m gpu: those that use the marker
FIRST_FILES = {"gpu_check-first.log", "device.txt", "steps.json", "build.log", "pytest-gpu.log", "pytest-gpu.jsonl",
               "smoke.log", "smoke.json"}


def _smoke_module():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("smoke")


def test_gpu_check_parses_and_refuses_unknown_stages():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _env(tmp_path, **extra):
    return dict(os.environ, HK_SKIP_INSTALL="1", HK_GPU_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable,
                HK_WHL_DIR=str(tmp_path / "no-wheels"), TRITON_INTERPRET="1", **extra)


def _rows(report):
    return {(r["impl"], r["op"]): r for r in report["results"]}


def test_first_stage_on_cpu(tmp_path):
    """The device call's stage end to end at a tiny shape: exactly its 8 files, every step in
    steps.json, a JSON line per gpu test, and smoke over every backend and every peer."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "first", str(out)], capture_output=True, text=True, timeout=400,
                          cwd=tmp_path, env=_env(tmp_path, SMOKE_ARGS=TINY))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {f.name for f in out.iterdir()} == FIRST_FILES  # at most 8 come back from the device machine
    for name in FIRST_FILES:
        assert (out / name).stat().st_size > 0, name
    log = (out / "gpu_check-first.log").read_text()
    assert "=== smoke: exit 0" in log and "| impl | op |" in log and "| step | status |" in log
    assert "torch" in (out / "device.txt").read_text()

    steps = json.loads((out / "steps.json").read_text())
    assert steps["budget_s"] == 540 and not steps["dry_run"]
    assert [s["step"] for s in steps["plan"]] == ["install", "cute", "device", "build", "pytest-gpu", "smoke"]
    status = {s["step"]: s["status"] for s in steps["steps"]}
    assert status == {"install": "skipped", "cute": "skipped", "device": "ok", "build": "ok", "pytest-gpu": "ok",
                      "smoke": "ok"}
    assert all(s["limit_s"] is None or s["start_s"] + s["limit_s"] <= 540 for s in steps["steps"])

    lines = [json.loads(line) for line in (out / "pytest-gpu.jsonl").read_text().splitlines()]
    results = {r["nodeid"]: r["outcome"] for r in lines if r["event"] != "start"}
    assert results and set(results.values()) == {"skipped"}  # the gpu-marked tests, no GPU here
    assert len(results) == sum(r["event"] == "start" for r in lines)
    uses_marker = re.compile(GPU_MARKER_RE)
    marked = {f"tests/{f.name}" for f in (ROOT / "tests").glob("test_*.py") if uses_marker.search(f.read_text())}
    assert {nodeid.split("::")[0] for nodeid in results} == marked
    assert "SKIPPED" in (out / "pytest-gpu.log").read_text()

    report = json.loads((out / "smoke.json").read_text())
    assert report["complete"] is True and report["shape"] == {"N": 64, "D": 32, "V": 301}
    assert report["env"]["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert report["matmul"]["tflops"] > 0 and report["matmul"]["size"] == 256
    assert report["current"] is None and len(report["attempts"]) == 1
    assert all(r["status"] == "ok" for r in report["reference"].values())
    rows = _rows(report)
    assert [r["key"] for r in report["results"]] == [k for k in report["items"]
                                                     if not k.startswith("reference-fp32/") and k != "triton_kernels"]
    for op in ("fused_loss", "token_stats"):
        assert rows[("hk_cuda", op)]["status"] == "unavailable" and "cuda" in rows[("hk_cuda", op)]["reason"].lower()
        for backend in ("triton", "torch_chunked"):
            r = rows[(f"hk_{backend}", op)]
            assert r["status"] == "ok", r
            assert r["correct"] is True and r["max_rel_err"] < 1e-4, r["rel_err"]
            assert set(r["rel_err"]) >= {"loss", "logp", "grad_hidden", "grad_weight"}
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["first_call_ms"] > 0 and r["repeats"] == 2
            assert r["useful_tflops"] > 0 and r["efficiency"] > 0 and isinstance(r["peak_above_io_bytes"], int)
            assert r["workload"] == {"fused_loss": "ce", "token_stats": "token_stats"}[op] and r["cap_s"] > 0
    assert "entropy" in rows[("hk_triton", "token_stats")]["rel_err"]
    # the peers: torch's chunked F.linear_cross_entropy (torch 2.13 here) and the materialised reference run;
    # Liger and CCE run where installed, else are skipped with the reason
    for key in (("torch_lce", "ce"), ("torch_lce_none", "ce"), ("reference", "ce"), ("reference", "token_stats")):
        r = rows[key]
        assert r["status"] == "ok" and r["correct"] is True and r["max_rel_err"] < 1e-4, r
        assert r["kind"] == "peer" and r["peak_above_io_bytes"] is not None and r["efficiency"] > 0
    assert rows[("torch_lce", "ce")]["rel_err"]["logp"] is None  # a peer's CE gives no per-token output
    assert "entropy" in rows[("reference", "token_stats")]["rel_err"]
    for key in (("liger_flce", "ce"), ("cce", "ce"), ("liger_nll_entropy", "token_stats"), ("liger_flce_triton", "ce")):
        assert rows[key]["status"] in ("ok", "skipped"), rows[key]
        if rows[key]["status"] == "skipped":
            assert rows[key]["reason"]
    kernels = report["triton_kernels"]["kernels"]
    # every kernel of the backend's modules, by enumeration (shared _helpers skipped)
    assert set(kernels) == {"logits_fwd", "logits_grad", "grad_inplace", "dh_gemm", "dw_gemm"}
    assert report["triton_kernels"]["interpreter"] and "interpreter" in kernels["logits_fwd"]["note"]


SLOW_TESTS = '''
import time


def test_fast():
    pass


def test_slow():
    time.sleep(300)
'''


def test_first_killed_mid_run_keeps_its_files(tmp_path):
    """A test step ended by its limit keeps a line per finished test (and the one that was running);
    `first` killed in mid-smoke keeps its files: the steps done, the step running, the smoke items
    done and the one running, which a resumed smoke.py then writes as killed."""
    tests = tmp_path / "slow" / "test_slow.py"
    tests.parent.mkdir()
    tests.write_text(SLOW_TESTS)
    out = tmp_path / "out"
    smoke_args = "--n 64 --d 32 --v 301 --dtype float32 --repeats 2 --backends torch_chunked --peers reference"
    env = _env(tmp_path, HK_PYTEST_GPU_ARGS=str(tests), HK_MAX_PYTEST_GPU="20",
               SMOKE_ARGS=smoke_args + " --test-hang reference/token_stats")
    proc = subprocess.Popen(["bash", str(SCRIPT), "first", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        t0, report = time.time(), {}
        while time.time() - t0 < 300 and proc.poll() is None:
            time.sleep(0.5)
            try:
                report = json.loads((out / "smoke.json").read_text())
            except (OSError, ValueError):
                continue
            if (report.get("current") or {}).get("key") == "reference/token_stats":
                break
        assert (report.get("current") or {}).get("key") == "reference/token_stats", proc.poll()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert {f.name for f in out.iterdir()} == FIRST_FILES

    steps = json.loads((out / "steps.json").read_text())["steps"]
    by_name = {s["step"]: s for s in steps}
    assert by_name["device"]["status"] == "ok" and by_name["build"]["status"] == "ok"
    assert by_name["pytest-gpu"]["status"] in ("timeout", "failed") and by_name["pytest-gpu"]["limit_s"] == 15
    assert steps[-1]["step"] == "smoke" and steps[-1]["status"] == "running"

    lines = [json.loads(line) for line in (out / "pytest-gpu.jsonl").read_text().splitlines()]
    fast = [r for r in lines if r["nodeid"].endswith("test_fast")]
    slow = [r for r in lines if r["nodeid"].endswith("test_slow")]
    assert [r.get("outcome") for r in fast] == [None, "passed"]  # its start, then its result
    assert slow[0]["event"] == "start"  # the test that was running when the limit hit
    assert "test_fast PASSED" in (out / "pytest-gpu.log").read_text()

    report = json.loads((out / "smoke.json").read_text())
    assert report["complete"] is False and report["current"]["key"] == "reference/token_stats"
    assert [(r["key"], r["status"]) for r in report["results"]] == [
        ("hk_torch_chunked/fused_loss", "ok"), ("hk_torch_chunked/token_stats", "ok"), ("reference/ce", "ok")]
    assert "reference/ce" in (out / "smoke.log").read_text()

    # what the next smoke attempt does with it
    rerun = subprocess.run([sys.executable, str(ROOT / "bench" / "smoke.py"), *smoke_args.split(), "--resume",
                            "--previous-exit", "143", "--out", str(out / "smoke.json")], capture_output=True,
                           text=True, timeout=300, env=_env(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((out / "smoke.json").read_text())
    assert report["complete"] is True and len(report["attempts"]) == 2
    last = report["results"][-1]
    assert last["key"] == "reference/token_stats" and last["status"] == "killed" and "exit 143" in last["reason"]


@pytest.mark.parametrize("budget", [540, 300, 2000])
def test_first_worst_case_stays_inside_its_budget(tmp_path, budget):
    """The dry run: every step runs to its limit and the kill grace after it (wheels and the
    CuTe archive counted as present), on a simulated clock; all of it ends by the budget less the
    reserve for the summary, and smoke keeps its floor of 150 s."""
    out = tmp_path / "out"
    env = _env(tmp_path, HK_DRY_RUN="1", HK_BUDGET_S=str(budget))
    del env["HK_SKIP_INSTALL"]
    proc = subprocess.run(["bash", str(SCRIPT), "first", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 124, proc.stdout[-3000:]  # every step "timed out"
    steps = json.loads((out / "steps.json").read_text())
    assert steps["dry_run"] and steps["budget_s"] == budget
    ran = [s for s in steps["steps"] if s["status"] != "skipped"]
    assert [s["step"] for s in ran][:6] == ["install", "cute", "device", "build", "pytest-gpu", "smoke"]
    for s in ran:
        assert s["wall_s"] == s["limit_s"] + steps["grace_s"]
    end = max(s["start_s"] + s["wall_s"] for s in ran)
    assert end == steps["elapsed_s"] <= budget - steps["reserve_s"]
    if budget == 540:
        assert {f.name for f in out.iterdir()} <= FIRST_FILES
        assert sum(s["wall_s"] for s in ran if s["step"] == "smoke") >= 150
    if budget == 2000:  # nothing squeezed: every step gets its maximum
        plan = {p["step"]: p["max_s"] for p in steps["plan"]}
        assert all(s["limit_s"] == plan[s["step"]] - steps["grace_s"] for s in ran if not s["step"].startswith("smoke"))


def test_item_caps_add_up_within_the_deadline():
    """smoke.py's caps: whatever each item takes up to its cap, the items end by the deadline, and
    one that hangs (takes its whole cap) leaves every later item at least its floor when there is room."""
    smoke = _smoke_module()
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 16)
        maxes = [rng.choice([30, 60, 90, 120, 150]) for _ in range(n)]
        budget = rng.uniform(0, 600)
        t = 0.0
        for i, m in enumerate(maxes):
            cap = smoke.item_cap(budget - t, m, smoke.ITEM_FLOOR_S * (n - i - 1), n - i)
            if cap is None:
                assert budget - t < smoke.MIN_ITEM_S * (n - i)  # not even MIN_ITEM_S each
                continue
            assert smoke.MIN_ITEM_S <= cap <= min(m, budget - t)
            t += rng.choice([cap, cap * rng.random()])  # it hangs to its cap, or ends early
        assert t <= budget + 1e-9
    # room for everyone: a hang in the first item leaves each later one its floor
    cap = smoke.item_cap(300, 150, smoke.ITEM_FLOOR_S * 11, 12)
    assert cap == 150 and 300 - cap >= smoke.ITEM_FLOOR_S * 11
    # no room: an equal share, so a hang cannot take it all
    assert smoke.item_cap(60, 150, smoke.ITEM_FLOOR_S * 11, 12) == 5


def test_smoke_watchdog_ends_a_hanging_item_and_resume_goes_on(tmp_path):
    out = tmp_path / "smoke.json"
    args = [sys.executable, str(ROOT / "bench" / "smoke.py"), *TINY.split(), "--backends", "torch_chunked",
            "--peers", "reference", "--item-max-s", "8", "--out", str(out), "--deadline", str(time.time() + 240)]
    first = subprocess.run(args + ["--test-hang", "hk_torch_chunked/fused_loss"], capture_output=True, text=True,
                           timeout=200, env=_env(tmp_path))
    smoke = _smoke_module()
    assert first.returncode == smoke.EXIT_ITEM_TIMEOUT, first.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["current"] is None
    assert [(r["key"], r["status"]) for r in report["results"]] == [("hk_torch_chunked/fused_loss", "timeout")]
    assert report["results"][0]["cap_s"] == 8

    second = subprocess.run(args + ["--resume", "--previous-exit", str(smoke.EXIT_ITEM_TIMEOUT)], capture_output=True,
                            text=True, timeout=200, env=_env(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    report2 = json.loads(out.read_text())
    assert report2["complete"] is True and report2["seed"] == report["seed"] and report2["matmul"] == report["matmul"]
    assert [(r["key"], r["status"]) for r in report2["results"]] == [
        ("hk_torch_chunked/fused_loss", "timeout"), ("hk_torch_chunked/token_stats", "ok"), ("reference/ce", "ok"),
        ("reference/token_stats", "ok")]
    assert report2["results"][2]["correct"] is True  # the references were computed again on the same inputs
    assert [a["resumed"] for a in report2["attempts"]] == [False, True]


def test_smoke_stage_on_cpu_resumes_after_an_item_times_out(tmp_path):
    """The `smoke` stage; an item that hangs is ended by smoke.py's watchdog at its cap and the stage
    starts a fresh smoke.py that resumes with the items after it."""
    out = tmp_path / "out"
    env = _env(tmp_path, SMOKE_ARGS=TINY + " --backends torch_chunked --peers reference --item-max-s 8 "
               "--test-hang hk_torch_chunked/fused_loss")
    proc = subprocess.run(["bash", str(SCRIPT), "smoke", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in ("gpu_check-smoke.log", "device.txt", "steps.json", "build.log", "smoke.log", "smoke.json"):
        assert (out / name).stat().st_size > 0, name
    log = (out / "gpu_check-smoke.log").read_text()
    assert "=== smoke: exit 75 (item_timeout)" in log and "=== smoke#2: exit 0" in log
    assert (tmp_path / "cache" / "triton").is_dir() and (tmp_path / "cache" / "torch_extensions").is_dir()
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps][-2:] == [("smoke", "item_timeout"), ("smoke#2", "ok")]
    report = json.loads((out / "smoke.json").read_text())
    assert report["complete"] is True and len(report["attempts"]) == 2
    assert {(r["impl"], r["op"]): r["status"] for r in report["results"]} == {
        ("hk_torch_chunked", "fused_loss"): "timeout", ("hk_torch_chunked", "token_stats"): "ok",
        ("reference", "ce"): "ok", ("reference", "token_stats"): "ok"}


def test_triton_kernel_stats_reads_the_jit_cache(monkeypatch):
    """What a GPU run reports: each compiled variant's registers and spills, from the JIT cache
    (triton 3.x: device_caches[device][0] = {key: CompiledKernel}); handles not yet loaded are."""
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    smoke = _smoke_module()
    Meta = collections.namedtuple("Meta", "name num_warps num_stages shared")

    class Kernel:  # the fields of triton.compiler.CompiledKernel that are read
        def __init__(self, regs, loaded):
            self.metadata = Meta("k", 8, 3, 49152)
            self.src = types.SimpleNamespace(constants={(5,): 128})
            self._regs = regs
            if loaded:
                self.n_regs, self.n_spills = regs, 0

        def _init_handles(self):
            self.n_regs, self.n_spills = self._regs, 4

    def kernel(X, BLOCK):  # noqa: N803 - the Triton style
        pass

    def helper(x):
        return x

    mod = types.ModuleType("hk_fake_kernels")
    mod.kernel = JITFunction(kernel)
    mod.helper = JITFunction(helper)
    mod.not_a_kernel = triton  # ignored
    mod.kernel.device_caches = {0: ({"a": Kernel(96, True), "b": Kernel(128, False)}, {}, None, None, None)}
    mod.helper.device_caches = {}
    monkeypatch.setitem(sys.modules, "hk_fake_kernels", mod)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    got = smoke.triton_kernel_stats("hk_fake_kernels")
    assert set(got["kernels"]) == {"kernel", "helper"} and not got["interpreter"]
    variants = got["kernels"]["kernel"]["variants"]
    assert [(v["n_regs"], v["n_spills"]) for v in variants] == [(96, 0), (128, 4)]
    assert variants[0]["num_warps"] == 8 and variants[0]["num_stages"] == 3 and variants[0]["shared"] == 49152
    assert variants[0]["constants"] == {"5": 128}
    assert got["kernels"]["helper"]["variants"] == [] and "not launched" in got["kernels"]["helper"]["note"]
    assert "| kernel | 96 | 0 | 8 | 3 | 49152 |" in smoke.table({
        "device_name": "x", "shape": {"N": 1, "D": 1, "V": 1}, "dtype": "bfloat16", "repeats": 1, "matmul": None,
        "results": [], "triton_kernels": got})
