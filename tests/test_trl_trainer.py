"""HyTuningTrainer (hykernels.integrations.trl) against independent computations.

A tiny random-init Qwen2 with a one-token-per-character tokenizer; the rollouts are canned (TRL's
_generate_single_turn returns fixed completions), so every batch is known. Expected values come
from the model's own materialised logits and separate probe forwards in plain torch, from TRL
1.16's own GRPOTrainer._compute_loss, or from TRL's importance-sampling rules transcribed."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402

from hykernels.hytuning import LOSS_TYPES, ProbeTrace, separate_probes, step_delimiters  # noqa: E402
from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from recipe_common import char_tokenizer, tiny_causal_lm  # noqa: E402

CUE = "\nAnswer: "
PROMPTS = ["Q: 2+3\n", "Q: 4+1\n"]
TRACES = [dict(prompt="Q: 1+2\n", reasoning="1+2 = 3\n\nso 3", answer="3"),
          dict(prompt="Q: 5+4\n", reasoning="5+4 = 9", answer="9"),
          dict(prompt="Q: 2+2\n", reasoning="", answer="4")]
# rollout i answers prompt i // 2 (num_generations=2); the second has no answer cue
ROLLOUTS = ["2+3 = 5\n\nyes\nAnswer: 5", "no cue at all", "x\n\ny\n\nz\nAnswer: 12", "\nAnswer: 7"]
TOK = char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm("qwen2", len(TOK)).save_pretrained(path)  # by path: TRL loads the reference model from it too
    return path


def make_trainer(model_dir, out, traces=TRACES, peft_config=None, eval_traces=None, reward_funcs=None, **config):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=32,
                learning_rate=1e-2, beta=0.0, traces_per_step=2, logging_steps=1, report_to=[], use_cpu=True,
                bf16=False, save_strategy="no", disable_tqdm=True, max_steps=2, seed=0)
    args.update(config)
    trainer = HyTuningTrainer(model=str(model_dir), args=HyTuningTrainerConfig(**args),
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                              trace_dataset=None if traces is None else Dataset.from_list(traces), processing_class=TOK,
                              peft_config=peft_config, reward_funcs=reward_funcs,
                              eval_trace_dataset=None if eval_traces is None else Dataset.from_list(eval_traces))
    canned = [TOK.encode(t, add_special_tokens=False) + [TOK.eos_token_id] for t in ROLLOUTS]
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: ([canned[i % 4] for i in range(len(prompt_ids))], None)
    return trainer


def one_batch(trainer, accumulation=1):
    """The first micro-batch of a generation, as Trainer.training_step gets it."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    return trainer._prepare_inputs([{"prompt": p} for p in PROMPTS for _ in range(2)])


def rows(inputs):
    """(input ids, attention mask, completion width) of a micro-batch."""
    return (torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])


def completion_logp(model, inputs):
    """log p of every vocabulary entry at the completion positions, from the model's own logits."""
    ids, mask, width = rows(inputs)
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, -width - 1:-1].float(), -1)


def prg_by_separate_probes(model, prompt_ids, reasoning, answer):
    """Progressive PRG (docs/math.md §3) from K + 1 separate forwards of the probes."""
    enc = lambda text: TOK.encode(text, add_special_tokens=False)
    probes = separate_probes(ProbeTrace(prompt_ids, enc(reasoning), enc(answer)), cue=enc(CUE),
                             delimiters=step_delimiters(TOK))
    support = []
    with torch.no_grad():
        for ids, first in probes:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            support.append(torch.stack([logp[t - 1, ids[t]] for t in range(first, len(ids))]).mean())
    c = torch.stack(support).double()
    gains = c[1:] - c[:-1]
    rho = gains.clamp(min=0).sum() / (gains.abs().sum() + 1e-6) if len(gains) else torch.tensor(0.5)
    return float(rho * torch.sigmoid(c[-1] - c[0]))


def decoded_rows(inputs):
    """Per row: (prompt ids, completion text) as the trainer saw them."""
    out = []
    for p, pm, c, cm in zip(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                            inputs["completion_mask"]):
        out.append((p[pm.bool()].tolist(), TOK.decode(c[cm.bool()].tolist(), skip_special_tokens=True)))
    return out


