"""The HyTuning method on top of the kernels: PRG probes (more in later modules)."""
from .probes import (ProbeBatch, ProbeTrace, build_probes, find_step_ends, merge_steps, separate_probes,
                     step_delimiters)

__all__ = ["ProbeBatch", "ProbeTrace", "build_probes", "find_step_ends", "merge_steps", "separate_probes",
           "step_delimiters"]
