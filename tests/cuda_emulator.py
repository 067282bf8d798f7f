"""The cuda backend's Python side on a CPU, with csrc/kernels emulated in torch.

A second copy of hykernels/backends/cuda.py is loaded as backend "cuda_emulated", with only the
device-bound pieces swapped: the extension (each kernel re-implemented here from the contract in
csrc/kernels/hykernels.h, including the bf16/fp16 gradient packed in place at the start of each
fp32 row), the two-stream lanes and the mixed-precision GEMMs. Everything else runs as written:
chunk and vocabulary-slice planning (the padded, 16-byte-aligned tile rows included), the merge
of slice partials, the single-pass fused_loss, the gradient views and accumulators. So CPU CI
checks that orchestration against the oracle, and a GPU run checks the kernels themselves
(backend "cuda", same suite).

The emulated kernels keep the tile contract of csrc/kernels/hykernels.h to the letter, so a wrong
flag from the Python side shows up as wrong numbers: logit_stats leaves the tile untouched unless
``write_back`` (then it holds z = s(x + b)/τ), and logit_grad reads the tile as z when
``transformed`` and applies the transform to it otherwise (applied twice, or not at all, when the
flag does not match what the tile holds). Every launch is logged in ``FakeExtension.calls`` with
its flags and whether the real launcher would take the vector path (16-byte-aligned rows and
bias), for tests of the host's decisions (tests/test_cuda.py).
"""
import collections
import importlib.util
import math
import sys

import torch

from hykernels import backends
from hykernels.backends import _segments

NAME = "cuda_emulated"
_MODULE = "hykernels.backends._cuda_emulated"


def _transform(x, bias, inv_temp, softcap):
    """z = s(x + b)/τ: softcap first, then temperature (csrc/kernels/logit_epilogues.cu transform())."""
    z = x if bias is None else x + bias
    return torch.tanh(z / softcap) * (softcap * inv_temp) if softcap > 0 else z * inv_temp


def _target_columns(targets, col0, cols):
    local = targets - col0
    hit = (local >= 0) & (local < cols)
    return hit, local.clamp(0, cols - 1)


def _vectorizable(tile, bias):
    """csrc/kernels/logit_epilogues.cu vectorizable(): the launcher's choice of the float4 kernels."""
    return tile.data_ptr() % 16 == 0 and tile.stride(0) % 4 == 0 and (bias is None or bias.data_ptr() % 16 == 0)


def _identity(bias, inv_temp, softcap):
    return bias is None and softcap == 0 and inv_temp == 1.0


