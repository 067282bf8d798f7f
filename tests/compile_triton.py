"""Compile every Triton kernel ahead of time for sm_80 and sm_90a (no GPU needed).

Run as a script without TRITON_INTERPRET (interpreted functions cannot be compiled); the test
test_triton_kernels_compile_for_sm80_and_sm90 runs it in a subprocess and counts its "ok  "
lines (it computes the expected count from _configs.TABLES the same way as ``jobs`` below).

What is compiled, one line printed per compile:

- every lm_head kernel at every candidate Blocks that ``_configs.candidates(kernel, dtype, cap)``
  offers on that architecture (the ``hopper`` ones on sm_90 only), for bf16, fp16 and fp32 inputs:
  logits_fwd with STORE_Z True and False (Z a None constexpr then, as the JIT specializes it),
  logits_grad, dh_gemm, and dw_gemm with BETA True and False (the first chunk overwrites dW; the
  autotuner picks one config for both). HAS_BIAS and HAS_SOFTCAP on (the largest epilogue),
  UPCAST off (that is the interpreter's), IEEE for fp32. dW is in the dtype the backend gives it:
  fp32 for fp16, the weight's for bf16 and fp32; run with HYKERNELS_FP32_ACCUMULATE=1 for bf16
  operands with an fp32 dW (the same register shape as fp16's).
- each of those with plain pointers (TMA=False) on both architectures, and with tensor
  descriptors (TMA=True, host TensorDescriptor arguments whose block shapes come from
  _configs.DESCRIPTOR_BLOCKS) on sm_90, where the backend uses them; fp32 included, as
  _configs.use_descriptors does not exclude it.
- grad_inplace at GRAD_INPLACE (BLOCK_R = m, BLOCK_V = n, its num_warps) per dtype, and the
  segment kernels at the blocks the backend launches, PRG once per variant.

Arguments are specialized as the JIT does at aligned shapes: pointers, D and the row strides
divisible by 16 (the benchmark shapes are), so loads vectorize as they do on the GPU.

Prints each kernel's shared memory, and its registers and spill bytes from ptxas -v (the ptxas
triton ships). Fails if a kernel does not build, needs more shared memory than the architecture
has, or spills registers (spills go to local memory: slow on every GPU). The compiles run in a
process pool, one worker per CPU core (triton's compile is single-threaded): 174 compiles at the
current tables, 45-110 s from a cold cache on 2 cores (triton 3.4, 3.6 and 3.9 alike).
Works with triton 3.4 (host tensor descriptors appear there) through 3.9.
"""
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # hykernels from this checkout

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from hykernels._grad import FP32_ACCUMULATE  # noqa: E402
from hykernels._types import PRG_VARIANTS  # noqa: E402
from hykernels.backends.triton import (GRAD_INPLACE, PRG_BLOCK, PRG_LAUNCH, SEGMENT_BLOCK, _configs,  # noqa: E402
                                      _grad_gemm, _logits_fwd, _logits_grad, _segment_kernels)

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use
ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {
    "logits_fwd": _logits_fwd.logits_fwd,
    "logits_grad": _logits_grad.logits_grad,
    "dh_gemm": _grad_gemm.dh_gemm,
    "dw_gemm": _grad_gemm.dw_gemm,
    "grad_inplace": _logits_grad.grad_inplace,
    "segment_sum": _segment_kernels.segment_sum_kernel,
    "prg": _segment_kernels.prg_kernel,
}
# lm_head kernel -> its variants (name suffix, extra constexprs)
VARIANTS = {
    "logits_fwd": (("store_z", dict(STORE_Z=True)), ("", dict(STORE_Z=False, Z=None))),
    "logits_grad": (("", {}),),
    "dh_gemm": (("", {}),),
    "dw_gemm": (("beta", dict(BETA=True)), ("", dict(BETA=False))),
}
# Integer arguments specialized as divisible by 16 (besides every pointer): aligned shapes.
ALIGNED = {"D", "stride_h", "stride_w", "stride_g", "stride_z", "stride_dh", "stride_dw", "split_width"}


def arg_types(dtype: str) -> dict:
    """Every non-constexpr argument's type, by name, for inputs of ``dtype``."""
    t = "*" + dtype
    dw = "*fp32" if dtype != "fp32" and (FP32_ACCUMULATE or dtype == "fp16") else t
    f32 = "*fp32"
    return dict(H=t, W=t, B=t, G=t, DH=t, DW=dw, Y="*i64", Z=f32, M_out=f32, S_out=f32, T_out=f32, U_out=f32,
                ZY_out=f32, AM_out="*i32", LSE=f32, LSE_LO=f32, CA=f32, CB=f32, CC=f32, CD=f32,
                N="i32", V="i32", D="i32", stride_h="i32", stride_w="i32", stride_z="i32", stride_g="i32",
                stride_dh="i32", stride_dw="i32", split_width="i32", num_splits="i32",
                inv_temp="fp32", softcap="fp32", temp="fp32", alpha="fp32",
                X=f32, IDS="*i64", OUT=f32, R="i32", C=f32, OFF="*i64", GAINS=f32, SCORES=f32,
                eps="fp32", tau_g="fp32")


