"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Run as a script without TRITON_INTERPRET (interpreted functions cannot be compiled); the test
test_triton_kernels_compile runs it in a subprocess. Prints each kernel's shared memory, and its
registers and spill bytes from ptxas -v (the ptxas triton ships). Fails if a kernel does not
build, needs more shared memory than the architecture has, or spills registers at the
configuration the backend launches (spills go to local memory: slow on every GPU).
Works with triton 3.2 (ASTSource(constants=...)) through 3.9 (ASTSource(constexprs=...)).
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from hykernels._types import PRG_VARIANTS  # noqa: E402
from hykernels.backends.triton import (PRG_BLOCK, PRG_LAUNCH, SEGMENT_BLOCK, _kernels,  # noqa: E402
                                      _segment_kernels, gpu_blocks)

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use


def signatures(dtype: str):
    t = "*" + dtype
    scalars = dict(N="i32", V="i32", D="i32", stride_h="i32", stride_w="i32", inv_temp="fp32", softcap="fp32")
    fwd = dict(H=t, W=t, B=t, Y="*i64", M_out="*fp32", S_out="*fp32", T_out="*fp32", U_out="*fp32",
               ZY_out="*fp32", AM_out="*i32", **scalars, tiles_per_split="i32")
    bwd = dict(H=t, W=t, B=t, Y="*i64", LSE="*fp32", LSE_LO="*fp32", CA="*fp32", CB="*fp32", CC="*fp32",
               CD="*fp32", DH="*fp32", DW="*fp32", DB="*fp32", **scalars)
    return fwd, bwd


def logits_jobs():
    """(name, kernel, signature, constexprs, launch options) of the two lm_head kernels per dtype."""
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        blocks = gpu_blocks(torch_dtype)  # the tiles the backend launches with on a GPU
        fwd, bwd = signatures(dtype)
        common = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
                      UPCAST=False, IEEE=dtype == "fp32")
        launch = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        yield f"stats_fwd {dtype}", _kernels.stats_fwd, fwd, common, launch
        yield (f"logits_bwd {dtype}", _kernels.logits_bwd, bwd, dict(common, NEED_DH=True, NEED_DW=True, NEED_DB=True),
               launch)


def segment_jobs():
    """The segment kernels with the blocks the backend launches, PRG once per variant."""
    seg = dict(X="*fp32", IDS="*i64", OUT="*fp32", R="i32")
    yield "segment_sum fp32", _segment_kernels.segment_sum_kernel, seg, dict(BLOCK=SEGMENT_BLOCK), {}
    prg = dict(C="*fp32", OFF="*i64", GAINS="*fp32", SCORES="*fp32", eps="fp32", tau_g="fp32")
    for i, variant in enumerate(PRG_VARIANTS):
        yield f"prg {variant} fp32", _segment_kernels.prg_kernel, prg, dict(VARIANT=i, BLOCK=PRG_BLOCK), PRG_LAUNCH


def source(fn, sig: dict, consts: dict) -> ASTSource:
    try:  # triton >= 3.3
        return ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError:  # triton 3.2: constants, with constexprs named in the signature
        return ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constants=consts)


def register_use(ptx: str, cap: int) -> tuple[int, int] | None:
    """(registers per thread, spill-store bytes) from ptxas -v on ``ptx``, or None if no ptxas
    that triton ships reads this PTX version (triton 3.9 needs its ptxas-blackwell)."""
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for tool in ("ptxas", "ptxas-blackwell"):
            if not (bindir / tool).is_file():
                continue
            run = subprocess.run([str(bindir / tool), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", run.stderr)
            if run.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores", run.stderr)
                return int(regs.group(1)), int(spills.group(1)) if spills else 0
    return None


def main() -> int:
    failures = 0
    for name, fn, sig, consts, launch in (*logits_jobs(), *segment_jobs()):
        for cap in (80, 90):
            try:
                compiled = triton.compile(source(fn, sig, consts), target=GPUTarget("cuda", cap, 32), options=launch)
            except Exception as exc:  # report every failure, not just the first
                print(f"FAIL {name} sm_{cap}: {type(exc).__name__}: {exc}")
                failures += 1
                continue
            shared = compiled.metadata.shared
            use = register_use(compiled.asm["ptx"], cap)
            ok = shared <= SHARED_LIMIT[cap] and (use is None or use[1] == 0)
            failures += not ok
            regs = "registers: no ptxas for this PTX" if use is None else f"{use[0]} registers, {use[1]} B spilled"
            print(f"{'ok  ' if ok else 'FAIL'} {name} sm_{cap}: shared {shared} B, {regs}, "
                  f"{len(compiled.asm['cubin'])} B cubin")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