def test_loss_and_prg_equal_a_hand_assembly(model_dir, tmp_path):
    """(a) one mixed batch: loss and gradients equal HyTuning written out in plain torch from the
    model's logits; (b) the PRG of traces and rollouts equals separate probe forwards, 0 for the
    rollout without an answer."""
    trainer = make_trainer(model_dir, tmp_path)
    model = trainer.model
    inputs = one_batch(trainer)
    is_rd = inputs["is_rd"]
    assert is_rd.tolist().count(True) == 2 and is_rd.tolist().count(False) == 4

    prg, groups = [], []
    for (prompt, text), rd in zip(decoded_rows(inputs), is_rd.tolist()):
        reasoning, cue, answer = text.partition(CUE)
        prg.append(prg_by_separate_probes(model, prompt, reasoning, answer.strip()) if cue and answer.strip() else 0.0)
        groups.append(tuple(prompt))
    prg = torch.tensor(prg)
    torch.testing.assert_close(inputs["prg"].double(), prg.double(), rtol=0, atol=1e-4)  # (b)
    assert (prg[~is_rd] == 0).sum() == 1 and trainer._metrics["train"]["answered"] == [0.75]

    logp_v = completion_logp(model, inputs)
    mask = inputs["completion_mask"].bool()
    targets = inputs["completion_ids"]
    logp = logp_v.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():  # rewards: mean self-certainty (−mean_v log p_v − log V) of each rollout's tokens
        sc = -logp_v.mean(-1) - math.log(logp_v.shape[-1])
        u = (sc * mask).sum(1) / mask.sum(1) * prg.to(sc)
    adv = torch.zeros(len(prg))
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g and not is_rd[i]]
        if members:
            x = u[members]
            adv[members] = (x - x.mean()) / (x.var(unbiased=False).sqrt() + 1e-6)
    gap = prg[is_rd].mean() - prg[~is_rd].mean()
    lam = 0.9 * 0.5 + 0.1 * min(max(0.5 + float(gap), 0.1), 0.9)  # the first EMA step from λ₀
    w = ((prg + 0.1) / (prg[is_rd].mean() + 0.1)).clamp(0.2, 5.0)  # PRG in [0, 1]: (PRG + δ) / (mean + δ)
    rd_tok, rl_tok = mask & is_rd[:, None], mask & ~is_rd[:, None]
    surrogate = -adv[:, None] * torch.exp(logp - logp.detach())  # on-policy PPO: ρ ≡ 1, dρ = dlogp
    want = (lam * (w[:, None] * -logp)[rd_tok].sum() / rd_tok.sum()
            + (1 - lam) * surrogate[rl_tok].sum() / rl_tok.sum())  # dapo: num_items_in_batch = rollout tokens

    got = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert trainer._metrics["train"]["lambda"][-1] == pytest.approx(lam, abs=1e-5)


def test_prg_toward_the_group_majority(model_dir, tmp_path):
    """prg_answer="majority": each rollout's PRG is its reasoning's support for the answer its
    group gave most often (separate probe forwards); a rollout without an answer keeps PRG 0.
    Group 0 answered 5 and nothing: 5. Group 1 answered 12 and 7, a tie: 12, seen first."""
    trainer = make_trainer(model_dir, tmp_path, prg_answer="majority")
    measured, measure = [], trainer.measure_prg
    trainer.measure_prg = lambda traces: measured.extend(traces) or measure(traces)
    inputs = one_batch(trainer)
    # the probes' answers: three answered rollouts (toward 5, 12, 12; "\nAnswer: 7" has no step, so
    # its PRG is ¼ either way and only its probe shows the majority), then the curated traces
    assert [TOK.decode(t.answer) for t in measured[:3]] == ["5", "12", "12"]
    toward = {ROLLOUTS[0]: "5", ROLLOUTS[1]: None, ROLLOUTS[2]: "12", ROLLOUTS[3]: "12"}
    seen = []
    for (prompt, text), rd, got in zip(decoded_rows(inputs), inputs["is_rd"].tolist(), inputs["prg"].tolist()):
        if rd:
            continue
        seen.append(text)
        answer = toward[text]
        want = 0.0 if answer is None else prg_by_separate_probes(trainer.model, prompt, text.partition(CUE)[0], answer)
        assert got == pytest.approx(want, abs=1e-4), text
    assert sorted(seen) == sorted(ROLLOUTS)
    with pytest.raises(ValueError, match="prg_answer: expected one of"):
        make_trainer(model_dir, tmp_path, prg_answer="consensus")


