"""``python -m hykernels train``: HyTuning from files (a model directory and JSONL traces and queries).

data.py reads and checks the JSONL files and the model directory (every error names the file, the
line and the field, before any model loads), evaluate.py scores the model's own answers (accuracy
and calibration, before and after training) and cli.py is the command: TRL's argument parser over
``HyTuningTrainerConfig``, a ``--config`` YAML, the trainer, ``metrics.jsonl`` and ``eval.json``.
The package imports without TRL (cli.py imports it when the command runs); the command needs
``pip install "hykernels[trl]"`` and says so without it.
"""
