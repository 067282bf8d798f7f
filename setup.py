"""Pure-Python install (all metadata lives in pyproject.toml).

The CUDA sources in csrc/ are optional: the cuda backend builds them with ninja on first use
on a CUDA machine. A pip install never needs a GPU or nvcc.
"""
from setuptools import setup

setup()
