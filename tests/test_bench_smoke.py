"""bench/gpu_check.sh and bench/smoke.py on CPU: the script parses, its smoke stage runs end to end
at a tiny shape (Triton in the interpreter, no installs) with every log and the JSON in OUT_DIR, and
the Triton register/spill report reads a compiled kernel's cache."""
import collections
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _smoke_module():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("smoke")


def test_gpu_check_parses_and_refuses_unknown_stages():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_smoke_stage_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HK_SKIP_INSTALL="1", HK_GPU_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable,
               SMOKE_ARGS="--n 64 --d 32 --v 301 --dtype float32 --repeats 2", TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(SCRIPT), "smoke", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in ("gpu_check-smoke.log", "device.txt", "build.log", "smoke.log", "smoke.json"):
        assert (out / name).stat().st_size > 0, name
    log = (out / "gpu_check-smoke.log").read_text()
    assert "=== smoke: exit 0" in log and "| backend | op |" in log  # everything printed is in the log
    assert "torch" in (out / "device.txt").read_text()
    assert (tmp_path / "cache" / "triton").is_dir() and (tmp_path / "cache" / "torch_extensions").is_dir()

    report = json.loads((out / "smoke.json").read_text())
    assert report["complete"] is True and report["shape"] == {"N": 64, "D": 32, "V": 301}
    assert report["env"]["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert report["matmul"]["tflops"] > 0 and report["matmul"]["size"] == 256
    assert all(r["status"] == "ok" for r in report["reference"].values())
    rows = {(r["backend"], r.get("op")): r for r in report["results"]}
    assert rows[("cuda", None)]["status"] == "unavailable" and "cuda" in rows[("cuda", None)]["reason"].lower()
    for backend in ("triton", "torch_chunked"):
        for op in ("fused_loss", "token_stats"):
            r = rows[(backend, op)]
            assert r["status"] == "ok", r
            assert r["correct"] is True and r["max_rel_err"] < 1e-4, r["rel_err"]
            assert set(r["rel_err"]) >= {"loss", "logp", "grad_hidden", "grad_weight"}
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["first_call_ms"] > 0 and r["repeats"] == 2
            assert r["useful_tflops"] > 0 and r["efficiency"] > 0 and isinstance(r["peak_above_io_bytes"], int)
    assert "entropy" in rows[("triton", "token_stats")]["rel_err"]
    kernels = report["triton_kernels"]["kernels"]
    # every kernel of the backend's modules, by enumeration (shared _helpers skipped)
    assert set(kernels) == {"logits_fwd", "logits_grad", "grad_inplace", "dh_gemm", "dw_gemm"}
    assert report["triton_kernels"]["interpreter"] and "interpreter" in kernels["logits_fwd"]["note"]


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