def test_lambda_ema_across_steps_and_resume(model_dir, tmp_path):
    """(c) λ follows its EMA over optimisation steps (gradient accumulation 2: one generation of 2
    micro-batches per step); a checkpoint holds λ and resuming continues from it."""
    cfg = dict(gradient_accumulation_steps=2, save_strategy="steps", save_steps=1, ema=0.5, kappa=2.0)
    trainer = make_trainer(model_dir, tmp_path, **cfg)
    trainer.train()

    def follow(lam, log):
        step = min(max(0.5 + 2.0 * (log["prg_traces"] - log["prg_rollouts"]), 0.1), 0.9)
        return 0.5 * lam + 0.5 * step

    logs = [h for h in trainer.state.log_history if "lambda" in h]
    assert len(logs) == 2 and all(h["rd_tokens"] > 0 and h["rlif_tokens"] > 0 for h in logs)
    assert logs[0]["lambda"] == pytest.approx(follow(0.5, logs[0]), abs=1e-6)
    assert logs[1]["lambda"] == pytest.approx(follow(logs[0]["lambda"], logs[1]), abs=1e-6)
    state = json.loads((tmp_path / "checkpoint-1" / "hytuning_state.json").read_text())
    assert state["lambda"] == pytest.approx(logs[0]["lambda"], abs=1e-12) and state["traces_drawn"] == 2

    resumed = make_trainer(model_dir, tmp_path, **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    last = [h for h in resumed.state.log_history if "lambda" in h][-1]
    assert last["step"] == 2 and last["lambda"] == pytest.approx(follow(logs[0]["lambda"], last), abs=1e-6)
    assert resumed._sampler.drawn == 4


def test_rd_only_is_sft_cross_entropy(model_dir, tmp_path):
    """(d) λ pinned to 1 and every trace weighing 1: the loss is the mean cross-entropy of the
    trace tokens (SFT), rollouts contributing nothing; divided by the accumulation steps as TRL
    divides its loss (here 2)."""
    trainer = make_trainer(model_dir, tmp_path, lambda0=1.0, lambda_min=1.0, lambda_max=1.0, rd_weight_min=1.0,
                           rd_weight_max=1.0)
    inputs = one_batch(trainer, accumulation=2)
    model = trainer.model
    rd = inputs["is_rd"][:, None] & inputs["completion_mask"].bool()
    targets = inputs["completion_ids"].masked_fill(~rd, -100)
    want = torch.nn.functional.nll_loss(completion_logp(model, inputs).transpose(1, 2), targets) / 2
    got = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weight = model.get_output_embeddings().weight
    torch.testing.assert_close(*(torch.autograd.grad(x, weight)[0] for x in (got, want)), rtol=1e-4, atol=1e-6)


@pytest.fixture
def rlif_trainer(model_dir, tmp_path):
    """No traces (RLIF only), beta > 0 (a reference model); an off-policy batch of canned rollouts
    and TRL's own log-probs hook for its _compute_loss."""
    trainer = make_trainer(model_dir, tmp_path, traces=None, traces_per_step=0, beta=0.04)
    inputs = one_batch(trainer, accumulation=2)
    trl_logps = trl.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    ids, mask, width = rows(inputs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logp = trl_logps(trainer.model, ids, mask, width)[0]
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)  # some ratios clip
    return trainer, inputs, trl_logps, g


def trl_loss(trainer, inputs, trl_logps, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(trainer, "_get_per_token_logps_and_entropies", trl_logps)
        return trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)


TRL_METRICS = ("entropy", "kl", "policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
               "clip_ratio/low_min", "clip_ratio/high_max", "aux_loss")


def logged(trainer, compute):
    """(what compute() returns, the metrics it logged)."""
    trainer._metrics["train"].clear()
    out = compute()
    return out, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_same_loss(trainer, inputs, trl_logps, monkeypatch, msg=""):
    """Loss, lm_head gradient and every metric TRL logs equal TRL's own _compute_loss's."""
    weight = trainer.model.get_output_embeddings().weight
    mine, my_log = logged(trainer, lambda: trainer._compute_loss(trainer.model, inputs))
    theirs, their_log = logged(trainer, lambda: trl_loss(trainer, inputs, trl_logps, monkeypatch))
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(*(torch.autograd.grad(x, weight)[0] for x in (mine, theirs)), rtol=1e-4, atol=1e-6,
                               msg=msg)
    compared = [k for k in TRL_METRICS if k in their_log]
    assert {"clip_ratio/region_mean", "entropy"} <= set(compared), their_log
    for key in compared:
        assert my_log[key] == pytest.approx(their_log[key], rel=1e-4, abs=1e-6), (msg, key)
    assert "policy_loss" in my_log  # logged always (TRL logs it only with the entropy bonus)
    return mine


def test_rlif_only_is_trl_grpo(rlif_trainer, monkeypatch):
    """(d) without traces the loss is TRL's own GRPO _compute_loss: every loss type, both ratio
    levels, the bias-corrected KL, the top-entropy mask and the entropy bonus."""
    trainer, inputs, trl_logps, _ = rlif_trainer
    settings = [(lt, level, True, 1.0, 0.0) for lt in LOSS_TYPES for level in ("token", "sequence")]
    settings += [("grpo", "token", False, 0.5, 0.0), ("dapo", "token", True, 1.0, 0.05),
                 ("bnpo", "sequence", True, 0.5, 0.05)]
    for loss_type, level, bias_kl, quantile, entropy_coef in settings:
        trainer.loss_type, trainer.importance_sampling_level = loss_type, level
        trainer.args.use_bias_correction_kl, trainer.top_entropy_quantile = bias_kl, quantile
        trainer.entropy_coef, trainer._entropy_bonus_enabled = entropy_coef, entropy_coef != 0
        assert_same_loss(trainer, inputs, trl_logps, monkeypatch, msg=f"{loss_type} {level} {quantile} {entropy_coef}")


def vllm_ratio(old, sampling, mask, mode, lo, hi):
    """TRL 1.16's importance-sampling ratio of the sampler (_generate_and_score_completions), transcribed."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=lo, max=hi)
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_importance_sampling_weights_equal_trl(rlif_trainer, monkeypatch, mode):
    """(e) use_vllm: the sampler's ratio, as TRL truncates or masks it, weighs each rollout token's
    PPO term; the loss and its gradient equal TRL's _compute_loss on the same sampler log-probs."""
    trainer, inputs, trl_logps, g = rlif_trainer
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trainer.loss_type, trainer.importance_sampling_level = "dapo", "token"
    old, mask = inputs["old_per_token_logps"], inputs["completion_mask"]
    spread = 0.05 if mode.startswith("sequence") else 0.5  # sequence ratios multiply a whole row's token ratios
    sampling = old + spread * torch.randn(old.shape, generator=g)
    sampling[0, 1] = float("nan")  # a token vLLM could not score: no correction
    inputs = dict(inputs, sampling_per_token_logps=sampling,
                  importance_sampling_ratio=vllm_ratio(old, sampling, mask, mode, 0.7, 1.4))
    assert not torch.allclose(inputs["importance_sampling_ratio"], torch.ones(1))
    with_is = assert_same_loss(trainer, inputs, trl_logps, monkeypatch, msg=mode)
    trainer.use_vllm = False
    assert not torch.allclose(with_is, trainer._compute_loss(trainer.model, inputs))  # the ratio matters here


def test_lora_trains_only_the_adapters(model_dir, tmp_path):
    """(f) peft_config=LoRA: two steps change the adapters and nothing else."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = make_trainer(model_dir, tmp_path, peft_config=lora, learning_rate=5e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(n in changed for n in before if "lora_B" in n)


@pytest.mark.parametrize("option, value, error", [
    ("loss_type", "cispo", NotImplementedError), ("delta", 1.5, NotImplementedError),
    ("off_policy_mask_threshold", 0.5, NotImplementedError), ("use_adaptive_entropy", True, NotImplementedError),
    ("scale_rewards", "batch", NotImplementedError), ("multi_objective_aggregation", "normalize_then_sum",
                                                      NotImplementedError),
    ("cast_lm_head_to_fp32", True, NotImplementedError), ("lambda0", 0.95, ValueError), ("ema", 1.5, ValueError),
    ("prg_variant", "best", ValueError), ("traces_per_step", 3, ValueError), ("answer_cue", "", ValueError),
    ("rd_weight_max", 0.1, ValueError), ("rd_weight_smoothing", 0.0, ValueError), ("max_probe_steps", 0, ValueError)])
def test_refused_options_name_themselves(tmp_path, option, value, error):
    """(g) settings the trainer does not reproduce, and invalid HyTuning fields, raise naming the field."""
    with pytest.raises(error, match=option):
        HyTuningTrainerConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, use_cpu=True, report_to=[],
                              **{option: value})


def test_trainer_refuses_bad_traces_and_options(model_dir, tmp_path):
    args = HyTuningTrainerConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False)
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match="^trace_dataset: missing column answer"):
        HyTuningTrainer(str(model_dir), args, prompts, Dataset.from_list([{"prompt": "a", "reasoning": "b"}]))
    with pytest.raises(ValueError, match="^trace_dataset: required"):
        HyTuningTrainer(str(model_dir), args, prompts, None)
    with pytest.raises(NotImplementedError, match="^environment_factory"):
        HyTuningTrainer(str(model_dir), args, prompts, Dataset.from_list(TRACES), environment_factory=object)
    args.delta = 2.0  # changed after the config was made: the trainer checks again
    with pytest.raises(NotImplementedError, match="delta=2.0"):
        HyTuningTrainer(str(model_dir), args, prompts, Dataset.from_list(TRACES))


def test_hytuning_config_maps_trl_knobs(tmp_path):
    """Every HyTuningConfig field is a config field of the same default, or one of TRL's knobs."""
    from dataclasses import fields

    from hykernels.hytuning import HyTuningConfig

    args = HyTuningTrainerConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], beta=0.02, epsilon=0.1,
                                 epsilon_high=0.3, scale_rewards="none", entropy_coef=0.01, kappa=2.0)
    got, default = args.hytuning_config(), HyTuningConfig()
    assert (got.kl_coef, got.clip_eps, got.std_normalize, got.entropy_coef, got.kappa) == (0.02, (0.1, 0.3), False,
                                                                                            0.01, 2.0)
    own = [f.name for f in fields(HyTuningConfig) if f.name not in ("kl_coef", "clip_eps", "std_normalize",
                                                                       "entropy_coef")]
    fresh = HyTuningTrainerConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert all(getattr(fresh, name) == getattr(default, name) for name in own)
    assert fresh.traces_per_step == fresh.per_device_train_batch_size * fresh.gradient_accumulation_steps


