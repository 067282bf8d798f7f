"""Segment reductions shared by the PyTorch backends: answer-span sums and PRG (docs/math.md §3).

Vectorised with index_add_/scatter_reduce_ over a per-element segment index: no Python loop
over traces and no host sync, so each call is a handful of kernels on any device. Results are
fp32, or fp64 for fp64 inputs.
"""
from __future__ import annotations

import torch

from ._dense import stat_dtype


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[s] = Σ values[r] over rows r with segment_ids[r] = s."""
    dt = stat_dtype(values.dtype)
    out = torch.zeros(num_segments, dtype=dt, device=values.device)
    return out.index_add_(0, segment_ids, values.to(dt))


def prg_scores(support, probe_offsets, variant: str, eps: float, tau_g: float):
    """(gains [S − T], scores [T]) of the traces whose probes are support[off[t]:off[t + 1]]."""
    c = support.to(stat_dtype(support.dtype))
    traces = probe_offsets.numel() - 1
    num_gains = c.numel() - traces
    k = probe_offsets.diff() - 1  # gains per trace
    trace = torch.repeat_interleave(torch.arange(traces, device=c.device), k, output_size=num_gains)
    probe = torch.arange(num_gains, device=c.device) + trace + 1  # gain j of trace t ends at probe j + t + 1
    gains = c[probe] - c[probe - 1]
    net = c[probe_offsets[1:] - 1] - c[probe_offsets[:-1]]  # 0 for K = 0
    return gains, _score(variant, gains, trace, net, k, eps, tau_g)


def _score(variant, gains, trace, net, k, eps, tau_g):
    if variant == "net":
        return net
    per_k = k.clamp(min=1).to(net.dtype)
    if variant == "mean_gain":  # Σ_k Δ_k telescopes to c_K − c_0: exact, and 0 for K = 0
        return net / per_k
    if variant == "min_gain":  # include_self=False keeps the 0 of traces without gains
        return torch.zeros_like(net).scatter_reduce_(0, trace, gains, "amin", include_self=False)
    has_gains = k > 0
    if variant == "monotone":
        rising = segment_sum((gains > 0).to(net.dtype), trace, net.numel())
        return torch.where(has_gains, rising / per_k, 0.5)
    rho = segment_sum(gains.clamp(min=0), trace, net.numel()) / (segment_sum(gains.abs(), trace, net.numel()) + eps)
    return torch.where(has_gains, rho, 0.5) * torch.sigmoid(net / tau_g)
