"""The README's main job and the python/ recipes run as they are."""
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_agrees():
    r = subprocess.run([sys.executable, "-m", "hykernels", "demo"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> OK" in r.stdout and "| torch_chunked |" in r.stdout


def test_info_lists_backends():
    r = subprocess.run([sys.executable, "-m", "hykernels", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "torch_chunked  available" in r.stdout


def test_plain_pytorch_loop_learns():
    main = runpy.run_path(str(ROOT / "python" / "plain_pytorch_loop.py"))["main"]
    losses = main(["--steps", "25"])
    assert losses[-1] < 0.7 * losses[0]
