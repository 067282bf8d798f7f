"""GRPO variants (issue 13, item 5) against TRL's GRPOTrainer._compute_loss (trl 1.16): loss
normalisations grpo / bnpo / dr_grpo / dapo / luspo (hykernels.hytuning.grpo_token_weights),
sequence-level importance ratios (GSPO), the bias-corrected KL and per-sequence advantages.

The oracle is a plain-PyTorch transcription of _compute_loss on materialised fp64 logits
(trl_loss); where TRL is installed its own _compute_loss is run on the same log-probs too, and the
TRL recipe (examples/trl_grpo.py) is checked against it for every setting it accepts."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import hykernels as hk
import oracle
from conftest import DEVICE
from hykernels.hytuning import grpo_token_weights
from test_token_stats import BACKENDS, FP64_BACKENDS, assert_within_rule, grads

B, T, D, V = 4, 7, 19, 103
LENGTHS = (7, 3, 0, 5)  # completion tokens per row; row 2 has none (it still counts in grpo's B)
MAX_COMPLETION_LENGTH, NUM_ITEMS, ACCUMULATION, STEPS_PER_GENERATION = 9, 40, 2, 4
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
EPS = (0.2, 0.28)
BETA = 0.04


def make_batch(rng, dtype, level, on_policy):
    """Completions [B, T] (padding after each row's length), hidden [B, T, D] → logits with a bias
    and a sampling temperature; advantages [B]; old log-probs whose ratios (token or sequence,
    as ``level`` uses) keep away from the clip edges so rounding cannot flip a clip decision."""
    h = (torch.randn(B, T, D, generator=rng, dtype=torch.float64) * 2).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=rng, dtype=torch.float64) / math.sqrt(D)).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(V, generator=rng, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=rng).to(DEVICE)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long().to(DEVICE)
    batch = SimpleNamespace(hidden=h, weight=w, bias=b, ids=ids, mask=mask, temperature=0.7,
                            targets=ids.masked_fill(mask == 0, -100),
                            advantages=torch.randn(B, generator=rng).to(DEVICE))
    logp = gold_logp(batch).detach().cpu()
    bands = torch.tensor([[0.4, 0.7], [0.9, 1.1], [1.3, 1.8]])

    def banded(shape):
        lo_hi = bands[torch.randint(0, 3, shape, generator=rng)]
        return (lo_hi[..., 0] + (lo_hi[..., 1] - lo_hi[..., 0]) * torch.rand(shape, generator=rng)).double().log()

    if level == "token":
        log_ratio = banded((B, T))
    else:  # the sequence mean of logp − old is banded; tokens scatter around it
        m = mask.cpu().double()
        noise = 0.3 * torch.randn(B, T, generator=rng, dtype=torch.float64)
        noise = noise - (noise * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        log_ratio = banded((B,))[:, None] + noise
    batch.old = None if on_policy else (logp - log_ratio).float().to(DEVICE)
    batch.ref = (logp + 0.5 * torch.randn(B, T, generator=rng, dtype=torch.float64)).float().to(DEVICE)
    return batch


def gold_logp(batch, gold=True, leaves=None):
    """Per-token log-probs of the completions (at every position, as TRL computes them) from
    materialised logits: fp64 (gold) or the inputs' dtype then fp32 (same-dtype torch)."""
    h, w, b = leaves or (batch.hidden, batch.weight, batch.bias)
    z = oracle.logits(h.reshape(B * T, D), w, b, batch.temperature, None, gold=gold)
    return torch.log_softmax(z, -1).gather(1, batch.ids.reshape(-1, 1)).reshape(B, T)


def trl_loss(logp, mask, advantages, old, ref, *, loss_type, level, bias_kl, beta=BETA, eps=EPS,
             accumulation=ACCUMULATION):
    """GRPOTrainer._compute_loss (trl 1.16, training mode, one process) transcribed for the loss
    types and options fused_loss covers."""
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logp.detach() if old is None else old
    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps[0], 1 + eps[1])
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * (kl * coef_1 if bias_kl else kl)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * MAX_COMPLETION_LENGTH) / accumulation
    if loss_type == "dapo":
        return (per_token * mask).sum() / (NUM_ITEMS * accumulation / STEPS_PER_GENERATION)
    return (per_token * mask).sum(-1).mean() / accumulation  # luspo


