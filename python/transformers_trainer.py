"""A transformers.Trainer whose loss comes from hykernels: the model returns hidden states, the
lm_head weight goes to `hk.fused_loss`, and the [tokens × vocab] logits are never formed.

HyTuningTrainer.compute_loss takes plain SFT/RD batches (input_ids, attention_mask, labels: the
token-mean cross-entropy, equal to model(labels=...).loss) and HyTuning batches that also carry
per-sequence columns prg, is_rd, reward, group_id (hytuning.md §6 through `HyTuningLoss`:
PRG-weighted RD on is_rd rows, PRG-gated GRPO on the rollouts). Runs on the CPU in seconds:

    pip install -e ".[trainer]"
    python python/transformers_trainer.py --steps 20               # SFT on a tiny random Llama
    python python/transformers_trainer.py --steps 20 --hytuning --arch qwen2
"""
import argparse

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import Trainer, TrainingArguments

import hykernels as hk
from hykernels.integrations.transformers import last_hidden_states, lm_head
from recipe_common import PAD, char_tokenizer, tiny_causal_lm, train_in_tempdir

SEQUENCE_COLUMNS = ("prg", "is_rd", "reward", "group_id")  # per-sequence HyTuning columns


class HyTuningTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated batch itself

    def __init__(self, *args, hytuning_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hytuning_loss = hk.HyTuningLoss(hytuning_config, **lm_head(self.model).kwargs())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = lm_head(model)
        hidden = last_hidden_states(model, inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        hidden, targets = hidden[:, :-1], inputs["labels"][:, 1:]  # position t predicts token t + 1
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        if "prg" in inputs:  # HyTuning batch: the §6 weights, a per-batch mean
            rows = torch.arange(targets.shape[0], device=targets.device)[:, None]
            seq_ids = torch.where(targets != -100, rows, -1)
            self.hytuning_loss.train(model.training)  # λ's EMA moves on training batches only
            loss, out = self.hytuning_loss(hidden, head.weight, targets, seq_ids, prg=inputs["prg"],
                                           is_rd=inputs["is_rd"], rewards=inputs["reward"],
                                           group_ids=inputs["group_id"])
            loss = loss / accumulation
        else:  # token-mean cross-entropy over the accumulated batch, as the model's own loss
            n = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum() * accumulation
            loss, out = hk.fused_loss(hidden, head.weight, targets, rd_weight=1.0 / float(n), **head.kwargs())
        return (loss, out) if return_outputs else loss


def collate(rows):
    """Right-pads token ids (labels with -100) and stacks the per-sequence columns present."""
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    batch = dict(input_ids=pad_sequence(ids, batch_first=True, padding_value=PAD),
                 attention_mask=pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                 labels=pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True, padding_value=-100))
    batch.update({k: torch.tensor([r[k] for r in rows]) for k in SEQUENCE_COLUMNS if k in rows[0]})
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


def make_trainer(args, output_dir) -> HyTuningTrainer:
    tok = char_tokenizer()
    targs = TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=16,
                              learning_rate=args.lr, logging_steps=1, report_to=[], use_cpu=True,
                              save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    return HyTuningTrainer(model=tiny_causal_lm(args.arch, len(tok)), args=targs, data_collator=collate,
                           train_dataset=toy_dataset(tok, args.hytuning))


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--hytuning", action="store_true", help="HyTuning batches (prg/is_rd/reward columns)")
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


def main(argv=None):
    trainer = train_in_tempdir(make_trainer, parse_args(argv))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return trainer, losses


if __name__ == "__main__":
    main()
