"""Compile every Triton kernel ahead of time for sm_80 and sm_90a (no GPU needed).

Run as a script without TRITON_INTERPRET (interpreted functions cannot be compiled); the test
test_triton_kernels_compile_for_sm80_and_sm90 runs it in a subprocess and counts its "ok  "
lines (it computes the expected counts from _configs.TABLES and tests/triton_tiles.py the same
way as ``jobs`` below). ``python tests/compile_triton.py REGEX`` compiles only the jobs whose
name matches REGEX.

What is compiled, one line printed per compile:

- every lm_head kernel at every candidate Blocks that ``_configs.candidates(kernel, dtype, cap)``
  offers on that architecture (the ``hopper`` ones on sm_90 only), for bf16, fp16 and fp32 inputs:
  logits_fwd with STORE_Z True and False (Z a None constexpr then, as the JIT specializes it),
  logits_grad, dh_gemm, and dw_gemm with BETA True and False (the first chunk overwrites dW;
  BETA is in the tuning key, so each is tuned on its own). HAS_BIAS and HAS_SOFTCAP on (the
  largest epilogue), UPCAST off (that is the interpreter's), IEEE for fp32. dW is in the dtype
  the backend gives it: fp32 for fp16, the weight's for bf16 and fp32; run with
  HYKERNELS_FP32_ACCUMULATE=1 for bf16 operands with an fp32 dW (the same register shape as fp16's).
- the same for every explicit Blocks the tests set as _configs.OVERRIDE (tests/triton_tiles.py)
  and for _configs.INTERPRETER, each kernel at its role's constexprs (_configs.explicit_meta):
  the gpu-marked tests and the whole suite run on a GPU with those overrides.
- each of those with plain pointers (TMA=False) on both architectures (not the candidates
  marked ``tma``, which are offered to descriptor launches only), and with tensor descriptors
  (TMA=True, host TensorDescriptor arguments whose block shapes come from
  _configs.DESCRIPTOR_BLOCKS, the logits kernels' outputs Z and G included) on sm_90 for bf16
  and fp16, where the backend uses them (_configs.use_descriptors: not for fp32).
- grad_inplace at GRAD_INPLACE and at each explicit Blocks (grad_inplace_blocks: BLOCK_R = m,
  BLOCK_V = n, at most 8 warps, as fused_loss launches it) per dtype, and the segment kernels at the blocks the
  backend launches, PRG once per variant.

Arguments are specialized as the JIT does at aligned shapes: pointers, D and the row strides
divisible by 16 (the benchmark shapes are), so loads vectorize as they do on the GPU.

Prints each kernel's shared memory, and its registers and spill bytes from ptxas -v (the ptxas
triton ships). Fails if a kernel does not build, needs more shared memory than the architecture
has, or spills registers (spills go to local memory: slow on every GPU).

Main loop on Hopper (``main_loop``): for every tuned bf16/fp16 candidate with descriptors on
sm_90a, the innermost loop that issues the kernel's wgmma must also issue its operand loads by
TMA and no pointer loads, read from the SASS (nvdisasm, which triton ships) and from the PTX:
HGMMA and UTMALDG (wgmma.mma_async, cp.async.bulk.tensor), no HMMA (mma.sync), LDG or LDGSTS
(ld.global, cp.async). So no change can fall back to mma.sync or to pointer loads unnoticed. The
same check must reject the sm_80 build (mma.sync) and the sm_90a pointer build (cp.async) of each
kernel's first bf16 candidate: a check that accepted them would prove nothing (those lines say
"rejected").

The compiles run in a process pool, one worker per CPU core (triton's compile is
single-threaded): 330 compiles at the current tables and test tiles (162 of them at the
explicit test tiles), about 160 s from a cold cache on this 2-core CI machine at triton 3.9
(82 s before the test tiles and the main-loop check). Works with triton 3.4 (host tensor
descriptors appear there) through 3.9.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_tiles

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from hykernels._grad import FP32_ACCUMULATE  # noqa: E402
from hykernels._types import PRG_VARIANTS  # noqa: E402
from hykernels.backends.triton import (GRAD_INPLACE, PRG_BLOCK, PRG_LAUNCH, SEGMENT_BLOCK, _configs,  # noqa: E402
                                      _grad_gemm, _logits_fwd, _logits_grad, _segment_kernels,
                                      grad_inplace_blocks)
from kernel_asm import PTX, SASS, main_loop  # noqa: E402
from triton_tiles import OVERRIDES, tile  # noqa: E402

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


def explicit_tiles() -> list:
    """The explicit Blocks the tests launch with, and INTERPRETER, one per distinct tile."""
    seen = {}
    for b in (*OVERRIDES, _configs.INTERPRETER):
        seen.setdefault(tile(b), b)
    return list(seen.values())


def _lm_head(dtype: str, cap: int, kernel: str, b, meta: dict, tag: str, control: bool = False):
    """The jobs of one lm_head kernel at one Blocks: pointers, and descriptors on sm_90, per
    variant; ``control``: its pointer builds are negative controls of the main-loop check."""
    launch = _configs.launch_options(b)
    tile_name = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{b.num_warps} s{b.num_stages}"
    half = dtype != "fp32"
    # Descriptors on sm_90 for half-precision inputs (_configs.use_descriptors); a ``tma`` entry
    # is offered to descriptor launches only.
    for tma in ((False,) if not b.tma else ()) + ((True,) if cap >= 90 and half else ()):
        descs = ({arg: [meta[r], meta[c]] for arg, (r, c) in _configs.DESCRIPTOR_BLOCKS[kernel].items()}
                 if tma else {})
        # The tuned half-precision candidates' main loop: HGMMA + TMA with descriptors on sm_90a;
        # the check must reject the mma.sync (sm_80) and cp.async (pointer) builds of one of them.
        check = ("hopper" if tma else "reject" if control else None) if tag == "" and half else None
        for suffix, extra in VARIANTS[kernel]:
            consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, **meta, UPCAST=False, IEEE=not half, TMA=tma, **extra)
            name = " ".join(filter(None, (kernel, suffix, dtype, f"sm_{cap}", tag, tile_name,
                                          "tma" if tma else "ptr")))
            yield name, kernel, dtype, cap, consts, descs, launch, check


def jobs():
    """(name, kernel, dtype, cap, constexprs, descriptor block shapes, launch options, main-loop
    check) of every compile."""
    for dtype, torch_dtype in DTYPES.items():
        for kernel in VARIANTS:
            for cap in ARCHS:
                for i, b in enumerate(_configs.candidates(kernel, torch_dtype, cap)):
                    control = dtype == "bf16" and i == 0
                    yield from _lm_head(dtype, cap, kernel, b, _configs._meta(kernel, b), "", control)
                for b in explicit_tiles():
                    yield from _lm_head(dtype, cap, kernel, b, _configs.explicit_meta(kernel, b), "explicit")
        # fused_loss launches grad_inplace at GRAD_INPLACE, or at an explicit Blocks' m rows × n columns
        for g, tag in ((GRAD_INPLACE, ""), *((grad_inplace_blocks(b), "explicit") for b in explicit_tiles())):
            for cap in ARCHS:
                name = " ".join(filter(None, ("grad_inplace", dtype, f"sm_{cap}", tag, f"{g.m}x{g.n} w{g.num_warps}")))
                yield (name, "grad_inplace", dtype, cap, dict(HAS_SOFTCAP=True, BLOCK_R=g.m, BLOCK_V=g.n, UPCAST=False),
                       {}, dict(num_warps=g.num_warps), None)
    for cap in ARCHS:
        yield f"segment_sum fp32 sm_{cap}", "segment_sum", "fp32", cap, dict(BLOCK=SEGMENT_BLOCK), {}, {}, None
        for i, variant in enumerate(PRG_VARIANTS):
            yield (f"prg {variant} fp32 sm_{cap}", "prg", "fp32", cap, dict(VARIANT=i, BLOCK=PRG_BLOCK), {},
                   PRG_LAUNCH, None)


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


def sass(cubin: bytes) -> str | None:
    """nvdisasm's SASS of ``cubin`` (None without the nvdisasm triton ships)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not tool.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([str(tool), "-c", str(path)], capture_output=True, text=True)
    return run.stdout if run.returncode == 0 else None


