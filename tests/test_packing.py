"""Padding-free batches in the transformers recipe: the sequences of a batch packed into one row
(position ids restarting per sequence, no attention mask: transformers' DataCollatorWithFlattening)
give the padded batch's loss and gradients. hykernels needs nothing for it; the model must keep
the packed sequences apart, which transformers does for sdpa/eager by deriving a block-diagonal
causal mask from the position ids (flash-attention: its variable-length kernels)."""
import math
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return runpy.run_path(str(ROOT / "examples" / "transformers_trainer.py"))


def _loss_and_grads(trainer, batch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("attn,hytuning", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_packed_batch_equals_padded(recipe, tmp_path, attn, hytuning):
    trainer = recipe["make_trainer"](recipe["parse_args"](["--packed", "--attn", attn] + ["--hytuning"] * hytuning),
                                     str(tmp_path))
    trainer.model.eval()  # HyTuningLoss: λ stays put between the two calls
    rows = trainer.train_dataset
    packed, padded = recipe["collate_packed"](rows), recipe["collate"](rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert (packed["position_ids"] == 0).sum() == len(rows)
    loss, grads = _loss_and_grads(trainer, packed)
    want, want_grads = _loss_and_grads(trainer, padded)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if not hytuning:  # and the model's own loss of the padded batch
        torch.testing.assert_close(loss, trainer.model(**padded).loss, rtol=0, atol=1e-5)
    # The check can fail: with an all-ones mask the model no longer reads the packing from the
    # position ids, the sequences attend to each other and the loss moves far past the tolerance.
    leaky = trainer.compute_loss(trainer.model, dict(packed, attention_mask=torch.ones_like(packed["input_ids"])))
    assert (leaky - want).abs() > 1e-3


def test_packed_recipe_trains(recipe):
    trainer, losses = recipe["main"](["--steps", "2", "--packed", "--hytuning"])
    assert trainer.model.config._attn_implementation == recipe["attn_implementation"](True)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_attn_implementation_default(recipe, monkeypatch):
    """flash_attention_2 for packed batches where flash-attn is installed and CUDA runs it, else sdpa."""
    common = recipe["attn_implementation"].__globals__
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common["importlib"].util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert recipe["attn_implementation"](True) == "flash_attention_2"
    assert recipe["attn_implementation"](False) == "sdpa"
    monkeypatch.setattr(common["importlib"].util, "find_spec", lambda name: None)
    assert recipe["attn_implementation"](True) == "sdpa"
