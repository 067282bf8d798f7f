"""`python -m hykernels demo`: one packed RD + RLIF batch through the fused loss, on the CPU.

An embedded, deterministic toy problem (no model download, no network): random hidden states
and an lm_head stand in for a model; a few "RD" sequences carry gold targets and "RLIF"
rollouts in groups are rewarded by their own self-certainty (hytuning.md §4-§5). The fused
torch_chunked path is checked against the reference path that materialises the logits.
"""
from __future__ import annotations

import time

import torch

from . import functional as F

IGNORE = -100


def _problem(seed: int, dim: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    rd_lens, rollout_lens, group_size = [48, 64, 40, 56], [32, 44, 28, 36, 40, 30, 48, 38], 4
    lens = rd_lens + rollout_lens
    n = sum(lens)
    hidden = torch.randn(n, dim, generator=g) * 2.0
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0)
    targets[starts] = IGNORE  # first token of each sequence: a prompt token, no target
    is_rd = seq < len(rd_lens)
    rollout_group = torch.arange(len(rollout_lens)) // group_size
    return hidden, weight, targets, seq, is_rd, rollout_group


def _grpo_advantages(reward: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-rollout A_i = (u_i − mean_g) / (std_g + ε) (hytuning.md §4)."""
    adv = torch.zeros_like(reward)
    for gid in group.unique():
        m = group == gid
        adv[m] = (reward[m] - reward[m].mean()) / (reward[m].std(unbiased=False) + eps)
    return adv


def run(seed: int = 0, dim: int = 256, vocab: int = 32000) -> dict:
    hidden, weight, targets, seq, is_rd, rollout_group = _problem(seed, dim, vocab)
    n = hidden.shape[0]
    valid = targets != IGNORE
    num_rd_seqs = int(seq[is_rd].max()) + 1

    # 1. Score the rollouts with the current policy: mean self-certainty per rollout (no grad).
    with torch.no_grad():
        stats = F.token_stats(hidden, weight, targets)
    rollout_seq = seq[~is_rd] - num_rd_seqs
    num_rollouts = int(rollout_seq.max()) + 1
    sc_sum = torch.zeros(num_rollouts).index_add_(0, rollout_seq, stats.self_certainty[~is_rd])
    reward = sc_sum / torch.bincount(rollout_seq, minlength=num_rollouts)
    adv_per_rollout = _grpo_advantages(reward, rollout_group)

    # 2. Per-token weights of the §5 loss: token-mean RD CE and token-mean GRPO, mixed 50/50.
    lam = 0.5
    t_rd, t_rlif = int((valid & is_rd).sum()), int((valid & ~is_rd).sum())
    rd_weight = torch.where(is_rd, lam / t_rd, 0.0)
    rlif_weight = torch.where(is_rd, 0.0, (1 - lam) / t_rlif)
    advantages = torch.zeros(n)
    advantages[~is_rd] = adv_per_rollout[rollout_seq]

    rows = {}
    for backend in ("reference", "torch_chunked"):  # chunks of 128 rows: 4 passes here
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        t0 = time.perf_counter()
        loss, out = F.fused_loss(h, w, targets, rd_weight=rd_weight, rlif_weight=rlif_weight,
                                 advantages=advantages, backend=backend, chunk_size=128)
        loss.backward()
        rows[backend] = dict(loss=loss.item(), seconds=time.perf_counter() - t0, dh=h.grad, dw=w.grad,
                             logp=out.logp)
    ref, fused = rows["reference"], rows["torch_chunked"]
    return dict(
        tokens=n, dim=dim, vocab=vocab, rd_tokens=t_rd, rlif_tokens=t_rlif,
        rewards=reward.tolist(), advantages=adv_per_rollout.tolist(), rows=rows,
        loss_diff=abs(ref["loss"] - fused["loss"]),
        grad_diff=max((ref["dh"] - fused["dh"]).abs().max().item(), (ref["dw"] - fused["dw"]).abs().max().item()),
        logits_bytes=n * vocab * 4,
    )


def main(seed: int = 0) -> int:
    print("hykernels demo: one packed RD + RLIF batch, fused loss vs materialised logits (CPU)")
    r = run(seed)
    print(f"batch: {r['tokens']} tokens ({r['rd_tokens']} RD targets, {r['rlif_tokens']} RLIF targets), "
          f"D={r['dim']}, V={r['vocab']}")
    print("rollout rewards (mean self-certainty): " + " ".join(f"{u:.3f}" for u in r["rewards"]))
    print("GRPO advantages:                       " + " ".join(f"{a:+.2f}" for a in r["advantages"]))
    print()
    print("| backend | loss | fwd+bwd s | logits held |")
    print("|---|---|---|---|")
    held = {"reference": f"{r['logits_bytes'] / 2**20:.0f} MiB (all rows)",
            "torch_chunked": f"{128 * r['vocab'] * 4 / 2**20:.0f} MiB (128 rows)"}
    for name, row in r["rows"].items():
        print(f"| {name} | {row['loss']:.6f} | {row['seconds']:.3f} | {held[name]} |")
    print()
    ok = r["loss_diff"] < 1e-4 and r["grad_diff"] < 1e-4
    print(f"agreement: |Δloss| = {r['loss_diff']:.2e}, max |Δgrad| = {r['grad_diff']:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1
