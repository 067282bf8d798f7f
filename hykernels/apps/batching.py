"""The batch layout the applications train and score with: every sequence a prompt followed by
a response, right-padded, all starting at position 0, so one [B, T] batch with an attention mask
serves training, rewards and scoring."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrations.transformers import last_hidden_states


@dataclass
class Batch:
    """Right-padded sequences: ids, attention mask [B, T]; next-token targets [B, T] on response
    tokens only (−100 elsewhere, the last position included); seq_ids [B, T], the row for tokens
    with a target, −1 for the others."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor

    def hidden(self, model) -> torch.Tensor:
        return last_hidden_states(model, self.ids, attention_mask=self.mask)


def make_batch(prompts: list, responses: list, pad: int) -> Batch:
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    pos = torch.arange(width)
    lengths = torch.tensor([len(s) for s in seqs])
    starts = torch.tensor([len(p) for p in prompts])
    mask = (pos[None] < lengths[:, None]).long()
    # position t predicts token t+1, a response token when starts <= t+1 < length
    learn = (pos[None] + 1 >= starts[:, None]) & (pos[None] + 1 < lengths[:, None])
    targets = torch.where(learn, ids.roll(-1, 1), -100)
    seq_ids = torch.where(learn, torch.arange(len(seqs))[:, None], -1)
    return Batch(ids, mask, targets, seq_ids)
