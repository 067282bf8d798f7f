"""bench/bench_probes.py (PRG probes: packed vs separate vs batched forwards) end to end on CPU, in
subprocesses at tiny sizes: FlexAttention's block mask on the packed path, the random-init
Qwen2.5-1.5B shape through `bench/gpu_check.sh probes` (one layer), the refusal of an O(T²) dense
mask at the realistic size, and a failing path that is recorded while the others still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_probes.py"
PATHS = ("packed", "separate", "batched")
FP32_TOL = 1e-3


def run_bench(tmp_path, *args, timeout=300):
    out = tmp_path / "probes.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def assert_three_paths_agree(report, attn):
    assert report["complete"] is True and report["dtype"] == "float32"
    for row in report["rows"]:
        paths = row["paths"]
        assert set(paths) == set(PATHS)
        for name in PATHS:
            p = paths[name]
            assert p["status"] == "ok", (name, p.get("error"), p.get("traceback"))
            assert p["median_s"] > 0 and p["first_call_s"] > 0 and len(p["times_s"]) == report["_repeats"]
            assert isinstance(p["peak_bytes"], int) and p["tokens"] > 0
            assert p["supports"] == row["traces"] * (row["K"] + 1)
        assert paths["packed"]["attn"] == attn and paths["separate"]["attn"] == paths["batched"]["attn"] == "sdpa"
        assert paths["packed"]["tokens"] == row["packed_tokens"] < paths["separate"]["tokens"] == row["separate_tokens"]
        assert paths["batched"]["tokens_with_padding"] >= paths["batched"]["tokens"] == row["separate_tokens"]
        for name in ("packed", "batched"):
            assert paths[name]["support_diff_vs"] == "separate"
            assert paths[name]["max_abs_support_diff"] < FP32_TOL, name
        assert row["speedup_vs_separate"] > 0 and row["speedup_vs_batched"] > 0


def flex_unsupported_on_cpu():
    """Why torch cannot run a compiled FlexAttention call on CPU here, or None if it can."""
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q = torch.randn(1, 1, 16, 8)
        mask = create_block_mask(lambda b, h, i, j: i >= j, 1, None, 16, 16, device="cpu")
        torch.compile(flex_attention)(q, q, q, block_mask=mask)
    except Exception as exc:  # noqa: BLE001 - the reason to skip
        return f"{type(exc).__name__}: {exc}"
    return None


def test_flex_block_mask_path_matches_separate_forwards(tmp_path):
    """--attn flex: the packed path runs FlexAttention with batch.block_mask() (no dense mask on the
    device); its supports equal the separate and batched forwards' to fp32 rounding."""
    proc, report = run_bench(tmp_path, "--tiny", "--reasoning-tokens", "60", "--steps", "4", "--traces", "2",
                             "--repeats", "1", "--device", "cpu", "--attn", "flex")
    assert report is not None, proc.stdout + proc.stderr
    packed = report["rows"][0]["paths"]["packed"]
    if packed["status"] != "ok":
        reason = flex_unsupported_on_cpu()
        if reason is not None:
            pytest.skip(f"torch cannot run FlexAttention on CPU here: {reason}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    report["_repeats"] = 1
    assert_three_paths_agree(report, "flex_attention")
    row = report["rows"][0]
    assert row["step_tokens"] == [15] * 4 and row["packed_width"] == 48 + 60 + 5 * (3 + 4)
    assert row["dense_mask_on_device"] is False and row["block_mask_s"] > 0
    assert report["attn"] == {"packed": "flex_attention", "baseline": "sdpa"}
    assert report["device"]["kind"] == "cpu" and report["versions"]["transformers"]
    assert "--attn flex" in report["command"] and "wall clock" in report["timing"]
    assert "| packed (flex_attention) | ok |" in proc.stdout


def test_gpu_check_probes_stage_on_cpu(tmp_path):
    """The stage the GPU run uses (Qwen2.5-1.5B shape, 4,000 reasoning tokens, K = 16), shrunk on CPU
    by PROBES_ARGS (later flags win) to one layer, 40 tokens, K = 2 and the dense mask: both JSON files
    (the main run and the fp32 one), every log, the full-size vocabulary and width of the model."""
    out = tmp_path / "out"
    env = dict(os.environ, HK_SKIP_INSTALL="1", HK_GPU_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable,
               PROBES_ARGS="--device cpu --layers 1 --reasoning-tokens 40 --steps 2 --traces 1 --repeats 1 --attn sdpa")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "probes", str(out)], capture_output=True,
                          text=True, timeout=400, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for name in ("gpu_check-probes.log", "device.txt", "probes.log", "probes-fp32.log"):
        assert (out / name).stat().st_size > 0, name
    log = (out / "gpu_check-probes.log").read_text()
    assert "=== probes: exit 0" in log and "=== probes-fp32: exit 0" in log and "| packed (sdpa) | ok |" in log
    for name in ("probes-gpu.json", "probes-gpu-fp32.json"):
        report = json.loads((out / name).read_text())
        report["_repeats"] = 1
        assert_three_paths_agree(report, "sdpa")
        assert report["model_config"] == {
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True}
        assert "--model-shape qwen2.5-1.5b --reasoning-tokens 4000 --steps 16 --attn flex" in report["command"]
        assert report["rows"][0]["step_tokens"] == [20, 20] and report["rows"][0]["dense_mask_on_device"] is True


def test_dense_mask_refused_at_the_realistic_size(tmp_path):
    """4,000 reasoning tokens, K = 16: the dense [B, 1, T, T] mask is refused before any model is built."""
    proc, report = run_bench(tmp_path, "--tiny", "--reasoning-tokens", "4000", "--steps", "16", "--device", "cpu",
                             "--attn", "sdpa", timeout=120)
    assert proc.returncode == 2 and report is None
    assert "4167 tokens, above --dense-max-tokens 2048" in proc.stderr and "--attn flex" in proc.stderr
    assert "O(T²)" in proc.stderr


def test_a_failing_path_is_recorded_and_the_others_run(tmp_path):
    """A path that raises is recorded with its error (exit status 1); the rest run, for every K, and the
    packed supports are then compared with the batched ones."""
    proc, report = run_bench(tmp_path, "--tiny", "--steps", "2", "3", "--traces", "2", "--repeats", "2",
                             "--device", "cpu", "--inject-failure", "separate")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    assert report["complete"] is True and [r["K"] for r in report["rows"]] == [2, 3]
    for row in report["rows"]:
        sep, packed, batched = (row["paths"][n] for n in ("separate", "packed", "batched"))
        assert sep["status"] == "failed" and "--inject-failure separate" in sep["error"]
        assert packed["status"] == batched["status"] == "ok" and len(packed["times_s"]) == 2
        assert packed["support_diff_vs"] == "batched" and packed["max_abs_support_diff"] < FP32_TOL
        assert row["step_tokens"] == [24] * row["K"] and row["speedup_vs_separate"] is None
        assert row["packed_tokens"] < row["separate_tokens"]
