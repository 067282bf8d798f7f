"""Launch configurations of the Triton kernels: candidate tables, autotuning, tensor descriptors.

Every lm_head kernel is a GEMM over tiles of BLOCK_M × BLOCK_N with BLOCK_K steps of the
reduction, in the geometry of the logits GEMM (rows × vocabulary, steps over D):

    logits_fwd / logits_grad   Z[rows, vocab]  = H · Wᵀ        tile m×n, steps of k over D
    dh_gemm                    dH[rows, dim]   = G · W         tile m×n', steps of k' over V
    dw_gemm                    dW[vocab, dim] += Gᵀ · H        tile m'×n', steps of k' over rows

On a GPU each kernel is tuned over a small fixed table (_tune.py): the candidates ``offered``
at the problem (those whose grid fills a wave of the GPU's SMs) are benchmarked once per key
(the kernel's shapes, flags and operand dtypes; ~0.1 s each) and the choice is kept on disk for
later processes. Candidates marked ``hopper`` need sm_90's shared memory (228 KB) and are offered
on sm_90+ only. Every candidate of every table compiles without register spills for sm_80 and
sm_90a (tests/compile_triton.py fails otherwise). The Triton interpreter (CPU tests) and a set
``OVERRIDE`` take one explicit Blocks instead (``explicit_meta``): the override's m×n×k is the
logits tile, and the gradient GEMMs use the same numbers in their own roles (dH: m rows × k
dims, steps of n; dW: n vocabulary × k dims, steps of m), so one small override gives ragged
tiles in every kernel. tests/compile_triton.py compiles every explicit Blocks the tests use
(tests/triton_tiles.py) and INTERPRETER in those roles too.

Tensor descriptors (TMA on sm_90+): the kernels take either a host ``TensorDescriptor`` per
operand or a plain pointer, chosen per launch by ``use_descriptors``: on CUDA devices of compute
capability ≥ 9 for half-precision inputs when every operand is 16-byte aligned (base and row
stride), as TMA requires; plain pointers with int64 offsets and masks everywhere else (sm_80,
fp32, ragged D, the interpreter). With descriptors the logits kernels also store through TMA
(logits_fwd's kept logits Z, logits_grad's gradient tile G).
Triton ≥ 3.4 has host descriptors (triton.tools.tensor_descriptor), so 3.6 and 3.8+ both do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

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
    tma: bool = False  # spill-free only with tensor descriptors: offered to descriptor launches only


# Set to a Blocks to launch every kernel with it instead of the tables (tests: small ragged tiles).
OVERRIDE: Optional[Blocks] = None
# The interpreter's cost is per operation and per program: wide tiles keep the CPU tests fast.
# It is compiled too (tests/compile_triton.py), so it is a tile a GPU can run: 64×512×64 was not
# (dh_gemm's 512-deep K step needed 256 KB of shared memory in fp32, and a 64×512 logits tile is
# 128 accumulator registers per thread). The same tile as tests/triton_tiles.py's WIDE, whose
# comment says why 16 warps.
INTERPRETER = Blocks(m=16, n=256, k=32, num_warps=16)
# Tensor descriptors: None = wherever they work (see use_descriptors); True/False forces them
# (True under the interpreter: tests run the descriptor path on the CPU).
DESCRIPTORS: Optional[bool] = None

# Candidate tables, per kernel and operand width. Every entry compiles without register spills
# and within shared memory for sm_80 and sm_90a, with plain pointers and (sm_90, half precision)
# descriptors, for bf16, fp16 and fp32, at triton 3.4, 3.6 and 3.9 (tests/compile_triton.py; its
# docstring lists the variants); ``hopper`` entries for sm_90a only, ``tma`` ones with
# descriptors only. Registers, not shared memory, bound these kernels: at 8 warps an m×n fp32 tile
# is m·n/256 accumulator registers per thread, and an epilogue that keeps more tiles of that size
# live (the logits' exponentials and running statistics; dW's old tile and its 64-bit addresses)
# spills past ~32 of them. 16 warps do not help: 512 threads get at most 128 registers each, and
# the tiles tried that way spilled too.
# Which tile spills a few bytes shifts with triton's version (its ptxas and layouts), so each
# entry below is one that none of the three spilled.
#
# dH = G·W: Hopper-sized 128×256 tiles (wgmma's widest), 3 stages and 4 on sm_90, beside 128×128
# and 64×128 ones. 128×128×64 at 4 warps is dropped: 32 B spilled on sm_80 (the 8-warp one is the
# same tile without spills).
_HALF_DH = (
    Blocks(128, 256, 64, num_warps=8, num_stages=3),
    Blocks(128, 256, 64, num_warps=8, num_stages=4, hopper=True),  # 192 KB with descriptors
    Blocks(128, 128, 64, num_warps=8, num_stages=4),
    Blocks(64, 128, 64, num_warps=4, num_stages=4),
)
# dW (+)= Gᵀ·H: the BETA epilogue adds the old dW tile, held in registers beside the accumulator.
# 128×256 spills there wherever that tile is fp32 (fp16 inputs, HYKERNELS_FP32_ACCUMULATE=1):
# 196-328 B with pointers on sm_80 and sm_90 at BLOCK_K 64 and 32 alike (only the sm_90
# descriptor path is spill-free), and 20 B for bf16 on sm_80, so it is not offered. 128×128×64
# spills 12-48 B on sm_80 at triton 3.4 (3 or 4 stages), 104-496 B at 4 warps: 128×128 runs
# with BLOCK_K 32 here, and with BLOCK_K 64 and 5 stages on sm_90 only (160 KB of shared memory
# with descriptors).
_HALF_DW = (
    Blocks(128, 128, 32, num_warps=8, num_stages=4),
    Blocks(128, 128, 64, num_warps=8, num_stages=5, hopper=True),
    Blocks(64, 128, 64, num_warps=4, num_stages=4),
)
# logits_fwd's epilogue holds the logits tile, its exponentials and running statistics at once.
# 128×64 (the 128-row tile, a 64×64 wgmma per warpgroup) and 64×128 hold 32 logits per thread;
# they read operands at m·n/(m+n) = 42.7 FLOP per byte in half precision (L2-bound). 128×128
# (64 FLOP per byte) fits on sm_90 with descriptors only: there the kept logits leave through a
# TMA store (no 64-bit address per logit) and the tile is folded into the statistics in two
# 128×64 halves; spill-free at triton 3.4, 3.6 and 3.9. With pointers it still spills with
# STORE_Z (12-144 B on sm_90, 220-1264 B on sm_80), as does 64×256 with descriptors (88 B at
# 3.6). 128×64 spills 8-24 B on sm_80 with BLOCK_K 64 at triton 3.4 and with 4 or 5 stages at
# 3.6: BLOCK_K 32 and 3 stages for it.
_HALF_FWD = (
    Blocks(128, 64, 32, num_warps=8, num_stages=3),
    Blocks(64, 128, 64, num_warps=8, num_stages=3),
    Blocks(64, 128, 64, num_warps=8, num_stages=4),
    Blocks(64, 128, 32, num_warps=8, num_stages=3),
    Blocks(128, 128, 64, num_warps=8, num_stages=3, hopper=True, tma=True),  # 160 KB with STORE_Z
)
# logits_grad: 128×128 spills with pointers (16-72 B on sm_90 at 3.4 and 3.6, also sm_80 at 3.4)
# and 64×256 spills 8-12 B at 3.4, so 128×64 and 64×128 (42.7 FLOP per operand byte); 128×128
# (64 FLOP per byte) with descriptors on sm_90, where the gradient tile leaves by a TMA store:
# spill-free at 3.4, 3.6 and 3.9.
_HALF_GRAD = (
    Blocks(128, 64, 64, num_warps=8, num_stages=3),
    Blocks(128, 64, 64, num_warps=8, num_stages=4),
    Blocks(64, 128, 32, num_warps=8, num_stages=3),
    Blocks(128, 128, 64, num_warps=8, num_stages=3, hopper=True, tma=True),
)
# fp32 dots are IEEE FMA loops (no tensor cores), register-bound: small tiles only, and ptxas
# settles some of them at 80-128 registers with a few bytes spilled. Each kernel pair has two
# tiles that spilled under none of the three triton versions: the former shared table's 64×64×32
# at 8 warps spilled 12 B in dh_gemm on sm_80, at 4 warps 470-1250 B in the logits kernels and
# 550 B in dh_gemm with descriptors; in logits_fwd 32×64×32 spills at 3.6 (4 warps, descriptors)
# and 3.9 (8 warps), 32×64×16 at 4 warps and 64×64×16 at 8 warps at 3.6; 32×64×16 and 64×32×32
# at 4 warps spill 12 B in dw_gemm at 3.9.
_FP32_LOGITS = (
    Blocks(64, 32, 32, num_warps=4, num_stages=2),
    Blocks(32, 64, 16, num_warps=8, num_stages=2),
)
_FP32_GEMM = (
    Blocks(64, 64, 16, num_warps=8, num_stages=2),
    Blocks(32, 64, 32, num_warps=4, num_stages=2),
)
TABLES = {
    "logits_fwd": (_HALF_FWD, _FP32_LOGITS),
    "logits_grad": (_HALF_GRAD, _FP32_LOGITS),
    "dh_gemm": (_HALF_DH, _FP32_GEMM),
    "dw_gemm": (_HALF_DW, _FP32_GEMM),
}
# The widest BLOCK_N of any logits candidate: vocabulary splits are multiples of it, so the
# split boundaries (and the partials the host merges) do not depend on the tuned tile.
SPLIT_ALIGN = 256


def explicit(device: torch.device) -> Optional[Blocks]:
    """The one Blocks every kernel launches with (OVERRIDE, or INTERPRETER off CUDA); None = tuned."""
    if OVERRIDE is not None:
        return OVERRIDE
    return INTERPRETER if device.type != "cuda" else None


def candidates(kernel: str, dtype: torch.dtype, capability: int, descriptors: bool = True) -> tuple[Blocks, ...]:
    """The table entries of ``kernel`` for inputs of ``dtype`` on sm_``capability``; without
    ``descriptors`` (pointer operands) those marked ``tma`` are left out."""
    half, fp32 = TABLES[kernel]
    table = fp32 if dtype == torch.float32 else half
    return tuple(b for b in table if (capability >= 90 or not b.hopper) and (descriptors or not b.tma))


def launch_options(b: Blocks) -> dict:
    """The compile options of Blocks ``b``: warps and pipeline stages."""
    return dict(num_warps=b.num_warps, num_stages=b.num_stages)


def _meta(kernel: str, b: Blocks) -> dict:
    """The constexpr tile sizes of table candidate ``b`` (every kernel in the logits geometry's names)."""
    return dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m)


