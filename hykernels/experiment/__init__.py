"""A controlled ablation of HyTuning against its parts, small enough for a 2-core CPU.

task.py (chained arithmetic with step-by-step traces), model.py (a tiny Llama and its supervised
warm-up), arms.py (RD only, RLIF only, a fixed RD + RLIF mix, HyTuning, and GRPO with the true
reward as a ceiling), evaluate.py (accuracy and calibration of generated answers) and run.py
(seeds × arms, JSON and figures). Run it with ``python -m hykernels experiment``.
"""
from .run import run

__all__ = ["run"]
