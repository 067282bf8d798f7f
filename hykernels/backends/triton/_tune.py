"""Autotuning of the lm_head kernels on a GPU (``_configs.launch`` without an explicit Blocks).

Why not ``triton.autotune``: its key is a list of argument values plus the dtypes of tensor
arguments, so tensor descriptors' dtypes and any flag not listed fall out of it; its
``restore_value`` clones arguments by name, which a TensorDescriptor cannot do; and configs
with a ``pre_hook`` (needed to give descriptors their block shape per config) make it skip its
disk cache, so every process and every rank benchmarked every candidate again (~10-20 s).

Here, per launch:

1. The key (``key``) holds everything a candidate's validity, speed or result depends on
   besides the device: the kernel, D and V, the rows rounded down to a power of two
   (``rows_bucket``: chunk sizes repeat, and a varying batch should not retune per row count),
   the vocabulary splits, every constexpr the caller passes (BETA, TMA, STORE_Z, HAS_BIAS,
   HAS_SOFTCAP, UPCAST, IEEE), the dtype of every operand (a descriptor's from its base
   tensor; dW is fp32 or bf16 for bf16 inputs), and whether each stride is a multiple of 16
   elements (the JIT specializes on that). With the device's name and capability it picks the
   remembered choice, in this process and (``cache_dir``) on disk.
2. On a miss, the candidates are those ``_configs.offered`` at this problem on this GPU (a grid
   of at least one wave of programs where any candidate has one); with more than one, each is
   benchmarked (``triton.testing.do_bench``) and the fastest kept. A kernel whose launch reads
   its output back (dw_gemm with BETA adds into dW) has that output copied before and restored
   after every candidate's benchmark, so tuning never changes the result (``RESTORE``).
3. The choice is written to ``cache_dir()/triton-<kernel>-<hash>.json`` (the full key inside,
   written to a temporary file and renamed, so a reader sees a whole file or none), keyed also
   by triton's version, the device's name and capability and a hash of the kernels' sources. A
   later process (another run, another rank) launches it without benchmarking. A file that
   cannot be read, or names a config that is not a current candidate, is ignored with a warning
   and replaced. Ranks that start together on a cold cache still each tune once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _configs
from ._configs import Blocks

CACHE_FORMAT = 1
# kernel -> (output argument read back by the launch, the constexpr that makes it read back)
RESTORE = {"dw_gemm": ("DW", "BETA")}
# Integer arguments that enter the key exactly (the rest by rows_bucket or divisibility by 16).
EXACT = ("D", "V", "num_splits")
# Sources whose change can change the best config (the kernels and the shared tile code).
SOURCES = ("_tiles.py", "_logits_fwd.py", "_logits_grad.py", "_grad_gemm.py")

_memory: dict[tuple, Blocks] = {}  # (device name, capability, key) -> chosen candidate


@dataclass(frozen=True)
class Device:
    name: str
    capability: int  # major·10 + minor
    sms: int
    cuda: bool = True  # launch options (num_warps, num_stages) are passed on CUDA only


def device_info(device: torch.device) -> Device:
    props = torch.cuda.get_device_properties(device)
    return Device(props.name, props.major * 10 + props.minor, props.multi_processor_count)


def rows_bucket(n: int) -> int:
    """``n`` rounded down to a power of two (1 for n < 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def cache_dir() -> Optional[Path]:
    """$HYKERNELS_CACHE_DIR (empty: no disk cache), else $XDG_CACHE_HOME/hykernels, else
    ~/.cache/hykernels."""
    env = os.environ.get("HYKERNELS_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hykernels"


def _dtype(value) -> Optional[str]:
    """The element type of a tensor or tensor-descriptor argument; None for anything else."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    base = getattr(value, "base", None)  # triton.tools.tensor_descriptor.TensorDescriptor
    if isinstance(base, torch.Tensor) and hasattr(value, "block_shape"):
        return "desc:" + str(base.dtype).replace("torch.", "")
    return None


def key(kernel: str, arg_names, named: dict) -> tuple:
    """The tuning key of a launch of ``kernel`` with arguments ``named`` (see the module docstring)."""
    parts = [kernel]
    for name in arg_names:
        if name not in named:  # the tuned constexprs (BLOCK_*, GROUP_M)
            continue
        value = named[name]
        dtype = _dtype(value)
        if dtype is not None:
            parts.append(f"{name}:{dtype}")
        elif value is None:
            parts.append(f"{name}:none")
        elif isinstance(value, bool):
            parts.append(f"{name}={int(value)}")
        elif isinstance(value, int):
            if name == "N":
                parts.append(f"N~{rows_bucket(value)}")
            elif name in EXACT:
                parts.append(f"{name}={value}")
            else:
                parts.append(f"{name}%16={int(value % 16 == 0)}")
        # floats (α, 1/τ, the softcap) change no config's validity or speed
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _disk_key(dev: Device, k: tuple) -> str:
    import triton

    return json.dumps([CACHE_FORMAT, triton.__version__, dev.name, dev.capability, source_hash(), list(k)])


def _path(kernel: str, disk_key: str) -> Optional[Path]:
    d = cache_dir()
    return None if d is None else d / f"triton-{kernel}-{hashlib.sha256(disk_key.encode()).hexdigest()[:24]}.json"


def read_cached(kernel: str, dtype: torch.dtype, dev: Device, k: tuple) -> Optional[Blocks]:
    """The candidate a previous process chose at this key and device, if its file is sound."""
    disk_key = _disk_key(dev, k)
    path = _path(kernel, disk_key)
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != disk_key:
            raise ValueError("its key differs (a hash collision or an edited file)")
        b = Blocks(**data["config"])
        if b not in _configs.candidates(kernel, dtype, dev.capability):
            raise ValueError(f"{b} is not a candidate of {kernel} any more")
        return b
    except Exception as exc:  # any damage: tune again and replace the file
        warnings.warn(f"hykernels: ignoring the tuning cache file {path}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return None


def write_cached(kernel: str, dev: Device, k: tuple, b: Blocks, timings: dict) -> Optional[Path]:
    """Store the choice atomically (a temporary file in the same folder, then os.replace)."""
    disk_key = _disk_key(dev, k)
    path = _path(kernel, disk_key)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(key=disk_key, config=asdict(b), timings_ms=timings), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only or full disk: tune again next process
        warnings.warn(f"hykernels: could not write the tuning cache file {path}: {exc}", RuntimeWarning,
                      stacklevel=3)
        return None
    return path


def run(kernel: str, jit_fn, b: Blocks, dev: Device, args, kwargs) -> dict:
    """Launch ``jit_fn`` at candidate ``b``; the constexprs it ran with."""
    meta = _configs._meta(kernel, b)
    named = {**dict(zip(jit_fn.arg_names, args)), **kwargs, **meta}
    _configs._set_descriptor_blocks(kernel, named)
    opts = _configs.launch_options(b)
    jit_fn[_configs.grid(kernel, named)](*args, **kwargs, **meta, **(opts if dev.cuda else {}))
    return dict(meta, **opts)


def _restored(kernel: str, named: dict) -> list[torch.Tensor]:
    out, flag = RESTORE.get(kernel, (None, None))
    if out is None or not named.get(flag):
        return []
    value = named[out]
    return [value if isinstance(value, torch.Tensor) else value.base]


def tune(kernel: str, jit_fn, dtype: torch.dtype, dev: Device, args, kwargs,
         bench: Optional[Callable[[Callable[[], None]], float]] = None) -> tuple[Blocks, dict]:
    """Benchmark the candidates offered here; (the fastest, {candidate: ms})."""
    named = {**dict(zip(jit_fn.arg_names, args)), **kwargs}
    offered = _configs.offered(kernel, dtype, dev.capability, dev.sms, named)
    if len(offered) == 1:
        return offered[0], {}
    if bench is None:
        from triton.testing import do_bench as bench
    restore = _restored(kernel, named)
    saved = [t.clone() for t in restore]
    times, errors = {}, []
    for b in offered:
        try:
            times[b] = bench(lambda: run(kernel, jit_fn, b, dev, args, kwargs))
        except Exception as exc:  # a candidate that does not build here: skip it, say so
            errors.append(f"{b}: {type(exc).__name__}: {exc}")
            times[b] = math.inf
        finally:
            for t, s in zip(restore, saved):
                t.copy_(s)
    best = min(offered, key=lambda b: times[b])
    if errors:
        msg = f"hykernels: {kernel} candidates failed on {dev.name}: " + "; ".join(errors)
        if math.isinf(times[best]):
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return best, {str(b): t for b, t in times.items()}


def launch(kernel: str, jit_fn, dtype: torch.dtype, dev: Device, args, kwargs, bench=None) -> dict:
    """Launch ``kernel`` at its remembered, cached or freshly tuned candidate."""
    named = {**dict(zip(jit_fn.arg_names, args)), **kwargs}
    k = key(kernel, jit_fn.arg_names, named)
    where = (dev.name, dev.capability, k)
    b = _memory.get(where)
    if b is None:
        b = read_cached(kernel, dtype, dev, k)
        if b is None:
            b, timings = tune(kernel, jit_fn, dtype, dev, args, kwargs, bench)
            write_cached(kernel, dev, k, b, timings)
        _memory[where] = b
    return run(kernel, jit_fn, b, dev, args, kwargs)