def token_weights(mask, loss_type, accumulation=ACCUMULATION):
    """The per-token weights a TRL user passes to fused_loss (as examples/trl_grpo.py builds them);
    fp64 (from an fp64 mask): fused_loss rounds them to fp32 for fp32 inputs."""
    mask = mask.double()
    if loss_type == "dapo":  # TRL's normaliser in training: num_items_in_batch · accumulation / steps_per_generation
        return grpo_token_weights(mask, "dapo", num_items_in_batch=NUM_ITEMS * accumulation / STEPS_PER_GENERATION)
    return grpo_token_weights(mask, loss_type, max_completion_length=MAX_COMPLETION_LENGTH) / accumulation


def ours(batch, *, loss_type, level, bias_kl, backend="auto", beta=BETA, advantages=None, **kwargs):
    w = token_weights(batch.mask, loss_type)
    kl = dict(kl_weight=beta * w, ref_logp=batch.ref) if beta else {}
    return hk.fused_loss(batch.hidden, batch.weight, batch.targets, bias=batch.bias, temperature=batch.temperature,
                         rlif_weight=w, advantages=batch.advantages if advantages is None else advantages,
                         old_logp=batch.old, clip_eps=EPS, importance_sampling_level=level,
                         use_bias_correction_kl=bias_kl, backend=backend, chunk_size=5, **kl, **kwargs)[0]


class FakeGRPOTrainer:
    """Just what trl.GRPOTrainer._compute_loss reads, its log-probs from materialised logits."""

    def __init__(self, logp, loss_type, level, bias_kl, beta=BETA):
        self._logp = logp
        self.loss_type, self.importance_sampling_level, self.beta = loss_type, level, beta
        self.epsilon_low, self.epsilon_high = EPS
        self.args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None,
                                    steps_per_generation=STEPS_PER_GENERATION)
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.use_vllm = 1.0, None, False
        self._entropy_bonus_enabled, self.aux_loss_enabled = False, False
        self.max_completion_length, self.current_gradient_accumulation_steps = MAX_COMPLETION_LENGTH, ACCUMULATION
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                           reduce=lambda x, reduction: x)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logp, torch.zeros_like(self._logp), None


