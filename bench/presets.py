"""The benchmark shapes and presets: model lm_head shapes and each preset's defaults.

One module that bench/run.py, bench/roofline.py and bench/smoke.py read, so that no bench module
imports another's command line (bench/ has no import cycle: tests/test_bench_run.py checks).
"""
from __future__ import annotations

import argparse
import re

from peers import DEFAULT_IMPLS, WORKLOADS

# name -> (hidden size D, vocabulary V) of the model's lm_head
MODELS = {
    "smollm2-135m": (576, 49152),
    "qwen2.5-1.5b": (1536, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
    "toy": (48, 509),  # ragged: neither is a multiple of any block size
}
GPU_IMPLS = [n for n in DEFAULT_IMPLS if n != "reference_compiled"]

PRESETS = {
    "gpu": dict(models=["smollm2-135m", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b"], n=[4096, 16384, 65536],
                dtypes=["bfloat16"], workloads=["ce", "token_stats", "prg"], prg_traces=[64, 512], repeats=10,
                warmup=3),
    "cpu": dict(models=["smollm2-135m"], n=[256, 1024, 4096], dtypes=["float32"],
                workloads=["ce", "token_stats", "prg"], prg_traces=[16, 64], repeats=3, warmup=1),
    # issue 7's matrix: a Qwen-size and a Llama-3 lm_head at D=4096, bf16; every path but
    # reference_compiled (minutes of compiling: name it in --impls to add it, it then runs last)
    "lmhead": dict(models=["4096:151936", "llama-3-8b"], n=[8192, 16384], dtypes=["bfloat16"],
                   workloads=["ce", "token_stats"], prg_traces=[64], repeats=10, warmup=3, impls=GPU_IMPLS),
    # what bench_cpu.py measured: the hykernels reference backend (whole logits) against
    # torch_chunked, with its targets: time ≤ 1.5x, peak memory ≤ 0.25x the reference's
    "cpu-backends": dict(device="cpu", models=["1024:32768"], n=[8192], dtypes=["float32"],
                         workloads=["token_stats", "rd_rlif"], prg_traces=[16], repeats=3, warmup=1,
                         impls=["hk_reference", "hk_torch_chunked"], baseline="hk_reference",
                         targets={"time_ratio_max": 1.5, "peak_memory_ratio_max": 0.25}),
    # issue 21: hykernels' torch_chunked against torch's own chunked F.linear_cross_entropy on the CE
    # workload, fused_loss beside reduction="mean" (gradients formed in forward, 6·N·D·V) and
    # token_stats + backward beside reduction="none" (recomputed, 8·N·D·V); a 32k vocabulary at
    # N=8192 and a Llama-3 vocabulary at N=4096 (n_by_model), fp32 and bf16
    "cpu-torch": dict(device="cpu", models=["1024:32768", "1024:128256"], n=[8192],
                      n_by_model={"1024:128256": [4096]}, dtypes=["float32", "bfloat16"], workloads=["ce"],
                      prg_traces=[16], repeats=3, warmup=1,
                      impls=["hk_torch_chunked", "hk_torch_chunked_stats", "torch_lce", "torch_lce_none"],
                      baseline="torch_lce",
                      pairs={"hk_torch_chunked": "torch_lce", "hk_torch_chunked_stats": "torch_lce_none"},
                      targets={"time_ratio_max": 1.0, "peak_memory_ratio_max": 1.0}),
    "toy": dict(models=["toy"], n=[64, 200], dtypes=["float32"], workloads=list(WORKLOADS), prg_traces=[2],
                repeats=3, warmup=1, isolate="impl"),
}


def shape_of(model: str) -> tuple[int, int]:
    """A MODELS name, or 'D:V' for a custom shape."""
    if model in MODELS:
        return MODELS[model]
    m = re.fullmatch(r"(\d+):(\d+)", model)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}: one of {sorted(MODELS)} or D:V")
    return int(m.group(1)), int(m.group(2))
