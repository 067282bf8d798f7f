"""A transformers.Trainer whose loss comes from hykernels: the model returns hidden states, the
lm_head weight goes to `hk.fused_loss`, and the [tokens × vocab] logits are never formed.

HyTuningTrainer.compute_loss takes plain SFT/RD batches (input_ids, attention_mask, labels: the
token-mean cross-entropy, equal to model(labels=...).loss) and HyTuning batches that also carry
per-sequence columns prg, is_rd, reward, group_id (docs/math.md §6 through `HyTuningLoss`:
PRG-weighted RD on is_rd rows, PRG-gated GRPO on the rollouts). ``--packed`` makes the batches
padding-free (collate_packed: the sequences of a batch concatenated in one row, position ids
restarting per sequence, no attention mask); ``--lora`` trains LoRA adapters on the attention
projections through peft, the lm_head frozen (hykernels then forms no lm_head gradient). Runs on
the CPU in seconds:

    pip install -e ".[trainer]"
    python examples/transformers_trainer.py --steps 20               # SFT on a tiny random Llama
    python examples/transformers_trainer.py --steps 20 --hytuning --arch qwen2 --packed
    pip install -e ".[peft]" && python examples/transformers_trainer.py --steps 20 --lora
"""
import argparse

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import hykernels as hk
from hykernels.integrations.transformers import last_hidden_states, lm_head
from recipe_common import PAD, attn_implementation, char_tokenizer, tiny_causal_lm, train_in_tempdir

SEQUENCE_COLUMNS = ("prg", "is_rd", "reward", "group_id")  # per-sequence HyTuning columns


class HyTuningTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated batch itself

    def __init__(self, *args, hytuning_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hytuning_loss = hk.HyTuningLoss(hytuning_config, **lm_head(self.model).kwargs())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = lm_head(model)
        # packed batches: position_ids restart per sequence and attention_mask is None (collate_packed)
        hidden = last_hidden_states(model, inputs["input_ids"], position_ids=inputs.get("position_ids"),
                                    attention_mask=inputs.get("attention_mask"))
        hidden, targets = hidden[:, :-1], inputs["labels"][:, 1:]  # position t predicts token t + 1
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        if "prg" in inputs:  # HyTuning batch: the §6 weights, a per-batch mean
            if "seq_idx" in inputs:  # packed: each token's sequence
                seq_of = inputs["seq_idx"][:, 1:]
            else:  # padded: one sequence per row
                seq_of = torch.arange(targets.shape[0], device=targets.device)[:, None]
            seq_ids = torch.where(targets != -100, seq_of, -1)
            self.hytuning_loss.train(model.training)  # λ's EMA moves on training batches only
            loss, out = self.hytuning_loss(hidden, head.weight, targets, seq_ids, prg=inputs["prg"],
                                           is_rd=inputs["is_rd"], rewards=inputs["reward"],
                                           group_ids=inputs["group_id"])
            loss = loss / accumulation
        else:  # token-mean cross-entropy over the accumulated batch, as the model's own loss
            n = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum() * accumulation
            loss, out = hk.fused_loss(hidden, head.weight, targets, rd_weight=1.0 / float(n), **head.kwargs())
        return (loss, out) if return_outputs else loss

    def autocast_smart_context_manager(self, cache_enabled=True):
        """With bf16/fp16=True accelerate runs ``model.forward`` under autocast; compute_loss calls the
        base model and hk.fused_loss itself, so it enters the same autocast (training and evaluation)."""
        return self.accelerator.autocast()


def _sequence_columns(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in SEQUENCE_COLUMNS if k in rows[0]}


def collate(rows):
    """Right-pads token ids (labels with -100) and stacks the per-sequence columns present."""
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    batch = dict(input_ids=pad_sequence(ids, batch_first=True, padding_value=PAD),
                 attention_mask=pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                 labels=pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True, padding_value=-100))
    batch.update(_sequence_columns(rows))
    return batch


_flatten = DataCollatorWithFlattening(return_seq_idx=True)


def collate_packed(rows):
    """Padding-free: the sequences concatenated in one row [1, total tokens], position_ids restarting
    at 0 for each and no attention_mask (transformers' DataCollatorWithFlattening; each sequence's
    first label becomes -100, so no target crosses a boundary), seq_idx (each token's sequence)
    and the per-sequence columns. The model keeps the sequences apart (see attn_implementation)."""
    batch = _flatten([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    batch.update(_sequence_columns(rows))
    return batch


def toy_dataset(tok, hytuning: bool, n: int = 16):
    """Sums as prompt/answer pairs, loss on the answer only. With ``hytuning`` the even rows are RD
    traces and the odd ones RLIF rollouts (groups of 4), each with a PRG score and a reward."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        prompt, answer = tok.encode(f"{a}+{b}="), tok.encode(f"{a + b}") + [tok.eos_token_id]
        row = dict(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer)
        if hytuning:
            row.update(prg=torch.rand((), generator=g).item(), is_rd=i % 2 == 0,
                       reward=torch.randn((), generator=g).item(), group_id=i // 8)
        rows.append(row)
    return rows


def lora(model, rank: int = 8):
    """LoRA adapters on the attention projections (peft); everything else, the lm_head included, frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def make_trainer(args, output_dir) -> HyTuningTrainer:
    tok = char_tokenizer()
    attn = args.attn or attn_implementation(args.packed)
    flash = attn.startswith("flash")  # flash-attn: a CUDA device and half precision
    model = tiny_causal_lm(args.arch, len(tok), attn_implementation=attn, dtype=torch.bfloat16 if flash else None)
    if args.lora:
        model = lora(model)
    targs = TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=16,
                              learning_rate=args.lr, logging_steps=1, report_to=[], use_cpu=not flash,
                              save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    return HyTuningTrainer(model=model, args=targs, data_collator=collate_packed if args.packed else collate,
                           train_dataset=toy_dataset(tok, args.hytuning))


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--hytuning", action="store_true", help="HyTuning batches (prg/is_rd/reward columns)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--packed", action="store_true", help="padding-free batches (one row, position ids per sequence)")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default=None,
                   help="attention implementation (default: flash_attention_2 for --packed where flash-attn "
                        "is installed, else sdpa)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft), the lm_head frozen")
    return p.parse_args(argv)


def main(argv=None):
    trainer = train_in_tempdir(make_trainer, parse_args(argv))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return trainer, losses


if __name__ == "__main__":
    main()