def explicit_meta(kernel: str, b: Blocks) -> dict:
    """The constexpr tile sizes of an explicit Blocks (OVERRIDE, INTERPRETER): the logits tile
    m×n×k, and the same numbers in the gradient GEMMs' roles (see the module docstring)."""
    if kernel == "dh_gemm":
        return dict(BLOCK_M=b.m, BLOCK_N=b.k, BLOCK_K=b.n, GROUP_M=b.group_m)
    if kernel == "dw_gemm":
        return dict(BLOCK_M=b.n, BLOCK_N=b.k, BLOCK_K=b.m, GROUP_M=b.group_m)
    return _meta(kernel, b)


def grid(kernel: str, meta: dict) -> tuple[int]:
    """The programs of ``kernel`` for the arguments and constexprs in ``meta``: one per output
    tile, in grouped order (_tiles._grouped); logits_fwd one per row block and vocabulary split."""
    if kernel == "logits_fwd":
        return (-(-meta["N"] // meta["BLOCK_M"]) * meta["num_splits"],)
    rows, cols = {"logits_grad": ("N", "V"), "dh_gemm": ("N", "D"), "dw_gemm": ("V", "D")}[kernel]
    return (-(-meta[rows] // meta["BLOCK_M"]) * -(-meta[cols] // meta["BLOCK_N"]),)


def offered(kernel: str, dtype: torch.dtype, capability: int, sms: int, named: dict) -> tuple[Blocks, ...]:
    """The candidates tuned at the problem of arguments ``named`` on a GPU of ``sms``
    multiprocessors: those whose grid fills at least one wave (sms programs), or, where no
    candidate's does, those with the largest grid. The grid is taken at the rows rounded down
    to a power of two (_tune.rows_bucket, as the tuning key has them), so every row count that
    shares the choice gets at least that grid. A smaller grid leaves SMs idle for the whole
    kernel: dh_gemm's 128×256 tile makes 64 programs of a 512-row chunk at D=4096."""
    from ._tune import rows_bucket

    table = candidates(kernel, dtype, capability, bool(named.get("TMA")))
    at = dict(named, N=rows_bucket(named["N"]))
    size = {b: grid(kernel, {**at, **_meta(kernel, b)})[0] for b in table}
    need = min(sms, max(size.values()))
    return tuple(b for b in table if size[b] >= need)


# Per kernel: descriptor argument -> the constexprs that give its block shape.
DESCRIPTOR_BLOCKS = {
    "logits_fwd": {"H": ("BLOCK_M", "BLOCK_K"), "W": ("BLOCK_N", "BLOCK_K"), "Z": ("BLOCK_M", "BLOCK_N")},
    "logits_grad": {"H": ("BLOCK_M", "BLOCK_K"), "W": ("BLOCK_N", "BLOCK_K"), "G": ("BLOCK_M", "BLOCK_N")},
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
    """Whether a launch on these operands (the first one an input: its dtype is the kernel's)
    takes tensor descriptors. Not for fp32 inputs: their dots are IEEE FMA loops (no tensor
    cores, ~15× below the half-precision rate), so TMA saves nothing that matters, and reading
    an FMA dot's operands from the TMA's swizzled shared layout spills registers at tiles the
    pointer path compiles cleanly (dh_gemm at 16×32×256: 1132 B; dw_gemm at 512×32×16: 1084 B;
    logits_fwd at 16×512×32: 840-904 B; triton 3.9, sm_90a)."""
    if DESCRIPTORS is not None:
        return DESCRIPTORS
    t0 = tensors[0]
    if t0.device.type != "cuda" or t0.dtype == torch.float32 or torch.cuda.get_device_capability(t0.device)[0] < 9:
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


def launch(kernel: str, jit_fn, dtype: torch.dtype, device: torch.device, *args, **kwargs) -> dict:
    """Run ``jit_fn`` (named ``kernel`` in the tables) over its grid (``grid``): with OVERRIDE
    or under the interpreter at one explicit Blocks, otherwise at its tuned candidate
    (_tune.py). Returns the constexprs it ran with."""
    b = explicit(device)
    if b is not None:
        meta = explicit_meta(kernel, b)
        named = dict(zip(jit_fn.arg_names, args), **kwargs, **meta)
        _set_descriptor_blocks(kernel, named)
        jit_fn[grid(kernel, named)](*args, **kwargs, **meta, **(launch_options(b) if device.type == "cuda" else {}))
        return meta
    from . import _tune

    return _tune.launch(kernel, jit_fn, dtype, _tune.device_info(device), args, kwargs)
