"""The cuda backend: its sources compile (nvcc for sm_80/sm_90a, the binding against torch's
headers), its planning is bounded, and on a GPU its kernels pass memcheck and match the
reference at a realistic shape. The shared correctness suite runs it as backend "cuda" on a GPU
and, kernels emulated, as "cuda_emulated" on CPU (tests/cuda_emulator.py)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import hykernels as hk
from hykernels._types import LogitOptions
from hykernels.backends import cuda

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted(CSRC.glob("kernels/*.cu"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}


def _nvcc():
    found = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if found is None:
        if os.environ.get("HYKERNELS_REQUIRE_NVCC") == "1":  # .ci/run: a missing nvcc must fail CI
            pytest.fail("nvcc not found, and HYKERNELS_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    return found


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_kernel_compiles_with_nvcc(arch, tmp_path):
    nvcc = _nvcc()
    assert KERNELS, "no csrc/kernels/*.cu found"
    cmds = [[nvcc, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", "-gencode", ARCHS[arch], str(src),
             "-o", str(tmp_path / f"{src.stem}.o")] for src in KERNELS]
    with ThreadPoolExecutor(len(cmds)) as pool:
        results = list(pool.map(_run, cmds))
    failed = [f"{cmd[-3]}:\n{r.stderr}" for cmd, r in zip(cmds, results) if r.returncode != 0]
    assert not failed, "\n".join(failed)


def test_binding_compiles_against_torch_headers():
    """The binding includes only torch/extension.h and kernels/hykernels.h: a host compiler
    checks it here (no CUDA toolkit needed)."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], str(CSRC)]]
    r = _run([cxx, "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=hykernels_cuda", *includes,
              str(CSRC / "hykernels_cuda.cpp")])
    assert r.returncode == 0, r.stderr[-4000:]


def test_unavailable_off_gpu_with_the_reason():
    assert cuda.availability(torch.device("cpu")) == "the cuda backend needs a CUDA device; got cpu"


@pytest.mark.parametrize("n,vocab,chunk", [(16384, 151936, None), (8192, 128256, None), (100, 32003, None),
                                           (5000, 1_000_000, None), (37, 103, 16)])
def test_plan_stays_within_the_workspace(monkeypatch, n, vocab, chunk):
    monkeypatch.setattr(cuda, "WORKSPACE_BYTES", 2 * 2**30)
    rows, cols = cuda.plan(n, vocab, LogitOptions(chunk_size=chunk))
    assert 1 <= rows <= n and 1 <= cols <= vocab
    assert rows * cuda._ld(cols) * 4 <= cuda.WORKSPACE_BYTES // cuda.LANES  # padded rows included
    assert cuda._ld(cols) % cuda.VEC == 0 and (cols == vocab or cols % cuda.VEC == 0)  # aligned slices
    if chunk is None and rows < n:
        assert rows % cuda.ROW_ALIGN == 0
    if vocab * 4 * min(n, cuda.ROW_ALIGN) <= cuda.WORKSPACE_BYTES // cuda.LANES:
        assert cols == vocab  # whole rows fit: the single-pass 6·N·D·V path


def test_small_workspace_forces_several_slices(monkeypatch):
    monkeypatch.setattr(cuda, "WORKSPACE_BYTES", 2 * 4 * 16 * 50)
    assert cuda.plan(37, 103, LogitOptions(chunk_size=16)) == (16, 48)  # 50 fit; slices are multiples of 4


def test_bench_shape_memory_model():
    """At N=16384, D=4096, V=151936 bf16 the default workspace fits two 640-row whole-vocabulary
    chunks (the 6·N·D·V path) in 768 MiB, and bf16 gradients need no fp32 accumulators: the extra
    memory above the returned gradients is the workspace plus O(N + V), under the 1 GiB target."""
    assert cuda.WORKSPACE_BYTES == 768 * 2**20 or "HYKERNELS_CUDA_WORKSPACE_MB" in os.environ
    rows, cols = cuda.plan(16384, 151936, LogitOptions())
    assert (rows, cols) == (640, 151936)
    assert cuda.LANES * rows * cols * 4 <= cuda.WORKSPACE_BYTES < 2**30