def check_main_loop(compiled, check: str) -> tuple[bool, str]:
    """(ok, what the main-loop check found): ``check`` "hopper" must pass, "reject" must fail."""
    found = {"ptx": main_loop(compiled.asm["ptx"], PTX)}
    code = sass(compiled.asm["cubin"])
    if code is not None:
        found["sass"] = main_loop(code, SASS)
    if check == "hopper":
        bad = {k: v for k, v in found.items() if v}
        return not bad, (f"main loop: HGMMA + TMA ({'+'.join(found)})" if not bad else
                         "main loop: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    missed = [k for k, v in found.items() if v is None]
    return not missed, ("main loop rejected: " + "; ".join(f"{k}: {v}" for k, v in found.items()) if not missed
                        else f"main loop check accepted a non-TMA/mma.sync build ({'+'.join(missed)})")


def compile_one(job) -> tuple[bool, str]:
    """Compile one job; (ok, the line to print)."""
    name, kernel, dtype, cap, consts, descs, launch, check = job
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
    loop = ""
    if check:
        loop_ok, found = check_main_loop(compiled, check)
        ok, loop = ok and loop_ok, f", {found}"
    return ok, (f"{'ok  ' if ok else 'FAIL'} {name}: shared {shared} B, {regs}, "
                f"{len(compiled.asm['cubin'])} B cubin{loop}, {time.perf_counter() - start:.1f} s")


def main() -> int:
    todo = [j for j in jobs() if len(sys.argv) < 2 or re.search(sys.argv[1], j[0])]
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
