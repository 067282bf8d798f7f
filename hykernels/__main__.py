"""Command line: `python -m hykernels demo | experiment | train | info`.

demo, experiment and train are applications (hykernels/apps/), imported only when their command
runs; info reports the library itself."""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info() -> int:
    from . import __version__, backends

    print(f"hykernels {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}")
    for name in backends.NAMES:
        reason = backends.availability(name, device)
        print(f"  {name:14s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # TRL's own parser takes the rest (every trainer config field is a flag)
        from .apps.train.cli import main as train

        return train(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m hykernels")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="HyTuning end to end: its effect on a tiny model, then the kernels on a real one (CPU, offline)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=40, help="post-training steps of part 1 (HyTuning and RLIF alone)")
    demo.add_argument("--warmup-steps", type=int, default=400,
                      help="supervised warm-up steps of part 1's base model (ModelConfig.warmup_steps)")
    demo.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    demo.add_argument("--out-dir", default=".", help="where the reliability diagram PNG goes")
    experiment = sub.add_parser("experiment", help="the ablation: RD, RLIF, RD + RLIF, HyTuning (CPU, offline)")
    from .apps.experiment.run import add_arguments

    add_arguments(experiment)
    sub.add_parser("train", add_help=False,
                   help='HyTuning on a local model from JSONL traces and queries (needs pip install "hykernels[trl]"); '
                        'python -m hykernels train --help lists its flags')
    sub.add_parser("info", help="versions and which backends can run here")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .apps import demo

        return demo.main(seed=args.seed, tiny=args.tiny, steps=args.steps, warmup_steps=args.warmup_steps,
                          out_dir=args.out_dir)
    if args.command == "experiment":
        from .apps.experiment.run import from_args

        return from_args(args)
    return _info()


if __name__ == "__main__":
    sys.exit(main())