@pytest.mark.parametrize("dtype,fp32_acc,expect", [(torch.bfloat16, False, (False, False)),
                                                    (torch.bfloat16, True, (False, True)),
                                                    (torch.float16, False, (True, True)),
                                                    (torch.float32, False, (False, False))])
def test_gradient_accumulators(monkeypatch, dtype, fp32_acc, expect):
    """dH/dW go straight into the returned gradients unless fp16 (range) or HYKERNELS_FP32_ACCUMULATE."""
    import cuda_emulator

    module = cuda_emulator.load()
    monkeypatch.setattr(module, "FP32_ACCUMULATE", fp32_acc)
    h, w, y = torch.randn(37, 19, dtype=dtype), torch.randn(103, 19, dtype=dtype), torch.randint(0, 103, (37,))
    x = module._Inputs(h, w, None, y, LogitOptions(chunk_size=16))
    grads = module._Grads(x, w, None, (True, True, False))
    assert (grads.dh_fp32, grads.dw_fp32) == expect
    assert grads.dw.dtype == (torch.float32 if expect[1] else dtype)


def test_fp32_accumulate_opt_in_is_exact_enough(monkeypatch, rng):
    """HYKERNELS_FP32_ACCUMULATE=1: one rounding at the end, so bf16 dW is the fp32 sum rounded."""
    import cuda_emulator

    module = cuda_emulator.load()
    h = torch.randn(37, 19, generator=rng).bfloat16().requires_grad_()
    w = torch.randn(103, 19, generator=rng).bfloat16().requires_grad_()
    y = torch.randint(0, 103, (37,), generator=rng)
    gold_w = w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h.detach().double() @ gold_w.T, y, reduction="sum").backward()
    for fp32_acc in (False, True):
        monkeypatch.setattr(module, "FP32_ACCUMULATE", fp32_acc)
        w.grad = None
        loss, _ = hk.fused_loss(h, w, y, rd_weight=1.0, backend="cuda_emulated", chunk_size=4)
        loss.backward()
        err = (w.grad.double() - gold_w.grad).abs().max().item() / gold_w.grad.abs().max().item()
        assert err < (2e-2 if not fp32_acc else 8e-3), (fp32_acc, err)


def test_wheel_ships_the_sources(tmp_path):
    """pip install . needs no GPU; the sources travel inside the package for the first-use build."""
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
              str(ROOT)])
    assert r.returncode == 0, r.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("hykernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for src in ["hykernels_cuda.cpp", "kernels/hykernels.h", *(f"kernels/{k.name}" for k in KERNELS)]:
        assert f"hykernels/_csrc/{src}" in names



# ------------------------------------------ tile traffic: the host's flags (kernels emulated)

TRANSFORMS = {"identity": {}, "bias": {"bias": True}, "softcap": {"softcap": 5.0}, "temperature": {"temperature": 0.7},
              "all": {"bias": True, "softcap": 5.0, "temperature": 0.7}}


def _flag_case(rng, dtype, transform):
    n, d, v = 21, 16, 103  # an odd vocabulary: padded rows (ld 104) and a 3-column scalar tail
    h = (torch.randn(n, d, generator=rng) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=rng) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=rng)
    y[::5] = -100
    opts = dict(TRANSFORMS[transform])
    if opts.pop("bias", False):  # a view one element in: not 16-byte aligned, the backend realigns it
        opts["bias"] = torch.randn(v + 1, generator=rng).to(dtype)[1:].requires_grad_()
    return h, w, y, opts


def _run_op(op, backend, h, w, y, opts):
    """(outputs, gradients) of fused_loss or token_stats + its backward."""
    leaves = [h, w, *([opts["bias"]] if "bias" in opts else [])]
    for x in leaves:
        x.grad = None
    if op == "fused_loss":
        loss, st = hk.fused_loss(h, w, y, rd_weight=0.05, entropy_weight=0.01, backend=backend, chunk_size=8, **opts)
        outs = [loss, st.logp, st.entropy]
    else:
        st = hk.token_stats(h, w, y, backend=backend, chunk_size=8, **opts)
        loss = st.logp.sum() + 0.1 * st.entropy.sum() + 0.01 * st.self_certainty.sum()
        outs = [st.logp, st.entropy, st.self_certainty]
    loss.backward()
    return [o.detach().float() for o in outs], [x.grad.float() for x in leaves]


