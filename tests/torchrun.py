"""Run an examples/ recipe under torchrun for the tests: 2 CPU ranks, this checkout's hykernels.

torch's gloo teardown sometimes aborts a rank after the script has finished: the recipe prints
its last line ("ok"), then the rank dies at interpreter exit with "terminate called without an
active exception" (SIGABRT). We saw this in about 1 run of 10 of vocab_parallel_torchrun.py on
2 cores, even with a barrier before destroy_process_group. The abort happens after every
collective and check, so it says nothing about hykernels. A run that failed only that way is run
once more; any other failure is returned at once.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEARDOWN_ABORT = "terminate called without an active exception"


def finished_then_aborted(r: subprocess.CompletedProcess) -> bool:
    lines = r.stdout.strip().splitlines()
    return r.returncode != 0 and lines[-1:] == ["ok"] and TEARDOWN_ABORT in r.stdout + r.stderr


def torchrun(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    for _ in range(2):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": path})
        if not finished_then_aborted(r):
            return r
    return r
