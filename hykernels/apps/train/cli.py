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

The text flags ``--answer_cue`` and ``--step_delimiter`` read escapes (``\\n``, ``\\t``, ...) as a
double-quoted YAML string does, so ``--answer_cue '\\nAnswer: '`` on a shell means what the YAML's
``answer_cue: "\\nAnswer: "`` means. ``--reward_funcs`` and ``--answer_fn`` name Python functions as
``module:function`` (or ``module.function``; the working directory is importable).
"""
from __future__ import annotations

import importlib
import json
import os
import re
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
    reward_funcs: Optional[list[str]] = field(default=None, metadata={
        "help": "Reward functions as module:function (TRL reward functions: f(prompts, completions, **columns) -> "
                "list of floats or None), or self_certainty (the default) or a trl.rewards name; several are "
                "summed with reward_weights."})
    answer_fn: Optional[str] = field(default=None, metadata={
        "help": "module:function, f(completion_text) -> str | None, finding a rollout's (and an evaluation "
                "response's) answer instead of the answer cue."})


def trace_token_counts(tokenizer, cue: str):
    """Per trace record, its tokens as HyTuningTrainer counts them against its cap: the prompt as
    TRL tokenizes it, then reasoning, answer cue and answer as their one encoding splits them."""
    from ...hytuning import encode_answer

    def count(record: dict) -> dict:
        parts = encode_answer(tokenizer, record["reasoning"], cue, record["answer"].strip())
        return {"prompt": len(data.prompt_ids(tokenizer, record["prompt"])),
                **{name: len(ids) for name, ids in zip(("reasoning", "answer cue", "answer"), parts)}}
    return count


ESCAPED_FLAGS = ("answer_cue", "step_delimiter")  # text flags whose escapes are read as YAML reads them


def given_on_command_line(argv, name: str) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def unescape(flag: str, value: str) -> str:
    """``value`` read as the inside of a double-quoted YAML string ("\\n" a newline)."""
    import yaml

    try:
        return yaml.safe_load('"' + re.sub(r'(?<!\\)"', r'\\"', value) + '"')
    except yaml.YAMLError as e:
        raise data.InputError(f"--{flag} {value!r}: not a valid escaped string ({e.problem})") from None


def load_function(spec: str, flag: str):
    """The function ``module:function`` (or ``module.function``) names, the working directory importable.

    Raises:
        InputError: Naming the flag and what was not found.
    """
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise data.InputError(f"--{flag} {spec}: expected module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise data.InputError(f"--{flag} {spec}: cannot import module {module_name} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise data.InputError(f"--{flag} {spec}: module {module_name} has no function {name}")
    return function


def reward_functions(specs) -> Optional[list]:
    """--reward_funcs as HyTuningTrainer takes them: "self_certainty" as it is, trl.rewards names
    and module:function specs as functions; None for the default (self-certainty)."""
    if not specs:
        return None
    import trl.rewards

    return [spec if spec == "self_certainty" else
            getattr(trl.rewards, spec) if ":" not in spec and "." not in spec and hasattr(trl.rewards, spec) else
            load_function(spec, "reward_funcs") for spec in specs]


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


def parse(config_cls, argv=None) -> tuple:
    """(TrainArguments, config, ModelConfig) of ``argv``: YAML first, flags over it; the escapes
    of ESCAPED_FLAGS given on the command line read as YAML reads a double-quoted string."""
    argv = sys.argv[1:] if argv is None else list(argv)
    script, config, model_args = parser(config_cls).parse_args_and_config(argv)
    for name in ESCAPED_FLAGS:
        if given_on_command_line(argv, name):
            setattr(config, name, unescape(name, getattr(config, name)))
    return script, config, model_args


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
    for path, records in ((script.traces, traces), (script.queries, queries), (script.eval_queries, evals or [])):
        data.check_chat_template(path, records, tokenizer, script.model)
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
    return dict(peft_config=get_peft_config(model_args), quantization_config=get_quantization_config(model_args),
                reward_funcs=reward_functions(script.reward_funcs),
                answer_fn=load_function(script.answer_fn, "answer_fn") if script.answer_fn else None)


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
                                 batch_size=config.per_device_eval_batch_size, answer_fn=options.get("answer_fn"))

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

    from ...integrations.trl import HyTuningTrainer, HyTuningTrainerConfig

    try:
        script, config, model_args = parse(HyTuningTrainerConfig, argv)
        options = model_options(script, config, model_args)
        inputs = load_inputs(script, config)
    except (ValueError, TypeError, NotImplementedError, OSError, yaml.YAMLError) as e:  # InputError too
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(script, config, options, HyTuningTrainer, *inputs)
