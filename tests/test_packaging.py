"""The dependency metadata: `pip install hykernels` must keep the triton a CUDA torch pins.

torch 2.11.0+cu130 (the H200 machines) pins triton 3.6.0; CI's CPU torch 2.13.0 takes the newest
triton from the `test` extra. A requirement that excluded either would make pip replace the
user's triton (or refuse to install). tests/compile_triton.py compiles the kernels with the
installed triton (CI: the newest); 3.4.0 and 3.6.0 were checked with it by hand.
"""
import sys
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (package, versions a user's environment may already hold) that every requirement must admit
MUST_ADMIT = {"triton": ("3.4.0", "3.6.0", "3.8.0", "3.9.0"), "torch": ("2.11.0+cu130", "2.13.0", "2.13.0+cpu")}


def _project() -> dict:
    if sys.version_info < (3, 11):
        tomllib = pytest.importorskip("tomli")
    else:
        import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(groups):
    project = _project()
    for group in groups:
        deps = project["dependencies"] if group == "core" else project["optional-dependencies"][group]
        for text in deps:
            yield group, Requirement(text)


def test_core_dependencies_do_not_pin_triton():
    """A CUDA torch brings its own triton; the core install must not ask for another."""
    names = [r.name for _, r in _requirements(["core"])]
    assert "triton" not in names, f"core dependencies name triton: {names}"


@pytest.mark.parametrize("group", ["core", "triton", "test", "hf", "trainer", "bench"])
def test_requirements_admit_the_stacks_in_use(group):
    for _, req in _requirements([group]):
        for version in MUST_ADMIT.get(req.name, ()):
            assert req.specifier.contains(version, prereleases=True), \
                f"[{group}] {req} excludes {req.name} {version}, which a supported environment holds"