def test_import_without_trl_says_what_to_install():
    """hykernels and hykernels.integrations import without TRL; the TRL integration says how to get it."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "import hykernels, hykernels.integrations, hykernels.integrations.transformers\n"
            "try:\n    import hykernels.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'pip install "hykernels[trl]"' in r.stdout


EVAL_TRACES = [dict(prompt="Q: 3+3\n", reasoning="3+3 = 6", answer="6"), dict(prompt="Q: 1+1\n", reasoning="", answer="2")]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_metrics_are_logged_and_eval_runs(model_dir, tmp_path, bf16):
    """One training step logs every HyTuning metric and TRL's health metrics (finite; bf16: under
    TRL's autocast). evaluate() runs the same batch layout without moving λ or the training trace
    sampler: its RD rows are eval_trace_dataset's, the same ones at every evaluation; without
    eval traces it scores the rollouts alone."""
    trainer = make_trainer(model_dir, tmp_path, max_steps=1, bf16=bf16, per_device_eval_batch_size=4,
                           eval_traces=EVAL_TRACES)
    trainer.train()
    log = trainer.state.log_history[0]
    for key in ("lambda", "prg_traces", "prg_rollouts", "reward", "reward_gated", "rd_nll", "entropy", "answered",
                "rd_tokens", "rlif_tokens", "rewards/self_certainty/mean", "loss", "policy_loss",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max"):
        assert key in log and math.isfinite(log[key]), key
    assert log["answered"] == 0.75 and log["rd_tokens"] > 0
    lam, drawn = float(trainer.hytuning.lam), trainer._sampler.drawn
    seen = []
    merge = trainer._prepare_inputs
    trainer._prepare_inputs = lambda batch: seen.append(merge(batch)) or seen[-1]
    metrics = [trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS * 2})) for _ in range(2)]
    for m in metrics:
        assert math.isfinite(m["eval_loss"]) and m["eval_rd_tokens"] > 0 and m["eval_answered"] == 0.75
    assert metrics[0]["eval_loss"] == metrics[1]["eval_loss"]  # the same eval traces each time
    assert float(trainer.hytuning.lam) == lam and trainer._sampler.drawn == drawn
    rd_prompts = {TOK.decode(p[m.bool()].tolist()) for b in seen for p, m, rd in
                  zip(b["prompt_ids"], b["prompt_mask"], b["is_rd"]) if rd}
    assert rd_prompts == {t["prompt"] for t in EVAL_TRACES}
    trainer._eval_trace_rows = []  # no eval traces: rollouts only
    assert trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS * 2}))["eval_rd_tokens"] == 0


def test_bf16_loss_follows_trl(model_dir, tmp_path, monkeypatch):
    """bf16=True: the rollout loss under TRL's autocast is TRL's own, to bf16 accuracy."""
    trainer = make_trainer(model_dir, tmp_path, traces=None, traces_per_step=0, bf16=True, loss_type="grpo")
    inputs = one_batch(trainer)
    trl_logps = trl.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    ids, mask, width = rows(inputs)
    with torch.no_grad(), trainer.compute_loss_context_manager():
        logp = trl_logps(trainer.model, ids, mask, width)[0]
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    inputs["old_per_token_logps"] = logp.float() + 0.3 * noise  # off-policy: the loss depends on log p
    with trainer.compute_loss_context_manager():
        mine, theirs = trainer._compute_loss(trainer.model, inputs), trl_loss(trainer, inputs, trl_logps, monkeypatch)
    torch.testing.assert_close(mine, theirs, rtol=5e-3, atol=1e-4)


def total_reward(completions, **_):
    """A deterministic reward: the completion's length (so two rollouts of a group differ)."""
    return [float(len(c)) for c in completions]


