"""Launch configurations of the Triton kernels: candidate tables, autotuning, tensor descriptors.

Every lm_head kernel is a GEMM over tiles of BLOCK_M × BLOCK_N with BLOCK_K steps of the
reduction, in the geometry of the logits GEMM (rows × vocabulary, steps over D):

    logits_fwd / logits_grad   Z[rows, vocab]  = H · Wᵀ        tile m×n, steps of k over D
    dh_gemm                    dH[rows, dim]   = G · W         tile m×n', steps of k' over V
    dw_gemm                    dW[vocab, dim] += Gᵀ · H        tile m'×n', steps of k' over rows

On a GPU each kernel is autotuned (``triton.autotune``) over a small fixed table, keyed on
(D, V) and the argument dtypes: the first call at a new key benchmarks every candidate once
(~0.1 s each). Candidates marked ``hopper`` need sm_90's shared memory (228 KB) and are offered
on sm_90+ only. Every candidate of every table compiles without register spills for sm_80 and
sm_90a (tests/compile_triton.py fails otherwise). The Triton interpreter (CPU tests) and a set
``OVERRIDE`` take one explicit Blocks instead: the override's m×n×k is the logits tile, and the
gradient GEMMs use the same numbers in their own roles (dH: m rows × k dims, steps of n; dW:
n vocabulary × k dims, steps of m), so one small override gives ragged tiles in every kernel.

Tensor descriptors (TMA on sm_90+): the kernels take either a host ``TensorDescriptor`` per
operand or a plain pointer, chosen per launch by ``use_descriptors``: on CUDA devices of compute
capability ≥ 9 when every operand is 16-byte aligned (base and row stride), as TMA requires;
plain pointers with int64 offsets and masks everywhere else (sm_80, ragged D, the interpreter).
Triton ≥ 3.4 has host descriptors (triton.tools.tensor_descriptor), so 3.6 and 3.8+ both do.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Blocks:
    m: int
    n: int
    k: int
    splits: Optional[int] = None  # vocabulary splits of logits_fwd; None = enough to fill the GPU
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8  # row blocks that sweep the columns together (grouped order)
    hopper: bool = False  # needs sm_90's shared memory: offered on sm_90+ only


# Set to a Blocks to launch every kernel with it instead of the tables (tests: small ragged tiles).
OVERRIDE: Optional[Blocks] = None
# The interpreter's per-operation cost dominates: large tiles keep the CPU tests fast.
INTERPRETER = Blocks(m=64, n=512, k=64)
# Tensor descriptors: None = wherever they work (see use_descriptors); True/False forces them
# (True under the interpreter: tests run the descriptor path on the CPU).
DESCRIPTORS: Optional[bool] = None

# Candidate tables, per kernel and operand width. Half precision: Hopper-sized 128×256 tiles
# (wgmma's widest, 4 stages where shared memory allows) beside 128×128 and 64×128 ones that
# fit an A100 and keep the epilogues' tiles in registers. fp32 dots are IEEE FMA loops (no
# tensor cores), register-bound: small tiles only.
_HALF_GEMM = (
    Blocks(128, 256, 64, num_warps=8, num_stages=3),
    Blocks(128, 256, 64, num_warps=8, num_stages=4, hopper=True),
    Blocks(128, 128, 64, num_warps=8, num_stages=4),
    Blocks(128, 128, 64, num_warps=4, num_stages=4),
    Blocks(64, 128, 64, num_warps=4, num_stages=4),
)
_HALF_LOGITS = (  # the epilogue holds the logits tile, its exponentials and reductions at once
    Blocks(128, 128, 64, num_warps=8, num_stages=3),
    Blocks(128, 128, 64, num_warps=8, num_stages=4, hopper=True),
    Blocks(64, 256, 64, num_warps=8, num_stages=3),
    Blocks(64, 128, 32, num_warps=8, num_stages=3),
)
_FP32 = (
    Blocks(64, 64, 32, num_warps=8, num_stages=2),
    Blocks(64, 64, 32, num_warps=4, num_stages=2),
    Blocks(32, 64, 32, num_warps=4, num_stages=2),
)
TABLES = {
    "logits_fwd": (_HALF_LOGITS, _FP32),
    "logits_grad": (_HALF_LOGITS, _FP32),
    "dh_gemm": (_HALF_GEMM, _FP32),
    "dw_gemm": (_HALF_GEMM, _FP32),
}
# The widest BLOCK_N of any logits candidate: vocabulary splits are multiples of it, so the
# split boundaries (and the partials the host merges) do not depend on the tuned tile.
SPLIT_ALIGN = 256


def explicit(device: torch.device) -> Optional[Blocks]:
    """The one Blocks every kernel launches with (OVERRIDE, or INTERPRETER off CUDA); None = tuned."""
    if OVERRIDE is not None:
        return OVERRIDE
    return INTERPRETER if device.type != "cuda" else None


def candidates(kernel: str, dtype: torch.dtype, capability: int) -> tuple[Blocks, ...]:
    half, fp32 = TABLES[kernel]
    table = fp32 if dtype == torch.float32 else half
    return tuple(b for b in table if capability >= 90 or not b.hopper)


def _meta(kernel: str, b: Blocks) -> dict:
    """The kernel's constexpr tile sizes for Blocks ``b`` (see the module docstring)."""
    if kernel in ("logits_fwd", "logits_grad"):
        return dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m)
    if OVERRIDE is not None or interpreting():  # one Blocks in its roles for every kernel
        if kernel == "dh_gemm":
            return dict(BLOCK_M=b.m, BLOCK_N=b.k, BLOCK_K=b.n, GROUP_M=b.group_m)
        return dict(BLOCK_M=b.n, BLOCK_N=b.k, BLOCK_K=b.m, GROUP_M=b.group_m)
    return dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m)


