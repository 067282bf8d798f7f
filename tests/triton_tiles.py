"""The explicit Blocks the tests launch the triton kernels with (set as _configs.OVERRIDE).

One source for tests/conftest.py, the triton test files and tests/compile_triton.py, which
compiles every one of them (and _configs.INTERPRETER) in each kernel's role
(_configs.explicit_meta) for sm_80 and sm_90a and fails on a spill or on shared memory over the
architecture's limit: the gpu-marked tests and the whole suite run with these overrides on a GPU.
tests/test_triton_compile.py fails if a test sets an OVERRIDE whose tile is not listed here.
``splits`` is the number of vocabulary splits (no effect on what compiles).
"""
from hykernels.backends.triton._configs import Blocks

# Small ragged tiles: many partial tiles and several splits on the suite's shapes. 4 warps: at 8
# (4 logits per thread) triton 3.9's ptxas spilled 8-28 B in logits_fwd for sm_80.
SMALL = Blocks(m=16, n=64, k=16, splits=3, num_warps=4)
# The 32k vocabulary of the suite's realistic_vocab shape: fewer, wider tiles keep the
# interpreter fast (its cost is per program and per step); the same tile as
# _configs.INTERPRETER. It was 16×1024×16, which a GPU cannot run: dh_gemm steps over the
# vocabulary n at a time, and a 1024-deep fp32 K step needs 262,160 B of shared memory
# (sm_90 has 232,448 B); its logits kernels spilled 28-1984 B, and each compile took ~20 s.
# 16 warps (8 logits per thread): at 8, ptxas aimed logits_fwd at 128 registers (two 256-thread
# blocks per SM) and spilled 8 B at triton 3.6 (bf16 with STORE_Z and descriptors, fp32 on
# sm_80); allowed 255 registers (maxnreg) the fp32 kernels spilled 8-24 B instead.
WIDE = Blocks(m=16, n=256, k=32, splits=3, num_warps=16)
# Narrow vocabulary tiles: up to 7 splits of a 221-entry vocabulary (test_triton.py), the
# vocabulary-parallel shards of tests/dist_worker.py.
NARROW = Blocks(m=16, n=32, k=16, splits=2)
OVERRIDES = (SMALL, WIDE, NARROW)


def tile(b: Blocks) -> tuple:
    """What a Blocks compiles to (everything but the vocabulary splits)."""
    return b.m, b.n, b.k, b.num_warps, b.num_stages, b.group_m