def trl_own_loss(trl, batch, logp, *, loss_type, level, bias_kl, beta=BETA):
    inputs = dict(prompt_ids=batch.ids[:, :1], prompt_mask=torch.ones_like(batch.ids[:, :1]), completion_ids=batch.ids,
                  completion_mask=batch.mask, advantages=batch.advantages, ref_per_token_logps=batch.ref,
                  num_items_in_batch=torch.tensor(NUM_ITEMS))
    if batch.old is not None:
        inputs["old_per_token_logps"] = batch.old
    fake = FakeGRPOTrainer(logp, loss_type, level, bias_kl, beta)
    return trl.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_kl", [False, True], ids=["k3", "ratio_k3"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_transcription_is_trl(rng, loss_type, level, bias_kl, on_policy):
    """trl_loss is GRPOTrainer._compute_loss: values and gradients on the same log-probs."""
    trl = pytest.importorskip("trl")
    batch = make_batch(rng, torch.float64, level, on_policy)
    leaves = (batch.hidden, batch.weight, batch.bias)
    theirs = trl_own_loss(trl, batch, gold_logp(batch), loss_type=loss_type, level=level, bias_kl=bias_kl)
    mine = trl_loss(gold_logp(batch), batch.mask, batch.advantages, batch.old, batch.ref, loss_type=loss_type,
                    level=level, bias_kl=bias_kl)
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(mine, leaves), grads(theirs, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_kl", [False, True], ids=["k3", "ratio_k3"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_fused_loss_matches_trl_every_backend(rng, backend, level, bias_kl, on_policy):
    """fp32 inputs: within the suite's tolerance rule of the fp64 gold; loss types rotate."""
    loss_type = LOSS_TYPES[(2 * (level == "sequence") + bias_kl + 3 * on_policy) % len(LOSS_TYPES)]
    batch = make_batch(rng, torch.float32, level, on_policy)
    cfg = dict(loss_type=loss_type, level=level, bias_kl=bias_kl)
    gold_leaves = tuple(t.detach().double().requires_grad_() for t in (batch.hidden, batch.weight, batch.bias))
    terms = (batch.mask, batch.advantages.double(), None if on_policy else batch.old.double(), batch.ref.double())
    gold = trl_loss(gold_logp(batch, leaves=gold_leaves), *terms, **cfg)
    base = trl_loss(gold_logp(batch, gold=False), batch.mask, batch.advantages, batch.old, batch.ref, **cfg)
    loss = ours(batch, backend=backend, **cfg)
    assert_within_rule("loss", loss, gold, base, torch.float32)
    leaves = (batch.hidden, batch.weight, batch.bias)
    for name, a, g, b in zip(("d_hidden", "d_weight", "d_bias"), grads(loss * 0.37, leaves),
                             grads(gold * 0.37, gold_leaves), grads(base * 0.37, leaves)):
        assert_within_rule(name, a, g, b, torch.float32)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("against", ["torch", "trl"])
def test_loss_types_match_trl_fp64(rng, backend, loss_type, level, against):
    """Every loss normalisation, with the bias-corrected KL, fp64: against the transcription and
    against TRL's own _compute_loss."""
    batch = make_batch(rng, torch.float64, level, on_policy=False)
    cfg = dict(loss_type=loss_type, level=level, bias_kl=True)
    if against == "trl":
        want = trl_own_loss(pytest.importorskip("trl"), batch, gold_logp(batch), **cfg)
    else:
        want = trl_loss(gold_logp(batch), batch.mask, batch.advantages, batch.old, batch.ref, **cfg)
    loss = ours(batch, backend=backend, **cfg)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-13)
    leaves = (batch.hidden, batch.weight, batch.bias)
    for a, b in zip(grads(loss, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_sequence_advantages_and_packing(rng, level):
    """Advantages [B], [B, 1] and [B, T] give the same loss; the batch packed into one row of
    tokens (padding dropped, seq_ids naming each completion) gives it too."""
    batch = make_batch(rng, torch.float64, level, on_policy=False)
    cfg = dict(loss_type="grpo", level=level, bias_kl=True)
    leaves = (batch.hidden, batch.weight, batch.bias)
    want = ours(batch, **cfg)
    g_want = grads(want, leaves)
    for adv in (batch.advantages[:, None], batch.advantages[:, None].expand(B, T)):
        got = ours(batch, advantages=adv, **cfg)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    keep = batch.mask.reshape(-1).bool()
    seq = torch.arange(B, device=DEVICE).repeat_interleave(T)[keep]
    w = token_weights(batch.mask, "grpo").reshape(-1)[keep]
    packed, _ = hk.fused_loss(batch.hidden.reshape(-1, D)[keep], batch.weight, batch.targets.reshape(-1)[keep],
                              bias=batch.bias, temperature=batch.temperature, rlif_weight=w,
                              advantages=batch.advantages, seq_ids=seq, old_logp=batch.old.reshape(-1)[keep],
                              kl_weight=BETA * w, ref_logp=batch.ref.reshape(-1)[keep], clip_eps=EPS,
                              importance_sampling_level=level, use_bias_correction_kl=True)
    torch.testing.assert_close(packed, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(packed, leaves), g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_grpo_token_weights_packed_equals_padded():
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    keep = mask.reshape(-1).bool()
    seq = torch.arange(B).repeat_interleave(T)
    for loss_type in LOSS_TYPES:
        kw = dict(max_completion_length=MAX_COMPLETION_LENGTH, num_items_in_batch=NUM_ITEMS)
        padded = grpo_token_weights(mask, loss_type, **kw).reshape(-1)
        packed = grpo_token_weights(mask.reshape(-1), loss_type, seq_ids=seq, num_seqs=B, **kw)
        torch.testing.assert_close(packed, padded)
        torch.testing.assert_close(padded[~keep], torch.zeros(int((~keep).sum())))
    with pytest.raises(ValueError, match="^loss_type: expected one of"):
        grpo_token_weights(mask, "cispo")
    with pytest.raises(ValueError, match="^max_completion_length: expected a positive int"):
        grpo_token_weights(mask, "dr_grpo")
    with pytest.raises(ValueError, match="^seq_ids: required"):
        grpo_token_weights(mask.reshape(-1), "grpo")


def test_sequence_level_uses_the_recompute_path(rng, monkeypatch):
    """Sequence-level ratios need all rows' log-probs first: the chunked backend's single-pass
    fused_loss is bypassed for token_stats + token_stats_backward (8·N·D·V)."""
    from hykernels.backends import torch_chunked

    calls = []
    for name in ("fused_loss", "token_stats", "token_stats_backward"):
        real = getattr(torch_chunked, name)
        monkeypatch.setattr(torch_chunked, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    batch = make_batch(rng, torch.float32, "sequence", on_policy=False)
    ours(batch, loss_type="grpo", level="sequence", bias_kl=False, backend="torch_chunked")
    assert calls == ["token_stats", "token_stats_backward"]
    calls.clear()
    ours(batch, loss_type="grpo", level="token", bias_kl=True, backend="torch_chunked")
    assert calls == ["fused_loss"]


RECIPE_SETTINGS = [(lt, level, bias_kl) for lt in LOSS_TYPES for level in ("token", "sequence")
                   for bias_kl in (False, True)]


def grpo_batch(g):
    """4 rollouts of TRL's layout: 5 prompt tokens, 6 completion tokens of which the first 6, 3,
    5, 1 count. (prompt, completion, completion_mask, ids, attention mask)."""
    prompt, completion = torch.randint(2, 256, (4, 5), generator=g), torch.randint(2, 256, (4, 6), generator=g)
    completion_mask = (torch.arange(6) < torch.tensor([[6], [3], [5], [1]])).long()
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([torch.ones_like(prompt), completion_mask], 1)
    return prompt, completion, completion_mask, ids, mask


def test_trl_recipe_matches_trl_for_every_variant(monkeypatch, tmp_path):
    """examples/trl_grpo.py's trainer (hykernels.integrations.trl.HyTuningTrainer) on a batch of
    rollouts: its _compute_loss equals TRL's own (its logits path) for every loss type,
    importance-sampling level and KL correction it accepts: values and gradients."""
    trl = pytest.importorskip("trl")
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "examples"))
    r = runpy.run_path(str(root / "examples" / "trl_grpo.py"))
    trainer = r["make_trainer"](r["parse_args"](["--steps", "1"]), str(tmp_path))
    model, g = trainer.model.train(), torch.Generator().manual_seed(1)
    trainer.current_gradient_accumulation_steps = 2
    prompt, completion, completion_mask, ids, mask = grpo_batch(g)
    trl_logps = trl.GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    with torch.no_grad():
        logp = trl_logps(model, ids, mask, 6)[0]
    noisy = lambda s: logp + s * torch.randn(4, 6, generator=g)  # off-policy: some ratios clip
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion,
                  completion_mask=completion_mask, advantages=torch.randn(4, generator=g),
                  num_items_in_batch=completion_mask.sum() * 3, old_per_token_logps=noisy(0.2),
                  ref_per_token_logps=noisy(0.5))
    weight = model.get_output_embeddings().weight
    for loss_type, level, bias_kl in RECIPE_SETTINGS:
        trainer.loss_type, trainer.importance_sampling_level = loss_type, level
        trainer.args.use_bias_correction_kl = bias_kl
        mine = trainer._compute_loss(model, inputs)
        with monkeypatch.context() as m:
            m.setattr(trainer, "_get_per_token_logps_and_entropies", trl_logps)
            theirs = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=f"{loss_type} {level} {bias_kl}")
        torch.testing.assert_close(*(torch.autograd.grad(x, weight)[0] for x in (mine, theirs)), rtol=1e-4, atol=1e-6)
    trainer.args.loss_type = "cispo"
    with pytest.raises(NotImplementedError, match="loss_type='cispo'"):
        trainer.args.check_supported()
