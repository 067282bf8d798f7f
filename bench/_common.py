"""Helpers shared by the bench scripts: the machine and versions a result was measured with, and
peak host memory read from the kernel (Linux /proc).

Host memory method (CPU runs): after the inputs exist, freed heap pages are handed back to the OS
(malloc_trim), the RSS high-water mark is reset by writing ``5`` to /proc/self/clear_refs, VmRSS is
read as the baseline, the measured region runs, and peak extra = VmHWM - baseline. Each
measurement should run in a fresh process so earlier work leaves nothing in the allocator.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# memory (Linux /proc)
# --------------------------------------------------------------------------------------------

def proc_status_kib(*fields: str):
    """``kB`` fields of /proc/self/status (VmRSS, VmHWM, ...) from one read: an int for one
    field, a tuple for several; None for a field not there (no /proc)."""
    values = dict.fromkeys(fields)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values[fields[0]] if len(fields) == 1 else tuple(values[k] for k in fields)


# The kernel's RSS counters are per-CPU and approximate (off by up to a batch of pages per CPU),
# so right after a reset VmHWM may read a little above VmRSS.
_HWM_SLACK_KIB = 2048


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    for _ in range(3):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        # The reset takes effect immediately; confirm it did (HWM must now be RSS, up to slack).
        hwm, rss = proc_status_kib("VmHWM", "VmRSS")
        if hwm is not None and rss is not None and hwm <= rss + _HWM_SLACK_KIB:
            return True
    return False


def trim_malloc() -> None:
    """Return freed heap pages to the OS so the baseline RSS is live data only."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HostPeak:
    """Peak RSS above the RSS at ``start()``: ``start(); ...; extra = stop()`` (bytes).

    ``method`` says how it was read; without a writable clear_refs it falls back to ru_maxrss
    (the lifetime peak, which earlier work in the process may inflate)."""

    def start(self) -> None:
        self.clear_refs_ok = reset_hwm()
        self.baseline_kib = proc_status_kib("VmRSS")
        if self.clear_refs_ok:
            self.method = "VmHWM - VmRSS baseline after writing 5 to /proc/self/clear_refs"
        else:
            self.method = ("FALLBACK: /proc/self/clear_refs not writable; ru_maxrss - VmRSS baseline "
                           "(ru_maxrss is the lifetime peak, so earlier work in the process may inflate it)")

    def stop(self) -> int:
        if self.clear_refs_ok:
            self.peak_kib = proc_status_kib("VmHWM")
        else:
            import resource
            self.peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self.baseline_kib is None:  # no /proc at all
            self.baseline_kib, self.method = 0, self.method + " (no /proc/self/status: baseline 0)"
        return (self.peak_kib - self.baseline_kib) * 1024


class PeakMemory:
    """Peak memory above what was in use at ``start()``, on ``device``: ``start(); ...; extra =
    stop()`` (bytes), ``method`` saying how it was read. CUDA: torch.cuda.max_memory_allocated
    after a synchronize and a peak reset, less memory_allocated then (``peak_total`` keeps the
    absolute peak). CPU: the RSS high-water mark (HostPeak) after returning freed heap pages."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated at the start (peak stats reset)"
        else:
            trim_malloc()
            self.host = HostPeak()
            self.host.start()

    def stop(self) -> int:
        import torch

        if self.device.type == "cuda":
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
            return self.peak_total - self.base
        extra = self.host.stop()
        self.method = self.host.method
        return extra


# --------------------------------------------------------------------------------------------
# machine and versions
# --------------------------------------------------------------------------------------------

def lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_device_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "kind": "cpu",
        "platform_processor": platform.processor(),
        "lscpu_model_name": lscpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "mem_total_bytes": mem_total_bytes(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None (never imports it)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of this checkout (with ``+dirty`` when the tree has changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def versions(*extra_dists: str) -> dict:
    """python, torch, triton, hykernels, plus each of ``extra_dists`` (None where not installed)."""
    import torch

    import hykernels

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - triton is optional here
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "hykernels": hykernels.__version__,
    }
    for dist in extra_dists:
        out[dist] = package_version(dist)
    return out


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------

def fmt_mib(b) -> str:
    if b is None:
        return "-"
    m = b / 2**20
    return f"{m:.0f}" if abs(m) >= 10 else f"{m:.2f}"


def fmt_sec(t: float) -> str:
    return f"{t:.2f}" if t >= 1 else f"{t:.4f}"
