"""Issue 13, items 1-3: the logits are z = s(H·Wᵀ + b)/τ (softcap first, then temperature:
docs/math.md §1), half-precision inputs get fp32 logits, and Triton's tanh is as accurate as torch's.

Every check is against plain torch on materialised logits, written here without the oracle, so a
mistake shared by tests/oracle.py and the backends would still show."""
import math
from pathlib import Path

import pytest
import torch

import hykernels as hk
from cases import make_case

from conftest import BACKENDS, DEVICE

try:
    import triton
    import triton.language as tl

    from hykernels.backends.triton import _tiles

    @triton.jit
    def tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(Y + offs, _tiles._tanh(tl.load(X + offs, mask=mask, other=0.0)), mask=mask)
except ImportError:  # no Triton: its test is skipped
    triton = None

ROOT = Path(__file__).resolve().parents[1]
SOFTCAP, TEMPERATURE = 4.0, 0.6


def torch_logits(h, w, b, softcap, temperature):
    """What transformers + TRL compute: the model's softcapped logits, divided by the temperature."""
    x = h.double() @ w.double().T + b.double()
    return softcap * torch.tanh(x / softcap) / temperature


def torch_stats(z, y):
    logp_all = torch.log_softmax(z, -1)
    valid = y != -100
    logp = torch.where(valid, logp_all.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    return dict(logp=logp, entropy=-(logp_all.exp() * logp_all).sum(-1),
                self_certainty=-logp_all.mean(-1) - math.log(z.shape[-1]), lse=torch.logsumexp(z, -1),
                confidence=logp_all.max(-1).values.exp())


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1.0)).item()


def order_case(rng, shape):
    c = make_case(rng, shape, "softcap_temp_all_ignored", torch.float32)  # with a bias
    n, v = c.targets.numel(), c.weight.shape[0]
    y = torch.randint(0, v, (n,), generator=rng)
    y[torch.rand(n, generator=rng) < 0.2] = -100
    c.targets, c.softcap, c.temperature = y.to(DEVICE), SOFTCAP, TEMPERATURE
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["ragged", "large_logits"])  # cuda: sliced rows, then whole rows
def test_softcap_then_temperature(rng, backend, shape):
    """token_stats and fused_loss values and gradients equal torch's s(x)/τ in fp64, and are far
    from the other order s(x/τ) (the test tells the two apart)."""
    c = order_case(rng, shape)
    leaves = [t.detach().double().requires_grad_() for t in (c.hidden, c.weight, c.bias)]
    z = torch_logits(*leaves, SOFTCAP, TEMPERATURE)
    gold = torch_stats(z, c.targets)
    x = (c.hidden @ c.weight.T + c.bias).double().detach()
    other = torch_stats(SOFTCAP * torch.tanh(x / TEMPERATURE / SOFTCAP), c.targets)

    st = hk.token_stats(c.hidden, c.weight, c.targets, backend=backend, chunk_size=c.chunk_size, **c.kwargs())
    for name in gold:
        assert rel_err(getattr(st, name), gold[name]) < 2e-5, name
    assert rel_err(other["lse"], gold["lse"]) > 0.1  # the wrong order is far off

    ups = [torch.randn(len(c.targets), generator=rng, dtype=torch.float64).to(DEVICE) for _ in range(4)]
    names = ("logp", "entropy", "self_certainty", "lse")
    g_gold = torch.autograd.grad(sum((gold[k] * u).sum() for k, u in zip(names, ups)), leaves, retain_graph=True)
    g_ours = torch.autograd.grad(sum((getattr(st, k).double() * u).sum() for k, u in zip(names, ups)),
                                 (c.hidden, c.weight, c.bias))
    for name, a, g in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_gold):
        assert rel_err(a, g) < 1e-4, name

    # fused_loss: its gradient is formed in the forward pass (cuda: from the stored final logits)
    n = len(c.targets)
    rd, ent = torch.rand(n, generator=rng).to(DEVICE) / n, torch.rand(n, generator=rng).to(DEVICE) / n
    loss, _ = hk.fused_loss(c.hidden, c.weight, c.targets, rd_weight=rd, entropy_weight=ent, backend=backend,
                            chunk_size=c.chunk_size, **c.kwargs())
    gold_loss = torch.where(c.targets != -100, rd * -gold["logp"] - ent * gold["entropy"], 0.0).sum()  # §5
    assert abs(loss.item() - gold_loss.item()) < 2e-5 * max(1.0, abs(gold_loss.item()))
    g_ours = torch.autograd.grad(loss, (c.hidden, c.weight, c.bias))
    g_gold = torch.autograd.grad(gold_loss, leaves)
    for name, a, g in zip(("fused d_hidden", "fused d_weight", "fused d_bias"), g_ours, g_gold):
        assert rel_err(a, g) < 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_statistics_as_exact_as_fp32_logits(rng, backend):
    """bf16 inputs with a bias and a softcap: lse and logp are no worse than torch's own bf16 logits
    (h @ w.T in bf16, then upcast, as a transformers model computes them) plus 1e-4, against fp64
    gold on the same bf16 values; and, as the GEMM output is fp32 before the bias and softcap, within
    fp32 rounding of the gold (a bf16-rounded GEMM output is off by ~1e-3)."""
    n, d, v = 29, 64, 301
    h = (torch.randn(n, d, generator=rng) * 2).bfloat16().to(DEVICE)
    w = (torch.randn(v, d, generator=rng) / math.sqrt(d)).bfloat16().to(DEVICE)
    b = torch.randn(v, generator=rng).bfloat16().to(DEVICE)
    y = torch.randint(0, v, (n,), generator=rng).to(DEVICE)
    softcap, temperature = 10.0, 0.7
    gold = torch_stats(torch_logits(h, w, b, softcap, temperature), y)
    x_bf16 = (h @ w.T).float() + b.float()  # torch's own: a bf16 GEMM, then fp32
    torch_own = torch_stats((softcap * torch.tanh(x_bf16 / softcap) / temperature).double(), y)
    st = hk.token_stats(h, w, y, bias=b, softcap=softcap, temperature=temperature, backend=backend, chunk_size=8)
    for name in ("lse", "logp", "entropy"):
        ours, own = max_err(getattr(st, name), gold[name]), max_err(torch_own[name], gold[name])
        assert ours <= own + 1e-4, f"{name}: {ours:.3g} > torch's bf16 {own:.3g} + 1e-4"
    for name in ("lse", "logp"):
        assert max_err(getattr(st, name), gold[name]) < 2e-5, name