@pytest.mark.parametrize("sliced", [False, True], ids=["whole_rows", "sliced"])
@pytest.mark.parametrize("op", ["fused_loss", "token_stats"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_is_written_back_only_when_the_transform_changes_it(monkeypatch, rng, dtype, transform, op, sliced):
    """The flags cuda.py passes to the epilogues, checked against the emulated kernels, which
    follow the tile contract to the letter (tests/cuda_emulator.py):
    - fused_loss's single pass stores z back (write_back) only with a softcap, and its gradient
      pass then reads the tile as z (transformed); under the identity transform the GEMM output
      already is z; a bias or τ ≠ 1 alone, logit_grad applies the transform to the raw tile again;
    - token_stats never stores z; its backward (and the sliced fused_loss) recomputes the tile and
      has logit_grad apply the transform, unless it is the identity;
    - every launch gets a layout the vector kernels take (16-byte-aligned rows and bias);
    and the numbers match the reference, so a transform applied twice or not at all fails here."""
    import cuda_emulator

    module = cuda_emulator.load()
    if sliced:  # rows do not fit the workspace: fused_loss takes its recompute path
        monkeypatch.setattr(module, "WORKSPACE_BYTES", cuda_emulator.sliced_workspace(8, 103, slices=3))
    h, w, y, opts = _flag_case(rng, dtype, transform)
    calls = cuda_emulator.FakeExtension.calls
    calls.clear()
    outs, grads = _run_op(op, "cuda_emulated", h, w, y, opts)
    launches = list(calls)
    ref_outs, ref_grads = _run_op(op, "reference", h, w, y, opts)

    identity = transform == "identity"
    stats = [c for c in launches if c["kernel"] == "logit_stats"]
    grad = [c for c in launches if c["kernel"] == "logit_grad"]
    assert stats and grad and all(c["identity"] == identity for c in launches)
    single_pass = op == "fused_loss" and not sliced
    softcap = "softcap" in TRANSFORMS[transform]
    assert {c["write_back"] for c in stats} == {single_pass and softcap}, stats
    assert {c["transformed"] for c in grad} == {(single_pass and softcap) or identity}, grad
    assert all(c["vector"] and c["ld"] % 4 == 0 for c in launches), launches
    assert {c["cols"] for c in launches} == ({103} if not sliced else {36, 31})

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out0", "out1", "out2", "dh", "dw", "db"), ref_outs + ref_grads, outs + grads):
        a, b = a.nan_to_num(posinf=0.0), b.nan_to_num(posinf=0.0)  # ignored rows
        err = ((a - b).abs().max() / a.abs().max().clamp(min=1e-6)).item()
        assert err < tol, (name, err)


def test_fused_loss_without_gradients_writes_nothing_back(rng):
    """No gradient pass follows: z is never read again, so even a transform is not stored."""
    import cuda_emulator

    cuda_emulator.load()
    h, w, y, opts = _flag_case(rng, torch.float32, "all")
    calls = cuda_emulator.FakeExtension.calls
    calls.clear()
    with torch.no_grad():
        hk.fused_loss(h, w, y, rd_weight=0.05, backend="cuda_emulated", chunk_size=8, **opts)
    assert [(c["kernel"], c["write_back"]) for c in calls] == [("logit_stats", False)] * 3


def test_emulated_epilogues_keep_the_tile_contract(rng):
    """The emulator itself (what the tests above lean on): logit_stats leaves the tile bit for bit
    unless write_back, then it holds z; logit_grad on the raw tile (transformed = False) equals
    logit_grad on z (transformed = True), and on the raw tile read as z it differs."""
    import cuda_emulator

    ext = cuda_emulator.FakeExtension
    rows, cols = 5, 13
    raw = torch.randn(rows, cols, generator=rng) * 3
    bias, inv_temp, softcap = torch.randn(cols, generator=rng), 1 / 0.7, 4.0
    y = torch.randint(0, cols, (rows,), generator=rng)
    f32 = [torch.empty(rows) for _ in range(5)]

    def stats(tile, write_back):
        ext.logit_stats(tile, 0, bias, inv_temp, softcap, write_back, y, *f32, torch.empty(rows, dtype=torch.int64), 0)

    tile = raw.clone()
    stats(tile, False)
    assert torch.equal(tile, raw)
    stats(tile, True)
    z = cuda_emulator._transform(raw, bias, inv_temp, softcap)
    assert torch.equal(tile, z)

    coefs = [torch.randn(rows, generator=rng) for _ in range(6)]

    def grad(tile, transformed):
        ext.logit_grad(tile, 0, bias, inv_temp, softcap, transformed, y, *coefs, 0, 0)
        return tile

    assert torch.equal(grad(raw.clone(), False), grad(z.clone(), True))
    assert not torch.allclose(grad(raw.clone(), True), grad(z.clone(), True))


def test_tile_bytes_per_logit():
    """The HBM bytes per logit stated in cuda.py's docstring and csrc/README.md."""
    tb = cuda.tile_bytes_per_logit
    assert tb(True, 2, write_back=True) == 18  # fused_loss bf16 before (always written back); now with a transform
    assert tb(True, 2) == 14 and tb(True, 4) == 16  # fused_loss, identity transform: bf16, fp32
    assert tb(True, 4, write_back=True) == 20
    assert tb(True) == 8  # token_stats; fused_loss with no gradient needed
    assert tb(False, 2) == 10 and tb(False, 4) == 12  # token_stats backward (recomputed tile)
    assert tb(True) + tb(False, 2) == 18  # fused_loss when a row does not fit: two tiles


# ----------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_auto_picks_cuda_on_a_gpu():
    from hykernels import backends

    from hykernels.backends import _dense

    assert _dense.fp32_output_gemm_error(torch.device("cuda", torch.cuda.current_device())) is None
    assert backends.resolve("auto", torch.device("cuda"), torch.bfloat16).NAME == "cuda"


@pytest.mark.gpu
def test_side_streams_are_created_once():
    """Each new CUDA stream gets a cuBLAS handle and workspace of its own: calls must reuse them."""
    h = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    streams = None
    for _ in range(3):
        loss, _ = hk.fused_loss(h, w, y, rd_weight=1 / 300, backend="cuda", chunk_size=64)
        loss.backward()
        current = [s.cuda_stream for s in cuda._STREAMS[torch.cuda.current_device()]]
        assert streams is None or current == streams
        streams = current


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_realistic_shape_matches_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 1000, 1024, 50257
    h = (torch.randn(n, d, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    out = {}
    for backend in ("reference", "cuda"):
        h.grad = w.grad = None
        loss, st = hk.fused_loss(h, w, y, rd_weight=1.0 / n, entropy_weight=0.01, softcap=30.0, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), st.logp, st.entropy, h.grad.float(), w.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("loss", "logp", "entropy", "dh", "dw"), out["reference"], out["cuda"]):
        scale = a.abs().max().clamp(min=1e-6)
        assert ((a - b).abs().max() / scale).item() < tol, name


MEMCHECK = textwrap.dedent("""
    import torch, hykernels as hk
    from hykernels.backends import cuda
    cuda.WORKSPACE_BYTES = 2 * 4 * 24 * 40  # several vocabulary slices per chunk
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(37, 19, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(103, 19, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(103, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, 103, (37,), device="cuda"); y[::3] = -100
        for ws in (2 * 4 * 24 * 40, 2**24):
            cuda.WORKSPACE_BYTES = ws
            st = hk.token_stats(h, w, y, bias=b, softcap=5.0, temperature=0.7, backend="cuda", chunk_size=24)
            (st.logp.sum() + st.entropy.sum() + st.self_certainty.sum()).backward()
            loss, _ = hk.fused_loss(h, w, y, bias=b, rd_weight=0.1, backend="cuda", chunk_size=24)
            loss.backward()
            hk.answer_span_logprobs(h, w, y.clamp(min=0), torch.arange(37, device="cuda") % 5, 5, backend="cuda")
            hk.prg_gains(torch.randn(9, device="cuda"), torch.tensor([0, 4, 5, 9], device="cuda"), backend="cuda")
    torch.cuda.synchronize()
    print("memcheck-case-done")
""")


@pytest.mark.gpu
def test_compute_sanitizer_memcheck_is_clean():
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    cuda._ext()  # build outside the sanitizer
    r = _run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", MEMCHECK])
    assert r.returncode == 0 and "memcheck-case-done" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr


# --------------------------------------------------------------- the epilogues' compiled code

MIN_LOADS_IN_FLIGHT = 4  # 128-bit tile loads a thread issues before the first one's value is used
EPILOGUES = CSRC / "kernels" / "logit_epilogues.cu"


def _cuobjdump(nvcc: str) -> str:
    """cuobjdump beside nvcc, on PATH, or the copy triton ships (triton/backends/nvidia/bin)."""
    candidates = [Path(nvcc).parent / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton.backends.nvidia as tn

        candidates.append(Path(tn.__file__).parent / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    if os.environ.get("HYKERNELS_REQUIRE_NVCC") == "1":
        pytest.fail("cuobjdump not found (CUDA toolkit or triton's bundled copy), and HYKERNELS_REQUIRE_NVCC=1")
    pytest.skip("cuobjdump not found")


def _sass_functions(sass: str) -> dict:
    """{mangled name: [(address, instruction)]} from ``cuobjdump -sass``."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and name is not None:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def _loops(instrs) -> list:
    """[(first, last) address] of every loop: a branch back to an address at or before it."""
    loops = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    return loops


_TILE_LOAD = re.compile(r"\bLDG\.E\.128(?!\.CONSTANT)\b")  # .CONSTANT: the read-only bias loads


def _loads_before_first_use(body) -> int:
    """128-bit tile loads issued before the first instruction that reads the first one's registers."""
    loads = [i for i, (_, t) in enumerate(body) if _TILE_LOAD.search(t)]
    if not loads:
        return 0
    first = int(re.search(r"LDG\S*\s+R(\d+)", body[loads[0]][1]).group(1))
    regs = {f"R{first + i}" for i in range(4)}
    for i, (_, text) in enumerate(body[loads[0] + 1:], start=loads[0] + 1):
        op = re.sub(r"^@!?P\w+\s+", "", text)
        mnemonic, _, operands = op.partition(" ")
        sources = operands if mnemonic.startswith("ST") else operands.partition(",")[2]
        if regs & set(re.findall(r"\bR\d+\b", sources)):
            return sum(1 for j in loads if j < i)
    return len(loads)


def _check_epilogue_sass(src: Path, arch: str, tmp_path: Path) -> list[str]:
    """What is wrong with the compiled logit_stats / logit_grad kernels that cuda.py's aligned
    tiles launch (every instantiation but the kVector = false scalar fallbacks): each must have a
    main loop with ≥ MIN_LOADS_IN_FLIGHT 128-bit global loads of the tile issued before the first
    one is used, and 16-byte (fp32) or 8-byte (4 × bf16/fp16) stores in it; no epilogue kernel may
    touch local memory (ptxas -v: no stack frame, no spills; no LDL/STL in the SASS)."""
    nvcc = _nvcc()
    cubin = tmp_path / f"{src.stem}_{arch}.cubin"
    r = _run([nvcc, "-cubin", "-std=c++17", "-O3", "-gencode", ARCHS[arch], "-Xptxas", "-v", str(src), "-o",
              str(cubin)])
    assert r.returncode == 0, r.stderr[-4000:]
    problems = []
    props = re.findall(r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads", r.stdout + r.stderr)
    for name, stack, spill_st, spill_ld in props:
        if "logit_" in name and (stack, spill_st, spill_ld) != ("0", "0", "0"):
            problems.append(f"{name}: {stack} B stack frame, {spill_st} B spill stores, {spill_ld} B spill loads")
    dump = _run([_cuobjdump(nvcc), "-sass", str(cubin)])
    assert dump.returncode == 0, dump.stderr[-4000:]
    functions = _sass_functions(dump.stdout)
    epilogues = {n: ins for n, ins in functions.items() if re.search(r"logit_(stats|grad)_kernel", n)}
    vector = {n: ins for n, ins in epilogues.items() if "Lb0E" not in n}  # Lb0E: template kVector = false
    kinds = sorted(re.search(r"logit_(stats|grad)_kernel", n).group(1) for n in vector)
    if kinds != ["grad"] * 3 + ["stats"]:
        problems.append(f"expected 1 logit_stats and 3 logit_grad (fp32, bf16, fp16) kernels, got {kinds}")
    for name, ins in epilogues.items():
        local = [t for _, t in ins if re.match(r"(@!?P\w+\s+)?(LDL|STL)\b", t)]
        if local:
            problems.append(f"{name}: local memory {local[:3]}")
    for name, ins in vector.items():
        bodies = [[(a, t) for a, t in ins if lo <= a <= hi] for lo, hi in _loops(ins)]
        main = max(bodies, key=lambda b: sum(bool(_TILE_LOAD.search(t)) for _, t in b), default=[])
        in_flight = _loads_before_first_use(main)
        if in_flight < MIN_LOADS_IN_FLIGHT:
            problems.append(f"{name}: {in_flight} 128-bit tile loads in flight in its main loop "
                            f"(< {MIN_LOADS_IN_FLIGHT}); loads in it: "
                            f"{sorted({t.split()[0] for _, t in main if 'LDG' in t})}")
        narrow = re.search(r"logit_grad_kernelI(13__nv_bfloat16|6__half)", name)
        store = "STG.E.64" if narrow else "STG.E.128"
        if not any(re.search(rf"\b{re.escape(store)}\b", t) for _, t in main):
            problems.append(f"{name}: no {store} in its main loop")
    return problems


@pytest.mark.parametrize("arch", list(ARCHS))
def test_epilogues_compile_to_vector_loads_without_local_memory(arch, tmp_path):
    problems = _check_epilogue_sass(EPILOGUES, arch, tmp_path)
    assert not problems, "\n".join(problems)


SCALAR_EPILOGUES = """
// The shape of the scalar epilogues before vectorisation: one 4-byte load per element and step.
#include <cuda_bf16.h>
__global__ void logit_stats_kernel(float* z, int n, float* out) {
  float s = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) { const float x = z[j]; z[j] = 2.f * x; s += expf(x); }
  out[threadIdx.x] = s;
}
template <typename Out>
__global__ void logit_grad_kernel(float* z, int n) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) reinterpret_cast<Out*>(z)[j] = Out(expf(z[j]));
}
template __global__ void logit_grad_kernel<float>(float*, int);
template __global__ void logit_grad_kernel<__nv_bfloat16>(float*, int);
template __global__ void logit_grad_kernel<__half>(float*, int);
"""


def test_sass_check_rejects_scalar_epilogues(tmp_path):
    """The check above fails on epilogues shaped like the scalar ones it replaced."""
    src = tmp_path / "scalar_epilogues.cu"
    src.write_text(SCALAR_EPILOGUES)
    problems = _check_epilogue_sass(src, "sm_90a", tmp_path)
    assert sum("128-bit tile loads in flight" in p for p in problems) == 4, problems


@pytest.mark.gpu
def test_gemm_writes_the_padded_tile_in_place():
    """cuda._tile's rows are padded to a multiple of 4 columns; ATen must hand that view to cuBLAS
    as it is (ldc = ld), not GEMM into a contiguous temporary and copy it over."""
    h = torch.randn(70, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(50257, 64, device="cuda", dtype=torch.bfloat16)
    work = torch.empty(70 * cuda._ld(50257), device="cuda")
    tile = cuda._tile(work, 70, 50257)
    assert tile.stride(0) == 50260 and tile.data_ptr() % 16 == 0
    cuda._gemm_logits(tile, h, w)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda._gemm_logits(tile, h, w)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not any("copy" in k.lower() or "elementwise" in k.lower() for k in kernels), kernels
    torch.testing.assert_close(tile, h.float() @ w.float().T, rtol=2e-2, atol=2e-2)