def jobs():
    """(name, kernel, dtype, cap, constexprs, descriptor block shapes, launch options) of every compile."""
    for dtype, torch_dtype in DTYPES.items():
        for kernel, variants in VARIANTS.items():
            for cap in ARCHS:
                for b in _configs.candidates(kernel, torch_dtype, cap):
                    meta = dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m)
                    launch = dict(num_warps=b.num_warps, num_stages=b.num_stages)
                    tile = f"{b.m}x{b.n}x{b.k} w{b.num_warps} s{b.num_stages}"
                    for tma in (False, True) if cap >= 90 else (False,):
                        descs = ({arg: [meta[r], meta[c]] for arg, (r, c) in _configs.DESCRIPTOR_BLOCKS[kernel].items()}
                                 if tma else {})
                        for suffix, extra in variants:
                            consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, **meta, UPCAST=False,
                                          IEEE=dtype == "fp32", TMA=tma, **extra)
                            name = " ".join(filter(None, (kernel, suffix, dtype, f"sm_{cap}", tile,
                                                          "tma" if tma else "ptr")))
                            yield name, kernel, dtype, cap, consts, descs, launch
        g = GRAD_INPLACE
        for cap in ARCHS:
            yield (f"grad_inplace {dtype} sm_{cap} {g.m}x{g.n} w{g.num_warps}", "grad_inplace", dtype, cap,
                   dict(HAS_SOFTCAP=True, BLOCK_R=g.m, BLOCK_V=g.n, UPCAST=False), {}, dict(num_warps=g.num_warps))
    for cap in ARCHS:
        yield f"segment_sum fp32 sm_{cap}", "segment_sum", "fp32", cap, dict(BLOCK=SEGMENT_BLOCK), {}, {}
        for i, variant in enumerate(PRG_VARIANTS):
            yield f"prg {variant} fp32 sm_{cap}", "prg", "fp32", cap, dict(VARIANT=i, BLOCK=PRG_BLOCK), {}, PRG_LAUNCH


def source(fn, dtype: str, consts: dict, descs: dict) -> ASTSource:
    """The kernel as the JIT would specialize it: every argument in the signature (constexprs as
    "constexpr"), descriptors as tensordesc<dtype[rows, cols]>, alignment as divisibility attrs."""
    types = arg_types(dtype)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # the flags this kernel has
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in descs:  # triton.runtime.jit's spelling: f"tensordesc<{dtype}{list(block_shape)}>"
            sig[arg] = f"tensordesc<{types[arg][1:]}{list(descs[arg])}>"
        else:
            sig[arg] = types[arg]
            if sig[arg].startswith("*") or arg in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


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


def compile_one(job) -> tuple[bool, str]:
    """Compile one job; (ok, the line to print)."""
    name, kernel, dtype, cap, consts, descs, launch = job
    start = time.perf_counter()
    try:
        compiled = triton.compile(source(KERNELS[kernel], dtype, consts, descs), target=GPUTarget("cuda", cap, 32),
                                  options=launch)
    except Exception as exc:  # report every failure, not just the first
        msg = str(exc).strip().splitlines()
        return False, f"FAIL {name}: {type(exc).__name__}: {msg[-1] if msg else ''}"
    shared = compiled.metadata.shared
    use = register_use(compiled.asm["ptx"], cap)
    ok = shared <= SHARED_LIMIT[cap] and (use is None or use[1] == 0)
    regs = "registers: no ptxas for this PTX" if use is None else f"{use[0]} registers, {use[1]} B spilled"
    return ok, (f"{'ok  ' if ok else 'FAIL'} {name}: shared {shared} B, {regs}, "
                f"{len(compiled.asm['cubin'])} B cubin, {time.perf_counter() - start:.1f} s")


def main() -> int:
    todo = list(jobs())
    start = time.perf_counter()
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    workers = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 16))
    failures = 0
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for ok, line in pool.map(compile_one, todo):
            failures += not ok
            print(line, flush=True)
    print(f"{len(todo) - failures} of {len(todo)} compiles ok in {time.perf_counter() - start:.0f} s "
          f"(triton {triton.__version__}, {workers} workers)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