def test_triton_tanh_is_accurate():
    """_tanh (the softcap's) against fp64 tanh on a dense grid of fp32 inputs: every 211th fp32 bit
    pattern in (0, 12), both signs, plus the switch points, tiny and subnormal values, ±0, ±inf, NaN."""
    if triton is None:
        pytest.skip("triton is not installed")
    grid = torch.arange(1, 0x41400000, 211, dtype=torch.int64).to(torch.int32).view(torch.float32)  # (0, 12)
    edges = torch.tensor([0.75, 10.0, 1e-38, 1e-45, 0.5, 1.0, 2.0, 9.0, 1e-4, 0.0625], dtype=torch.float32)
    edges = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, torch.full((), 20.0))])
    x = torch.cat([grid, -grid[::7], edges, -edges]).to(DEVICE)
    y = torch.empty_like(x)
    block = 1 << 16
    tanh_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    gold = torch.tanh(x.double())
    rel = ((y.double() - gold).abs() / gold.abs().clamp(min=1e-300)).max().item()
    assert rel <= 2.5e-7, f"max relative error {rel:.3g}"
    torch_rel = ((torch.tanh(x).double() - gold).abs() / gold.abs().clamp(min=1e-300)).max().item()
    print(f"triton _tanh max relative error {rel:.3g}, torch.tanh {torch_rel:.3g}")

    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 30.0, -30.0]).to(DEVICE)
    out = torch.empty_like(special)
    tanh_kernel[(1,)](special, out, special.numel(), BLOCK=8)
    assert out[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and out[4].isnan() and out[5:].tolist() == [1.0, -1.0]


def _tiny_gemma2(vocab=256, softcap=2.0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=256, final_logit_softcapping=softcap,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # logits of several softcaps: the softcap bites
    return model


def test_gemma2_softcap_with_a_sampling_temperature():
    """lm_head(model) of a Gemma-2 (final_logit_softcapping) with a sampler's temperature T gives
    log_softmax(model(...).logits / T), the model's logits already softcapped."""
    from hykernels.integrations.transformers import last_hidden_states, lm_head

    model, temperature = _tiny_gemma2(), 0.7
    ids = torch.randint(2, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
        assert logits.abs().max() > 1.0  # near the cap: the order matters
        want = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None])[..., 0]
        head = lm_head(model)
        assert head.softcap == 2.0 and head.temperature == 1.0
        hidden = last_hidden_states(model, ids)[:, :-1]
        got = hk.token_stats(hidden, head.weight, ids[:, 1:],
                             **dict(head.kwargs(), temperature=head.temperature * temperature))
    torch.testing.assert_close(got.logp.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [dict(output_multiplier=2.5, final_logit_softcapping=3.0),  # Muse Glimmer
                                     dict(logits_scaling=4.0), dict(logit_scale=0.25, final_logit_softcapping=30.0),
                                     dict(model_type="hyperclovax", logits_scaling=1.5)])
def test_lm_head_scalings_as_the_model_applies_them(rng, scaling):
    """A model multiplier α comes before its softcap c (c·tanh(α·x/c)), then the sampler's T divides:
    lm_head's softcap c/α and temperature 1/α reproduce it (TRL's add_fused_lm_head reading)."""
    from types import SimpleNamespace

    from hykernels.integrations.transformers import lm_head

    head = torch.nn.Linear(8, 23, bias=True).double()
    torch.nn.init.normal_(head.weight, std=2.0, generator=rng)
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace(**scaling))
    h, y, temperature = torch.randn(6, 8, generator=rng, dtype=torch.float64), torch.randint(0, 23, (6,)), 0.7
    alpha = {"output_multiplier": 2.5, "logits_scaling": 1 / 4.0, "logit_scale": 0.25}.get(next(iter(scaling)), 1.5)
    logits = head(h).detach() * alpha
    if "final_logit_softcapping" in scaling:
        c = scaling["final_logit_softcapping"]
        logits = c * torch.tanh(logits / c)
    want = torch.log_softmax(logits / temperature, -1).gather(1, y[:, None])[:, 0]
    lm = lm_head(model)
    got = hk.token_stats(h, lm.weight.detach(), y, **dict(lm.kwargs(), bias=lm.bias.detach(),
                                                          temperature=lm.temperature * temperature))
    torch.testing.assert_close(got.logp, want, rtol=1e-10, atol=1e-10)