class FakeExtension:
    """csrc/kernels as torch ops, argument for argument."""

    calls = collections.deque(maxlen=10_000)  # one dict per launch: kernel, flags, layout

    @staticmethod
    def _log(kernel, tile, bias, inv_temp, softcap, bias_read, **flags):
        FakeExtension.calls.append(dict(kernel=kernel, cols=tile.shape[1], ld=tile.stride(0),
                                        vector=_vectorizable(tile, bias if bias_read else None),
                                        identity=_identity(bias, inv_temp, softcap), **flags))

    @staticmethod
    def logit_stats(tile, col0, bias, inv_temp, softcap, write_back, targets, m, s, t, u, zy, argmax, stream):
        FakeExtension._log("logit_stats", tile, bias, inv_temp, softcap, True, write_back=write_back)
        z = _transform(tile, bias, inv_temp, softcap)
        if write_back:  # otherwise the tile keeps the GEMM output, bit for bit
            tile.copy_(z)
        mx, am = z.max(1)
        zs = z - torch.where(mx == float("-inf"), 0.0, mx)[:, None]  # an all −inf row: zs = −inf, not NaN
        e = torch.exp(zs)
        hit, col = _target_columns(targets, col0, tile.shape[1])
        t_sum = torch.where(e == 0, 0.0, zs * e).sum(1)  # e = 0: nothing, never −inf·0
        for out, val in ((m, mx), (s, e.sum(1)), (t, t_sum), (u, zs.sum(1)), (argmax, am + col0),
                         (zy, torch.where(hit, z.gather(1, col[:, None])[:, 0], 0.0))):
            out.copy_(val)

    @staticmethod
    def logit_grad(tile, col0, bias, inv_temp, softcap, transformed, targets, lse, lse_lo, A, B, C, D, out_kind,
                   stream):
        FakeExtension._log("logit_grad", tile, bias, inv_temp, softcap, not transformed, transformed=transformed,
                           out_kind=out_kind)
        # transformed: the tile is z as it stands (bias, softcap and τ are not applied again)
        z = tile.clone() if transformed else _transform(tile, bias, inv_temp, softcap)
        logp = (z - lse[:, None]) - lse_lo[:, None]
        p = torch.exp(logp)
        g = torch.where(p == 0, 0.0, p * (A[:, None] + B[:, None] * logp)) + D[:, None]
        hit, col = _target_columns(targets, col0, tile.shape[1])
        g.scatter_add_(1, col[:, None], torch.where(hit, C, 0.0)[:, None])
        if softcap > 0:  # z is the final logit s/τ: s/c = τ·z/c
            g = g * (1 - (z / (softcap * inv_temp)) ** 2)
        g = g * inv_temp
        if out_kind == 0:
            tile.copy_(g)
        else:  # element j of row r at byte 2j of fp32 row r
            dtype = (torch.bfloat16, torch.float16)[out_kind - 1]
            tile.view(dtype)[:, : tile.shape[1]].copy_(g.to(dtype))
            # The rest of each row is stale fp32 halves, some NaN as bf16/fp16. cuBLAS never reads
            # past K, but the CPU's half-precision mm reads a few elements past an odd K (NaN·0 = NaN).
            tile.view(dtype)[:, tile.shape[1]:].zero_()

    @staticmethod
    def segment_sum(values, ids, out, stream):
        out.copy_(_segments.segment_sum(values, ids, out.numel()))

    @staticmethod
    def prg_scores(support, offsets, variant, eps, tau_g, gains, scores, stream):
        from hykernels._types import PRG_VARIANTS

        g, sc = _segments.prg_scores(support, offsets, PRG_VARIANTS[variant], eps, tau_g)
        gains.copy_(g)
        scores.copy_(sc)


class SerialLanes:
    """One CPU 'stream': chunks run in order, so ordering needs no events."""

    def __init__(self, device, elements, chunks):
        self.work = torch.empty(elements, dtype=torch.float32, device=device)

    def next(self):
        return None, self.work  # torch.cuda.stream(None) is a no-op

    def shared_begin(self, stream):
        pass

    def shared_end(self, stream):
        pass

    def close(self):
        pass


def _gemm_logits(tile, h, w):
    tile.copy_(h.float() @ w.float().T)  # fp32 accumulation, as cuBLAS with an fp32 output


def _addmm_fp32(acc, a, b, alpha=1.0):
    acc.add_(a.float() @ b.float(), alpha=alpha)


def load():
    """Register the emulated backend (once) and return its module."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    spec = importlib.util.spec_from_file_location(_MODULE, importlib.util.find_spec("hykernels.backends.cuda").origin)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = mod
    spec.loader.exec_module(mod)
    mod.NAME = NAME
    mod._ext = lambda: FakeExtension
    mod._Lanes = SerialLanes
    mod._stream_id = lambda: 0
    mod._gemm_logits = _gemm_logits
    mod._addmm_fp32 = _addmm_fp32
    mod.availability = lambda device: None if device.type == "cpu" else "the emulation runs on CPU tensors"
    backends._MODULES[NAME] = _MODULE
    return mod


def sliced_workspace(rows: int, vocab: int, slices: int) -> int:
    """WORKSPACE_BYTES that makes ``rows``-row chunks walk about ``slices`` vocabulary slices
    (slices are a multiple of 4 columns wide: cuda.plan)."""
    return 2 * 4 * rows * 4 * math.ceil(vocab / slices / 4)
