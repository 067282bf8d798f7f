"""bench/bench_trainer.py --quick end to end in a subprocess: the JSON's fields (not its timings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_trainer.py"


def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "trainer.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["quick"] is True and "--quick" in report["command"]
    assert report["device"]["kind"] == "cpu" and report["device"]["torch_num_threads"] >= 1
    assert {"torch", "transformers", "trl", "hykernels", "python"} <= set(report["versions"])

    steps = report["steps"]
    assert steps["status"] == "ok" and steps["settings"]["sequences_per_step"] == 8
    for side in ("loop", "trainer"):
        assert steps[side]["n"] == steps["settings"]["timed_steps"] * steps["settings"]["rounds"]
        stats = steps[side]
        assert stats["steps_per_s"] > 0 and stats["min_s"] <= stats["median_s"] <= stats["max_s"]
        for r in steps["rounds"]:
            run = r[side]
            assert len(run["step_s"]) == steps["settings"]["timed_steps"] == len(run["completion_tokens_mean"])
            assert len(run["warmup_s"]) == steps["settings"]["warmup_steps"]
            assert all(0 < n <= steps["settings"]["max_completion_tokens"] for n in run["completion_tokens_mean"])
    assert steps["ratio_trainer_over_loop_steps_per_s"] > 0

    memory = report["memory"]
    assert memory["status"] == "ok" and set(memory["paths"]) == {"hytuning", "trl", "trl_materialised_logits"}
    shapes = memory["shapes"]
    for name, path in memory["paths"].items():
        assert len(path["repeats"]) == 1 and path["peak_bytes"] >= path["largest_allocation_bytes"] > 0, name
    # with rollouts only (λ = 0) HyTuningTrainer's loss and gradients are TRL's
    for name, diff in memory["agreement_with_trl"].items():
        assert diff["loss_abs_diff"] < 1e-4 and diff["dW_max_abs_diff"] <= 1e-3 * max(diff["dW_max_abs"], 1e-6), name
    # the reference path forms the [B, C, V] logits
    assert memory["paths"]["trl_materialised_logits"]["largest_allocation_bytes"] >= shapes["logits_bytes_fp32_B_C_V"]
    assert set(memory["ratios_over_hytuning"]) == {"trl", "trl_materialised_logits"}
