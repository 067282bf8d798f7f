"""Independent test oracle: docs/math.md §2 and §5 transcribed naively with torch autograd.

Nothing here imports hykernels. Gold values come from fp64; a "same-dtype torch" baseline
(the GEMM in the input dtype, then fp32, as a transformers model computes logits) sets the
error a low-precision path is allowed (the tolerance rule: |ours − gold| ≤ |same-dtype torch − gold|
+ a small tol; fp32 paths: relative error ≤ 1e-5).
"""
import math

import torch

STAT_NAMES = ("logp", "entropy", "self_certainty", "confidence", "argmax", "lse")


def logits(h, w, b=None, temperature=1.0, softcap=None, gold=True):
    if gold:
        h, w, b = h.double(), w.double(), None if b is None else b.double()
        z = h @ w.T
    else:  # same-dtype torch: GEMM in the input dtype, fp32 after it
        z = (h @ w.T).float()
        b = None if b is None else b.float()
    if b is not None:
        z = z + b
    if softcap is not None:  # docs/math.md §1: the model's softcap first, then the sampler's temperature
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def stats(h, w, y, b=None, temperature=1.0, softcap=None, ignore_index=-100, gold=True):
    return stats_of_logits(logits(h, w, b, temperature, softcap, gold), y, ignore_index)


def stats_of_logits(z, y, ignore_index=-100):
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    logp = torch.where(valid, logp_all.gather(1, y_safe[:, None]).squeeze(1), torch.zeros_like(z[:, 0]))
    return {
        "logp": logp,
        "entropy": -(p * logp_all).sum(-1),
        "self_certainty": -logp_all.mean(-1) - math.log(z.shape[-1]),  # KL(U ‖ p)
        "confidence": p.max(-1).values,
        "argmax": z.argmax(-1),
        "lse": torch.logsumexp(z, -1),
    }


def loss(st, y, ignore_index=-100, rd_weight=None, rlif_weight=None, advantages=None, old_logp=None,
         ref_logp=None, kl_weight=None, entropy_weight=None, clip_eps=(0.2, 0.2)):
    """§5 per-token loss summed, written as a user would with autograd."""
    logp, ent = st["logp"], st["entropy"]
    total = torch.zeros_like(logp)
    if rd_weight is not None:
        total = total + rd_weight * (-logp)
    if rlif_weight is not None:
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - clip_eps[0], 1 + clip_eps[1])
        total = total - rlif_weight * torch.minimum(ratio * advantages, clipped * advantages)
    if kl_weight is not None:
        d = ref_logp - logp
        total = total + kl_weight * (torch.exp(d) - d - 1)
    if entropy_weight is not None:
        total = total - entropy_weight * ent
    return torch.where(y != ignore_index, total, torch.zeros_like(total)).sum()