def test_trl_advantages_reproduce_grpo_trainer(model_dir, tmp_path):
    """trl_advantages=True, no traces, no gating: the advantages of a generation batch and the loss
    and gradient of its micro-batch are GRPOTrainer's own (sample std + 1e-4: ±0.707 for two
    rollouts); HyTuning's default (population std + eps) gives ±1.0."""
    config = dict(traces=None, traces_per_step=0, gate_rewards=False, reward_funcs=[total_reward])
    ours = make_trainer(model_dir, tmp_path / "ours", trl_advantages=True, **config)
    args = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=32, learning_rate=1e-2, beta=0.0, logging_steps=1, report_to=[], use_cpu=True,
                bf16=False, save_strategy="no", disable_tqdm=True, max_steps=2, seed=0)
    theirs = trl.GRPOTrainer(model=str(model_dir), reward_funcs=[total_reward], args=trl.GRPOConfig(**args),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=TOK)
    theirs._generate_single_turn = ours._generate_single_turn
    batch = [{"prompt": p} for p in PROMPTS for _ in range(2)]
    for trainer in ours, theirs:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    a, b = ours._generate_and_score_completions(batch), theirs._generate_and_score_completions(batch)
    torch.testing.assert_close(a["advantages"], b["advantages"], rtol=1e-6, atol=1e-6)
    assert a["advantages"].abs().max() == pytest.approx(2 ** -0.5, rel=1e-3)
    loss_a, loss_b = ours._compute_loss(ours.model, a), trl.GRPOTrainer._compute_loss(theirs, theirs.model, b)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    grads = [torch.autograd.grad(loss, t.model.get_output_embeddings().weight)[0]
             for loss, t in ((loss_a, ours), (loss_b, theirs))]
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-7)
    default = make_trainer(model_dir, tmp_path / "default", **config)
    default.model.train()
    assert default._generate_and_score_completions(batch)["advantages"].abs().max() == pytest.approx(1.0, rel=1e-3)


