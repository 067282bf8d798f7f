"""The inputs of ``python -m hykernels train``, read and checked before any model loads.

A JSONL file holds one JSON object per line, every line (no blank ones). Each object needs the
fields its role lists below, as strings; ``prompt`` and ``answer`` must not be empty or blank.
Other fields are kept (TRL passes query columns on to reward functions).

- ``--traces``: ``prompt``, ``reasoning``, ``answer`` (curated traces for RD and PRG);
- ``--queries``: ``prompt`` (unlabelled prompts for the RLIF rollouts);
- ``--eval-queries``: ``prompt``, ``answer`` (held-out questions with their gold answer).

Every error is an ``InputError`` whose message starts with ``FILE:LINE:`` and names the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

TRACE_FIELDS = ("prompt", "reasoning", "answer")
QUERY_FIELDS = ("prompt",)
EVAL_FIELDS = ("prompt", "answer")
NOT_BLANK = ("prompt", "answer")  # reasoning may be empty: a trace of no steps

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class InputError(ValueError):
    """Bad input to ``python -m hykernels train``; the message names the file, the line and the field."""


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_jsonl(path, fields: Sequence[str], *, flag: str) -> list[dict]:
    """The records of a JSONL file, each checked to hold ``fields`` as strings (``prompt`` and
    ``answer`` not blank). Record i is on line i + 1.

    Args:
        path: The file.
        fields: The fields every line needs.
        flag: The command-line flag that named the file, for the message when it is missing.

    Raises:
        InputError: Naming the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    need = ", ".join(fields)
    records = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            raise InputError(f"{where}: empty line (every line is one JSON object with {need})")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object with {need}, got {_json_type(record)}")
        for field in fields:
            if field not in record:
                raise InputError(f"{where}: field '{field}' is missing (every line needs {need})")
            value = record[field]
            if not isinstance(value, str):
                raise InputError(f"{where}: field '{field}' must be a string, got {_json_type(value)}")
            if field in NOT_BLANK and not value.strip():
                raise InputError(f"{where}: field '{field}' is empty")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no lines (every line is one JSON object with {need})")
    return records


def check_model_dir(path) -> Path:
    """A local model directory as ``save_pretrained`` writes it: config, weights and tokenizer files.

    Raises:
        InputError: Naming the directory and what it lacks.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--model {path}: no such directory (a local model directory with its tokenizer)")
    for kind, names in (("config", (CONFIG_FILE,)), ("weights", WEIGHT_FILES), ("tokenizer files", TOKENIZER_FILES)):
        if not any((path / name).is_file() for name in names):
            raise InputError(f"--model {path}: no {kind} ({' or '.join(names)}); save the model and its "
                             "tokenizer there with save_pretrained")
    return path


def load_tokenizer(path):
    """The directory's tokenizer, as TRL loads one (padding and truncation on the left).

    Raises:
        InputError: When transformers cannot load it.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), padding_side="left", truncation_side="left")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--model {path}: cannot load its tokenizer ({e})") from None


def check_lengths(path, records: Sequence[dict], count: Callable[[dict], dict], cap: Optional[int],
                  cap_name: str) -> None:
    """Every record's token count within ``cap`` (None: no cap).

    Args:
        path: The file the records came from (record i is on line i + 1).
        records: The records.
        count: Per record, the token count of each field (in the order they are joined).
        cap: The most tokens a record may hold.
        cap_name: How the configuration names the cap, for the message.

    Raises:
        InputError: Naming the file, the line, the longest field and every field's count.
    """
    if cap is None:
        return
    for number, record in enumerate(records, 1):
        counts = count(record)
        total = sum(counts.values())
        if total > cap:
            longest = max(counts, key=counts.get)
            parts = " + ".join(f"{name} {n}" for name, n in counts.items())
            raise InputError(f"{path}:{number}: field '{longest}': the trace is {total} tokens ({parts}), "
                             f"over {cap_name} = {cap}")
