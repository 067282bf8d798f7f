"""A controlled ablation of HyTuning against its parts, small enough for a 2-core CPU.

task.py (chained arithmetic with step-by-step traces), model.py (a tiny Llama and its supervised
warm-up), arms.py (RD only on the few curated traces and on 10× as many, RLIF only, a fixed
RD + RLIF mix, HyTuning with PRG toward each rollout's own answer or its group's majority, and
GRPO with the true reward as a ceiling), evaluate.py (accuracy and calibration of generated
answers), run.py (seeds × arms, JSON and figures, PRG's signal, paired comparisons) and
fingerprint.py (a short rerun that tells whether a machine computes what the committed run
computed). Run it with ``python -m hykernels experiment``.
"""
from .run import run

__all__ = ["run"]