def test_trace_weights_use_the_whole_generation_batch(model_dir, tmp_path, monkeypatch):
    """One trace per micro-batch (gradient accumulation 2, 2 traces a step): each trace's weight
    w_i = clamp(PRG_i / mean PRG of the generation batch's traces) is the one it gets when both
    share a micro-batch, not 1."""
    import hykernels.integrations.trl as hk_trl

    weights = []
    loss = hk_trl.prg_loss

    def recording(*args, **kwargs):
        out = loss(*args, **kwargs)
        weights.append(out[1].rd_weights[kwargs["is_rd"]].tolist())
        return out

    monkeypatch.setattr(hk_trl, "prg_loss", recording)
    got = {}
    for accumulation in (1, 2):
        trainer = make_trainer(model_dir, tmp_path / str(accumulation), gradient_accumulation_steps=accumulation,
                               per_device_train_batch_size=4 // accumulation)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = accumulation
        generation = [{"prompt": p} for p in PROMPTS for _ in range(2)]
        weights.clear()
        for step in range(accumulation):
            trainer._step = step
            trainer.compute_loss(trainer.model, trainer._prepare_inputs(generation))
        got[accumulation] = [w for ws in weights for w in ws]
        prg = torch.cat([c["prg"] for c in trainer._rd_chunks["train"]])
    assert len(got[2]) == 2 and got[2] == pytest.approx(got[1], rel=1e-5)
    assert got[2] == pytest.approx(((prg + 0.1) / (prg.mean() + 0.1)).clamp(0.2, 5.0).tolist(), rel=1e-5)
    assert abs(got[2][0] - 1.0) > 1e-3  # normalised within its micro-batch it would be 1


def test_default_precision_follows_the_device(tmp_path):
    """bf16 unset: on for an accelerator that runs it, off on a CPU (TRL's default, bf16, stops a CPU
    run); set, it stays as set."""
    from hykernels.integrations.trl import bf16_supported

    assert HyTuningTrainerConfig(output_dir=str(tmp_path), report_to=[]).bf16 == bf16_supported()
    if not torch.cuda.is_available():
        assert bf16_supported() is False
    assert HyTuningTrainerConfig(output_dir=str(tmp_path), report_to=[], bf16=False).bf16 is False


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny random-init Qwen2-MoE (4 experts, 2 per token) with TRL's router auxiliary loss on."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, router_aux_loss_coef=0.3, pad_token_id=0, eos_token_id=1,
                            tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("moe")
    Qwen2MoeForCausalLM(config).save_pretrained(path)
    return path


def test_moe_router_aux_loss_as_trl_adds_it(moe_dir, tmp_path, monkeypatch):
    """A MoE model trains (it was refused): without traces the loss, its gradient and the logged
    aux_loss are TRL's own _compute_loss's, router_aux_loss_coef · aux ÷ accumulation included;
    with traces the aux loss covers their rows too and the step runs."""
    trainer = make_trainer(moe_dir, tmp_path, traces=None, traces_per_step=0)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.3
    inputs = one_batch(trainer, accumulation=2)
    trl_logps = trl.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    with_aux = assert_same_loss(trainer, inputs, trl_logps, monkeypatch, msg="moe")
    trainer.aux_loss_enabled = False
    assert not torch.allclose(with_aux, trainer._compute_loss(trainer.model, inputs))  # the aux term matters
    mixed = make_trainer(moe_dir, tmp_path / "mixed", max_steps=1)
    mixed.train()
    assert math.isfinite(mixed.state.log_history[0]["aux_loss"])


def test_deepspeed_zero3_is_refused_by_name():
    """ZeRO-3 would hand hykernels a partitioned (empty) lm_head weight: refused, naming the way out."""
    from types import SimpleNamespace

    from hykernels.integrations.trl import refuse_zero3

    state = lambda stage: SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    with pytest.raises(NotImplementedError, match="deepspeed: ZeRO-3 .* use FSDP2"):
        refuse_zero3(state(3))
    refuse_zero3(state(2))
    refuse_zero3(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))


@pytest.mark.parametrize("num_traces, per_process, world", [(10, 2, 2), (7, 1, 3), (6, 2, 2), (5, 5, 1)])
def test_trace_sampler_shares_without_repeats(num_traces, per_process, world):
    """Every global draw (all processes' shares) holds no trace twice, also across the end of a
    pass; every pass uses each trace once; a sampler restored from ``drawn`` continues alike."""
    from hykernels.integrations._trl_rows import TraceSampler

    samplers = [TraceSampler(num_traces, seed=3) for _ in range(world)]
    draws = [sum((s.share(per_process, rank, world) for rank, s in enumerate(samplers)), []) for _ in range(30)]
    assert all(len(set(d)) == len(d) == per_process * world for d in draws)
    flat = sum(draws, [])
    assert all(sorted(flat[i:i + num_traces]) == list(range(num_traces))
               for i in range(0, len(flat) - num_traces + 1, num_traces))
    resumed = TraceSampler(num_traces, seed=3)
    resumed.drawn = 11 * per_process * world
    assert [resumed.draw(per_process * world) for _ in range(5)] == draws[11:16]
