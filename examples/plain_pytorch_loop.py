"""A plain PyTorch training loop with hykernels' fused loss in place of logits + cross-entropy.

The model returns hidden states; the lm_head weight goes straight to `hk.fused_loss`, so the
[tokens × vocab] logits are never held. Runs on the CPU in seconds:

    python examples/plain_pytorch_loop.py --steps 20
"""
import argparse

import torch

import hykernels as hk


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.GRU(dim, dim, batch_first=True)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def hidden_states(self, ids):
        return self.mix(self.embed(ids))[0]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable toy language: each sequence counts upward modulo the vocabulary.
    start = torch.randint(0, args.vocab, (16, 1))
    ids = (start + torch.arange(33)) % args.vocab
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, :4] = -100  # e.g. prompt tokens: no loss
    num_targets = int((targets != -100).sum())
    losses = []
    for step in range(args.steps):
        hidden = model.hidden_states(inputs)  # [B, T, D]
        loss, stats = hk.fused_loss(hidden, model.lm_head.weight, targets,
                                    rd_weight=1.0 / num_targets)  # token-mean cross-entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  mean entropy {stats.entropy.mean():.3f}")
    return losses


if __name__ == "__main__":
    main()
