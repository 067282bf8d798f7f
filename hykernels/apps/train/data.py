"""The inputs of ``python -m hykernels train``, read and checked before any model loads.

A JSONL file holds one JSON object per line, every line (no blank ones between them; a UTF-8 byte
order mark and blank lines at the end are ignored). Each object needs the fields its role lists
below, as strings; ``prompt`` and ``answer`` must not be empty or blank. A ``prompt`` may also be a
conversation, as TRL takes one: a non-empty list of ``{"role": ..., "content": ...}`` messages
(strings), which the tokenizer's chat template turns into the prompt; the prompts of one file are
all text or all conversations. Other fields are kept (TRL passes query columns on to reward
functions).

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
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors write one) is not data
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last line, and blank lines after it
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
            if field == "prompt" and isinstance(value, list):
                _check_conversation(where, value)
                continue
            if not isinstance(value, str):
                raise InputError(f"{where}: field '{field}' must be a string, got {_json_type(value)}")
            if field in NOT_BLANK and not value.strip():
                raise InputError(f"{where}: field '{field}' is empty")
        if "prompt" in fields and records and is_conversation(record["prompt"]) != is_conversation(records[0]["prompt"]):
            kinds = ("text", "a conversation")
            raise InputError(f"{where}: field 'prompt' is {kinds[is_conversation(record['prompt'])]} where line 1's "
                             f"is {kinds[is_conversation(records[0]['prompt'])]} (a file's prompts are all one kind)")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no lines (every line is one JSON object with {need})")
    return records


def is_conversation(prompt) -> bool:
    """Whether a prompt is a conversation (a list of messages) rather than text."""
    return isinstance(prompt, list)


def _check_conversation(where: str, messages: list) -> None:
    if not messages:
        raise InputError(f"{where}: field 'prompt' is an empty conversation")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise InputError(f"{where}: field 'prompt': message {i} must be an object with string 'role' and "
                             f"'content', got {json.dumps(message)[:80]}")


def prompt_ids(tokenizer, prompt) -> list:
    """A prompt's token ids as TRL tokenizes it: text with the tokenizer's special tokens, a
    conversation through the chat template with the generation prompt."""
    if is_conversation(prompt):
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def check_chat_template(path, records: Sequence[dict], tokenizer, model) -> None:
    """Conversational prompts need the tokenizer's chat template.

    Raises:
        InputError: Naming the file and the model directory.
    """
    if records and is_conversation(records[0]["prompt"]) and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{path}:1: field 'prompt' is a conversation, but the tokenizer of --model {model} has no "
                         "chat template (give text prompts, or a tokenizer with one)")


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
