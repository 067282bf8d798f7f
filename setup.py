"""Install hykernels; the CUDA extension is optional (metadata lives in pyproject.toml).

- ``pip install .``: pure Python, no GPU, nvcc or torch needed at build time. The csrc/ sources
  ship inside the package (hykernels/_csrc) and the cuda backend builds them with ninja on first
  use on a CUDA machine (cached by torch.utils.cpp_extension).
- ``HYKERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``: also compiles the extension
  now (as flash-attention's setup.py does), against the torch already installed; set
  TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0a") to choose the GPUs.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as hykernels/_csrc, for the first-use build."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "hykernels" / "_csrc"
        if CSRC.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("*.o", "README.md"))


def cuda_extension():
    if os.environ.get("HYKERNELS_BUILD_CUDA", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = ["csrc/hykernels_cuda.cpp", *sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.glob("kernels/*.cu"))]
    ext = CUDAExtension("hykernels._cuda_ext", sources, include_dirs=[str(CSRC)],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return dict(ext_modules=[ext], cmdclass={"build_py": BuildPyWithSources, "build_ext": BuildExtension})


setup(**{"cmdclass": {"build_py": BuildPyWithSources}, **cuda_extension()})