# Per kernel: descriptor argument -> the constexprs that give its block shape.
DESCRIPTOR_BLOCKS = {
    "logits_fwd": {"H": ("BLOCK_M", "BLOCK_K"), "W": ("BLOCK_N", "BLOCK_K")},
    "logits_grad": {"H": ("BLOCK_M", "BLOCK_K"), "W": ("BLOCK_N", "BLOCK_K")},
    "dh_gemm": {"G": ("BLOCK_M", "BLOCK_K"), "W": ("BLOCK_K", "BLOCK_N"), "DH": ("BLOCK_M", "BLOCK_N")},
    "dw_gemm": {"G": ("BLOCK_K", "BLOCK_M"), "H": ("BLOCK_K", "BLOCK_N"), "DW": ("BLOCK_M", "BLOCK_N")},
}


def _set_descriptor_blocks(kernel: str, nargs: dict) -> None:
    """autotune pre_hook (and explicit launches): give each descriptor the chosen block shape."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    for name, (rows, cols) in DESCRIPTOR_BLOCKS[kernel].items():
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [nargs[rows], nargs[cols]]


def use_descriptors(*tensors: torch.Tensor) -> bool:
    if DESCRIPTORS is not None:
        return DESCRIPTORS
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (triton ≥ 3.4)
    except ImportError:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                                                     for s in t.stride()[:-1]) for t in tensors)


def operand(t: torch.Tensor, descriptors: bool):
    """A kernel argument for matrix ``t``: a TensorDescriptor (block shape set at launch) or ``t``."""
    if not descriptors:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1] * t.dim())


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, jit_fn, dtype: torch.dtype, capability: int):
    import triton

    hook = functools.partial(_set_descriptor_blocks, kernel)
    configs = [triton.Config(_meta(kernel, b), num_warps=b.num_warps, num_stages=b.num_stages, pre_hook=hook)
               for b in candidates(kernel, dtype, capability)]
    return triton.autotune(configs, key=["D", "V"])(jit_fn)


def launch(kernel: str, jit_fn, grid: Callable[[dict], tuple], dtype: torch.dtype, device: torch.device,
           *args, **kwargs) -> dict:
    """Run ``jit_fn`` (named ``kernel`` in the tables): with OVERRIDE or under the interpreter at
    one explicit Blocks, otherwise through its autotuner. Returns the constexprs it ran with."""
    b = explicit(device)
    if b is not None:
        meta = _meta(kernel, b)
        named = dict(zip(jit_fn.arg_names, args), **kwargs, **meta)
        _set_descriptor_blocks(kernel, named)
        opts = dict(num_warps=b.num_warps, num_stages=b.num_stages) if device.type == "cuda" else {}
        jit_fn[grid(meta)](*args, **kwargs, **meta, **opts)
        return meta
    tuned = _tuned(kernel, jit_fn, dtype, torch.cuda.get_device_capability(device)[0] * 10
                   + torch.cuda.get_device_capability(device)[1])
    tuned[grid](*args, **kwargs)
    return tuned.best_config.kwargs
