"""A frozen lm_head (requires_grad=False: LoRA on the attention layers through peft, say):
hykernels forms and allocates no dW. Every backend gets ``needs`` from autograd's
needs_input_grad (hykernels/functional.py), so its V×D gradient buffer is never created; and a
real peft LoRA model trains through the recipe with the loss and the adapter gradients of the
model's own logits path."""
import math
import runpy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hykernels as hk
from hykernels import backends
from conftest import BACKENDS, DEVICE

ROOT = Path(__file__).resolve().parents[1]
N, D, V = 12, 48, 200  # one [N, V] fp32 tile (N·Vp·4 bytes, even padded) stays below a V×D gradient


class _LargeBuffers(TorchDispatchMode):
    """New floating storages of at least ``nbytes`` made by torch ops, except the weight's own and
    copies of it (the reference backend upcasts a half-precision weight to fp32 in full: an input
    copy, not a gradient), their views included. The copies are kept alive, so that no later
    buffer reuses their address."""

    COPIES = (torch.ops.aten._to_copy, torch.ops.aten.to, torch.ops.aten.clone)

    def __init__(self, weight: torch.Tensor, nbytes: int):
        super().__init__()
        self.weight_storages, self.nbytes, self.found = {weight.untyped_storage().data_ptr()}, nbytes, {}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy_of_weight = func.overloadpacket in self.COPIES and (
            args[0].untyped_storage().data_ptr() in self.weight_storages)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                continue
            ptr = t.untyped_storage().data_ptr()
            if copy_of_weight:
                self.weight_storages.add(ptr)
                self.copies.append(t)
            elif t.untyped_storage().nbytes() >= self.nbytes and ptr not in self.weight_storages:
                self.found.setdefault(ptr, (str(func), tuple(t.shape), t.dtype))
        return out


def _recording(fn, rec: _LargeBuffers):
    def run(*args, **kwargs):
        with rec:
            return fn(*args, **kwargs)

    return run


def _run(path, backend, h, w, y, g):
    """Forward and backward of one hykernels entry point; returns hidden's gradient."""
    kw = dict(backend=backend, chunk_size=None if backend == "triton" else 5)
    if path == "fused_loss":  # token-level terms: gradients formed in forward (6·N·D·V)
        loss, _ = hk.fused_loss(h, w, y, rd_weight=1.0 / N, entropy_weight=0.01, **kw)
    elif path == "sequence":  # sequence-level ratios: statistics pass, then recompute (loss_by_recompute)
        adv = torch.randn(N, generator=g).to(DEVICE)
        old = -5.0 + 0.1 * torch.randn(N, generator=g).to(DEVICE)
        loss, _ = hk.fused_loss(h, w, y, rlif_weight=1.0 / N, advantages=adv, old_logp=old,
                                importance_sampling_level="sequence", seq_ids=torch.arange(N, device=DEVICE) // 4,
                                **kw)
    elif path == "none":  # per-token losses, the logits recomputed in backward
        loss, _ = hk.fused_loss(h, w, y, reduction="none", **kw)
        loss = (loss * torch.rand(N, generator=g).to(DEVICE)).sum()
    else:  # token_stats: the §2 backward
        st = hk.token_stats(h, w, y, **kw)
        loss = st.logp.sum() + 0.1 * st.entropy.sum()
    loss.backward()
    return h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["fused_loss", "sequence", "none", "token_stats"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_allocates_no_weight_gradient(backend, path, dtype, monkeypatch):
    """With weight.requires_grad=False no op makes a buffer the size of dW (V·D in the weight's
    dtype or larger); with a trainable weight the same recorder finds one, so it would see it.
    The hidden gradient is the same either way."""
    g = torch.Generator().manual_seed(0)
    h0 = (torch.randn(N, D, generator=g) * 2).to(DEVICE, dtype)
    w0 = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(DEVICE, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[::5] = -100
    dw_bytes = V * D * w0.element_size()
    grads = {}
    module = backends._load(backend)
    for trainable in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(trainable)
        rec = _LargeBuffers(w, dw_bytes)
        with monkeypatch.context() as patch:
            # The ops are torch.library custom ops, and a dispatch mode does not see inside an op:
            # the recorder is entered again around the backend's own entry points.
            for name in ("token_stats", "token_stats_backward", "fused_loss"):
                patch.setattr(module, name, _recording(getattr(module, name), rec))
            with rec:
                grads[trainable] = _run(path, backend, h, w, y, torch.Generator().manual_seed(1))
        if trainable:
            assert rec.found, "the recorder misses the dW buffer of a trainable weight"
        else:
            assert not rec.found, f"a dW-sized buffer with a frozen weight: {list(rec.found.values())}"
            assert w.grad is None
    torch.testing.assert_close(grads[False], grads[True], rtol=0, atol=0)


def _recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return runpy.run_path(str(ROOT / "examples" / "transformers_trainer.py"))


def test_lora_recipe_matches_model_loss_and_adapter_grads(monkeypatch, tmp_path):
    """The recipe's --lora trainer (peft LoRA on q/k/v/o, lm_head frozen): compute_loss and the
    LoRA gradients equal model(labels=...).loss's; no lm_head gradient; training moves only the
    adapters."""
    pytest.importorskip("peft")
    r = _recipe(monkeypatch)
    trainer = r["make_trainer"](r["parse_args"](["--steps", "2", "--lora"]), str(tmp_path))
    model, batch = trainer.model, r["collate"](trainer.train_dataset)
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # peft starts lora_B at 0: make every adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = model.get_output_embeddings().weight
    assert adapters and all("lora_" in n for n in adapters) and not head.requires_grad

    want = model(**batch).loss  # the model's own logits + cross-entropy
    want_grads = torch.autograd.grad(want, list(adapters.values()))
    got = trainer.compute_loss(model, batch)
    got_grads = torch.autograd.grad(got, list(adapters.values()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, a, b in zip(adapters, got_grads, want_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert head.grad is None

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in adapters.items())