def test_trl_log_probs_of_gemma2_with_temperature(monkeypatch, tmp_path):
    """The TRL recipe's log-probs equal TRL's own (model logits, already softcapped, / temperature)
    for a Gemma-2 with a sampling temperature ≠ 1."""
    trl = pytest.importorskip("trl")
    import runpy

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    r = runpy.run_path(str(ROOT / "examples" / "trl_grpo.py"))
    trainer = r["make_trainer"](r["parse_args"](["--steps", "1"]), str(tmp_path))
    trainer.temperature = temperature = 0.7
    model = _tiny_gemma2()
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(2, 256, (3, 5), generator=g), torch.randint(2, 256, (3, 6), generator=g)
    completion_mask = (torch.arange(6) < torch.tensor([[6], [3], [5]])).long()
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([torch.ones_like(prompt), completion_mask], 1)
    on = completion_mask.bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -7:-1].double()  # softcapped by the model
        got = trainer._get_per_token_logps_and_entropies(model, ids, mask, 6, compute_entropy=True)
        # TRL scores through the fused lm_head it patches into the policy (as GRPOTrainer.__init__ does)
        trl.trainer.utils.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
        want = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, 6, compute_entropy=True)
    assert logits.abs().max() > 1.0  # near the cap of 2: the order matters
    logp_all = torch.log_softmax(logits / temperature, -1)
    plain = (logp_all.gather(-1, completion[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1))
    for a, b, c in zip(got[:2], want[:2], plain):
        torch.testing.assert_close(a[on], b[on], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[on].double(), c[on], rtol=1e-5, atol=1e-5)
