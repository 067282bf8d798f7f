"""Random problem instances for the correctness suite (fresh data every run)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from conftest import DEVICE

# name -> (N, D, V, logit scale, bias offset, chunk size); none of N, D, V is a power of two.
SHAPES = {
    "ragged": (37, 19, 103, 2.0, 0.0, 16),
    "realistic_vocab": (6, 24, 32003, 3.0, 0.0, 4),
    "large_logits": (29, 17, 211, 40.0, 0.0, 8),
    "all_negative": (23, 13, 157, 4.0, -300.0, 7),
}
# name -> (temperature, softcap, bias, which rows are ignored)
OPTIONS = {
    "plain": (1.0, None, False, "none"),
    "temp_bias_some_ignored": (0.7, None, True, "some"),
    "softcap_temp_all_ignored": (1.3, 12.0, True, "all"),
    "softcap_some_ignored": (1.0, 5.0, False, "some"),
}


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: Optional[torch.Tensor]
    temperature: float
    softcap: Optional[float]
    chunk_size: int

    def fp64_leaves(self):
        """fp64 copies of (hidden, weight, bias) for gold gradients that are not rounded
        to the input dtype on the way out of autograd."""
        return tuple(None if t is None else t.detach().double().requires_grad_()
                     for t in (self.hidden, self.weight, self.bias))

    def kwargs(self):
        return dict(bias=self.bias, temperature=self.temperature, softcap=self.softcap)


def make_case(rng, shape, options, dtype, requires_grad=True, ignore_index=-100):
    n, d, v, scale, offset, chunk = SHAPES[shape]
    temperature, softcap, with_bias, ignored = OPTIONS[options]
    h = torch.randn(n, d, generator=rng, dtype=torch.float64) * scale
    w = torch.randn(v, d, generator=rng, dtype=torch.float64) / math.sqrt(d)
    b = None
    if with_bias or offset:
        b = torch.randn(v, generator=rng, dtype=torch.float64) + offset
    y = torch.randint(0, v, (n,), generator=rng)
    if ignored == "some":
        y[torch.rand(n, generator=rng) < 0.3] = ignore_index
        y[0] = ignore_index
    elif ignored == "all":
        y[:] = ignore_index

    def leaf(t):
        return None if t is None else t.to(DEVICE, dtype).requires_grad_(requires_grad)

    return Case(leaf(h), leaf(w), y.to(DEVICE), leaf(b), temperature, softcap, chunk)


def gradcheck_case(rng):
    """A 6-row, 9-entry fp64 slice of the ragged case with softcap, one ignored row and a bias:
    small enough for torch.autograd.gradcheck. (case, hidden, weight, targets, bias); the three
    leaves require grad."""
    c = make_case(rng, "ragged", "softcap_some_ignored", torch.float64)
    h = c.hidden[:6].detach().requires_grad_()
    w = c.weight[:9].detach().requires_grad_()
    y = c.targets[:6] % 9
    y[1] = -100
    b = torch.randn(9, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    return c, h, w, y, b
