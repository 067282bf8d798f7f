"""``python -m hykernels train``: HyTuning on a local model from JSONL traces and queries.

Every ``HyTuningTrainerConfig`` field (TRL's ``GRPOConfig`` and the HyTuning ones) and every
``trl.ModelConfig`` field (dtype, attn_implementation, LoRA) is a flag, parsed as TRL's own scripts
parse them (``TrlParser``); ``--config FILE.yaml`` sets any of them (and the script's own), and
flags on the command line override the file. The inputs are checked first (data.py): bad input
exits with status 2 and one message on stderr, before any model loads. Then the trainer loads the
model, trains (the Trainer's progress bar, checkpoints as ``save_strategy``/``save_steps`` say),
appends every log dict to ``OUTPUT_DIR/metrics.jsonl``, saves the final model and tokenizer in
``OUTPUT_DIR``, and with ``--eval-queries`` scores the model's own answers before and after
(evaluate.py) into ``OUTPUT_DIR/eval.json``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import data

PROG = "python -m hykernels train"
INSTALL = 'python -m hykernels train needs TRL: pip install "hykernels[trl]"'
EXIT_BAD_INPUT = 2
EXIT_MISSING_TRL = 1


@dataclass
class TrainArguments:
    """The command's own arguments (the trainer's are HyTuningTrainerConfig's fields)."""

    model: str = field(metadata={"help": "A local directory holding the model and its tokenizer (save_pretrained)."})
    traces: str = field(metadata={"help": "JSONL of curated traces: prompt, reasoning, answer on every line."})
    queries: str = field(metadata={"help": "JSONL of RLIF queries: prompt on every line."})
    eval_queries: Optional[str] = field(default=None, metadata={
        "help": "JSONL of held-out questions (prompt, answer): accuracy, ECE, Brier and AUROC of the model's own "
                "greedy answers before and after training, printed and written to OUTPUT_DIR/eval.json."})
    eval_max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "Tokens each evaluation answer may generate (default: max_completion_length)."})


def trace_token_counts(tokenizer, cue: str):
    """Per trace record, its tokens as HyTuningTrainer counts them against its cap: the prompt as
    TRL tokenizes a text prompt, then reasoning, answer cue and answer, each encoded on its own."""
    def count(record: dict) -> dict:
        plain = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"prompt": len(tokenizer(record["prompt"])["input_ids"]), "reasoning": plain(record["reasoning"]),
                "answer cue": plain(cue), "answer": plain(record["answer"])}
    return count


TRACE_CAP = "max_prompt_length + max_completion_length"


def parser(config_cls):
    """TRL's parser over TrainArguments, ``config_cls`` and trl.ModelConfig; ``--output-dir`` is
    required (the YAML may give it)."""
    from trl import ModelConfig, TrlParser

    p = TrlParser((TrainArguments, config_cls, ModelConfig), prog=PROG,
                  description="HyTuning (RD on curated traces + RLIF on queries, weighed by PRG) from JSONL files. "
                              "Every HyTuningTrainerConfig (GRPOConfig) and ModelConfig field is a flag; "
                              "--config FILE.yaml sets any of them, flags override it.")
    for action in p._actions:
        if action.dest == "output_dir":
            action.required = True

    def error(message):  # one line, not argparse's usage of every flag
        print(f"{PROG}: error: {message} ({PROG} --help lists the flags)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    p.error = error
    return p


def metrics_logger(path: Path, append: bool):
    """A TrainerCallback writing each log dict (with its step) as one JSON line to ``path``."""
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and not append:
                path.write_text("")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsJsonl()


def load_inputs(script: TrainArguments, config):
    """(tokenizer, traces, queries, eval records or None), every one checked; no model loaded."""
    data.check_model_dir(script.model)
    traces = data.read_jsonl(script.traces, data.TRACE_FIELDS, flag="--traces")
    queries = data.read_jsonl(script.queries, data.QUERY_FIELDS, flag="--queries")
    evals = (data.read_jsonl(script.eval_queries, data.EVAL_FIELDS, flag="--eval-queries")
             if script.eval_queries else None)
    tokenizer = data.load_tokenizer(script.model)
    data.check_lengths(script.traces, traces, trace_token_counts(tokenizer, config.answer_cue),
                       config.max_prompt_length + config.max_completion_length, TRACE_CAP)
    return tokenizer, traces, queries, evals


def model_options(script: TrainArguments, config, model_args) -> dict:
    """What TRL's own grpo script derives from ModelConfig: the model's init kwargs (into
    ``config.model_init_kwargs``, whose own entries win), and the peft and quantization configs."""
    from trl import get_peft_config, get_quantization_config

    if model_args.model_name_or_path not in (None, script.model):
        raise data.InputError(f"--model_name_or_path {model_args.model_name_or_path}: give the model with "
                              f"--model (here {script.model})")
    init = dict(revision=model_args.model_revision, trust_remote_code=config.trust_remote_code,
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    config.model_init_kwargs = {**init, **(config.model_init_kwargs or {})}
    return dict(peft_config=get_peft_config(model_args), quantization_config=get_quantization_config(model_args))


def run(script: TrainArguments, config, options: dict, trainer_cls, tokenizer, traces, queries, evals) -> int:
    """Build the trainer (it loads the model), evaluate, train, save, evaluate again."""
    from datasets import Dataset

    from .evaluate import evaluate, table

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = trainer_cls(model=script.model, args=config, train_dataset=Dataset.from_list(queries),
                          trace_dataset=Dataset.from_list(traces), processing_class=tokenizer, **options)
    trainer.add_callback(metrics_logger(out / "metrics.jsonl", append=bool(config.resume_from_checkpoint)))
    results = {}

    def score(when: str):
        if evals is None or not trainer.accelerator.is_main_process:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        results[when] = evaluate(model, tokenizer, evals, cue=config.answer_cue,
                                 max_new_tokens=script.eval_max_new_tokens or config.max_completion_length,
                                 batch_size=config.per_device_eval_batch_size)

    score("before training")
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    score(f"after {trainer.state.global_step} steps")
    if results:
        print(f"\n{script.eval_queries}: {len(evals)} questions, the model's own greedy answers\n{table(results)}")
        report = {"eval_queries": script.eval_queries, "answer_cue": config.answer_cue, **results}
        (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    """Run the command; returns the exit status (2: bad input, 1: TRL missing)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return EXIT_MISSING_TRL
    import yaml

    from ..integrations.trl import HyTuningTrainer, HyTuningTrainerConfig

    try:
        script, config, model_args = parser(HyTuningTrainerConfig).parse_args_and_config(argv)
        options = model_options(script, config, model_args)
        inputs = load_inputs(script, config)
    except (ValueError, TypeError, NotImplementedError, OSError, yaml.YAMLError) as e:  # InputError too
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(script, config, options, HyTuningTrainer, *inputs)
