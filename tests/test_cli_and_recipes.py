"""The README's main job and the python/ recipes run as they are."""
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_agrees(tmp_path):
    """The README's main job on the tiny model (the SmolLM2 run takes minutes: run by hand)."""
    r = subprocess.run([sys.executable, "-m", "hykernels", "demo", "--tiny", "--steps", "2", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("| trace | steps | PRG |", "| step | loss | λ |", "| held-out | accuracy", "-> OK"):
        assert line in r.stdout
    assert (tmp_path / "hykernels-demo-reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_lists_backends():
    r = subprocess.run([sys.executable, "-m", "hykernels", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "torch_chunked  available" in r.stdout


def test_plain_pytorch_loop_learns():
    main = runpy.run_path(str(ROOT / "python" / "plain_pytorch_loop.py"))["main"]
    losses = main(["--steps", "25"])
    assert losses[-1] < 0.7 * losses[0]
