"""The README's main job and the examples/ recipes run as they are."""
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_agrees(tmp_path):
    """The README's main job, short: a brief warm-up and 2 steps in part 1, the tiny model in part 2
    (the full demo with SmolLM2 takes minutes: run by hand)."""
    r = subprocess.run([sys.executable, "-m", "hykernels", "demo", "--tiny", "--steps", "2", "--warmup-steps", "20",
                        "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("| step | HyTuning loss |", "| + 2 HyTuning steps |", "| + 2 RLIF-only steps |", "why: RLIF alone",
                 "| trace | steps | PRG |", "-> OK"):
        assert line in r.stdout
    assert (tmp_path / "hykernels-demo-reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing but its own lines: torch's profiler (part 2's buffer sizes) writes "USDT:...
    # profiler_start" from C++ unless the demo silences it
    assert "profiler_start" not in r.stdout + r.stderr and "USDT" not in r.stdout + r.stderr


def test_demo_explanation_follows_its_numbers():
    from hykernels.apps.demo import explain

    def m(acc, ece, answered=1.0):
        return dict(accuracy=acc, ece=ece, answered=answered)

    # the run: HyTuning ended below its start on both
    text = explain(m(0.515, 0.201), m(0.500, 0.252), m(0.400, 0.300, 0.9), lam=0.5, steps=40)
    assert "accuracy 0.515 -> 0.500 (worse), ECE 0.201 -> 0.252 (worse)" in text
    assert "HyTuning ended worse than its start on accuracy and ECE in this run." in text
    assert "Against RLIF alone, HyTuning ended 0.100 higher in accuracy." in text
    assert "answered 1.000 -> 0.900 (worse)" in text
    text = explain(m(0.5, 0.2), m(0.6, 0.1), m(0.7, 0.1), lam=0.5, steps=40)
    assert "accuracy 0.500 -> 0.600 (better), ECE 0.200 -> 0.100 (better)" in text
    assert "worse than its start" not in text and "0.100 lower in accuracy" in text
    text = explain(m(0.5, None, 0.0), m(0.5, 0.2), m(0.5, None, 0.0), lam=0.5, steps=40)
    assert "ECE n/a -> 0.200" in text and "accuracy 0.500 -> 0.500 (unchanged)" in text and "level" in text


def test_info_lists_backends():
    r = subprocess.run([sys.executable, "-m", "hykernels", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "torch_chunked  available" in r.stdout


def test_plain_pytorch_loop_learns():
    main = runpy.run_path(str(ROOT / "examples" / "plain_pytorch_loop.py"))["main"]
    losses = main(["--steps", "25"])
    assert losses[-1] < 0.7 * losses[0]


def _recipe(name, monkeypatch):
    """A examples/ recipe's globals, its sibling recipe_common importable as when it runs as a script."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"))


def _logged_losses(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(x) for x in losses)
    return losses


def test_transformers_trainer_equals_model_loss_and_learns(monkeypatch, tmp_path):
    r = _recipe("transformers_trainer", monkeypatch)
    trainer = r["make_trainer"](r["parse_args"](["--steps", "2"]), str(tmp_path))
    model, batch = trainer.model, r["collate"](trainer.train_dataset)
    want = model(**batch).loss  # transformers' own cross-entropy, from the logits
    n = (batch["labels"][:, 1:] != -100).sum()  # what the Trainer passes as num_items_in_batch
    for got in (trainer.compute_loss(model, batch), trainer.compute_loss(model, batch, num_items_in_batch=n)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    losses = _logged_losses(trainer)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_transformers_trainer_bf16_follows_autocast(monkeypatch, tmp_path):
    """bf16=True on the CPU: compute_loss runs under accelerate's bf16 autocast, as the model's own
    forward does, hykernels follows it, and the loss equals model(labels=...).loss under the same
    autocast (bf16 tolerance: torch rounds its logits to bf16, hykernels keeps them fp32)."""
    from transformers import TrainingArguments

    r = _recipe("transformers_trainer", monkeypatch)
    tok = r["char_tokenizer"]()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=16, learning_rate=3e-3,
                             logging_steps=1, report_to=[], use_cpu=True, bf16=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = r["HyTuningTrainer"](model=r["tiny_causal_lm"]("llama", len(tok)), args=args,
                                   data_collator=r["collate"], train_dataset=r["toy_dataset"](tok, False))
    model, batch = trainer.model, r["collate"](trainer.train_dataset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**batch).loss
    with trainer.compute_loss_context_manager():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        got = trainer.compute_loss(model, batch)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    got.backward()
    head = model.get_output_embeddings().weight
    assert head.dtype == head.grad.dtype == torch.float32  # fp32 master weight, fp32 gradient
    model.zero_grad()
    trainer.train()
    losses = _logged_losses(trainer)
    assert losses[-1] < losses[0]


def test_transformers_trainer_hytuning_batches(monkeypatch):
    trainer, _ = _recipe("transformers_trainer", monkeypatch)["main"](["--steps", "2", "--hytuning", "--arch", "qwen2"])
    _logged_losses(trainer)
    assert float(trainer.hytuning_loss.lam) != trainer.hytuning_loss.config.lambda0  # λ's EMA moved (§6)


def test_trl_grpo_hooks_equal_trl_and_train(monkeypatch, tmp_path):
    trl = pytest.importorskip("trl")
    from test_grpo_variants import grpo_batch

    r = _recipe("trl_grpo", monkeypatch)
    trainer = r["make_trainer"](r["parse_args"](["--steps", "2"]), str(tmp_path))
    model, g = trainer.model.train(), torch.Generator().manual_seed(0)
    trainer.current_gradient_accumulation_steps = 1
    prompt, completion, completion_mask, ids, mask = grpo_batch(g)
    # TRL's own log-probs and loss (its logits path) against the hykernels hooks, values and gradients
    trl_logps = trl.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    want, got = trl_logps(model, ids, mask, 6, compute_entropy=True), trainer._get_per_token_logps_and_entropies(
        model, ids, mask, 6, compute_entropy=True)
    on = completion_mask.bool()
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a[on], b[on], rtol=1e-5, atol=1e-5)
    noisy = lambda: want[0].detach() + 0.2 * torch.randn(4, 6, generator=g)  # off-policy: some ratios clip
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion,
                  completion_mask=completion_mask, advantages=torch.randn(4, generator=g),
                  num_items_in_batch=completion_mask.sum(), old_per_token_logps=noisy(), ref_per_token_logps=noisy())
    weight = model.get_output_embeddings().weight
    for loss_type in ("dapo", "grpo"):
        trainer.loss_type = loss_type
        ours = trainer._compute_loss(model, inputs)
        monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", trl_logps)
        theirs = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
        monkeypatch.undo()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(*(torch.autograd.grad(x, weight)[0] for x in (ours, theirs)), rtol=1e-4, atol=1e-6)
    # the default reward: mean self-certainty (lse - mean logit - log V) of the completion tokens
    trainer._prompt_ids, lengths = prompt.tolist(), completion_mask.sum(1).tolist()
    rewards = trainer.self_certainty(prompts=[""] * 4, completion_ids=[c[:n] for c, n in zip(completion.tolist(), lengths)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, 4:-1] / trainer.temperature, -1)
    sc = -logp.mean(-1) - math.log(logp.shape[-1])
    torch.testing.assert_close(torch.tensor(rewards), (sc * on).sum(1) / on.sum(1), rtol=1e-5, atol=1e-6)
    trainer.train()
    _logged_losses(trainer)
    assert trainer.state.log_history[0]["rewards/self_certainty/mean"] > 0


def test_vocab_parallel_torchrun_recipe_matches_single_process():
    """examples/vocab_parallel_torchrun.py under torchrun, 2 CPU ranks (gloo): the sharded lm_head
    trains exactly like the single-process model."""
    r = torchrun("examples/vocab_parallel_torchrun.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok", r.stdout
