"""`python -m hykernels train`: HyTuning from files, end to end on a tiny model, and every kind of
bad input refused before any model loads (exit status 2, the file, line and field on stderr)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402

from hykernels.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from recipe_common import tiny_causal_lm  # noqa: E402

CUE = "\nAnswer: "  # HyTuningTrainerConfig.answer_cue's default
# Small enough that 2 GRPO steps with traces and probes, and the evaluation, take seconds.
CONFIG = """\
max_steps: 5                    # the command line's --max-steps 2 overrides it
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 12
max_prompt_length: 32           # traces: at most 32 + 12 tokens
learning_rate: 0.001
logging_steps: 1
save_steps: 1
report_to: none                 # no use_cpu, no bf16: a CPU machine runs in fp32 as it is
per_device_eval_batch_size: 4
traces_per_step: 2
"""


def char_tokenizer(merges: tuple = ()) -> transformers.PreTrainedTokenizerFast:
    """<pad> = 0, <eos> = 1, newline = 2, then one token per printable ASCII character (and one per
    merged pair, when given)."""
    vocab = {"<pad>": 0, "<eos>": 1, "\n": 2, **{chr(32 + i): i + 3 for i in range(95)}}
    vocab.update({a + b: len(vocab) + k for k, (a, b) in enumerate(merges)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    bpe.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    tok.save_pretrained(path)
    # Llama: from a Qwen2 directory transformers 5's AutoTokenizer loads this tokenizer as a Qwen2Tokenizer,
    # whose byte-level pre-tokenizer drops the newline and space tokens
    tiny_causal_lm("llama", len(tok)).save_pretrained(path)
    return path


def sums(n: int, offset: int = 0) -> list:
    out = []
    for i in range(offset, offset + n):
        a, b, c = i % 7 + 1, i % 5 + 2, i % 3 + 1
        out.append({"prompt": f"Q: {a}+{b}+{c}\n", "reasoning": f"{a}+{b}={a + b}\n\n{a + b}+{c}={a + b + c}",
                    "answer": str(a + b + c)})
    return out


def write_jsonl(path: Path, records) -> str:
    """Records as JSON lines; a str record is written as it is (a bad line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def inputs(tmp_path, model_dir):
    """argv of a valid run (its files in tmp_path) and the paths, to spoil one of them."""
    files = {"traces": tmp_path / "traces.jsonl", "queries": tmp_path / "queries.jsonl",
             "eval": tmp_path / "eval.jsonl", "config": tmp_path / "hytuning.yaml"}
    write_jsonl(files["traces"], sums(4))
    write_jsonl(files["queries"], [{"prompt": r["prompt"]} for r in sums(8, 10)])
    write_jsonl(files["eval"], [{"prompt": r["prompt"], "answer": r["answer"]} for r in sums(6, 30)])
    files["config"].write_text(CONFIG)
    argv = ["train", "--config", str(files["config"]), "--model", str(model_dir), "--traces", str(files["traces"]),
            "--queries", str(files["queries"]), "--eval-queries", str(files["eval"]),
            "--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    return argv, files


def test_train_two_steps_end_to_end(inputs, tmp_path, capsys):
    argv, _ = inputs
    assert main(argv) == 0
    out = tmp_path / "out"
    for step in (1, 2):  # save_steps: 1 from the YAML
        assert (out / f"checkpoint-{step}" / "model.safetensors").is_file()
        assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()  # the final model

    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [log for log in logs if "loss" in log]
    assert [log["step"] for log in steps] == [1, 2]  # --max-steps 2 overrode the YAML's 5
    for key in ("loss", "learning_rate", "grad_norm", "reward", "lambda", "prg_traces", "prg_rollouts", "rd_nll"):
        assert all(key in log for log in steps), (key, steps[0].keys())
    assert "train_runtime" in logs[-1]

    report = json.loads((out / "eval.json").read_text())
    assert report["answer_cue"] == CUE and list(report)[-2:] == ["before training", "after 2 steps"]
    for result in report["before training"], report["after 2 steps"]:
        summary = result["summary"]
        assert summary["questions"] == len(result["questions"]) == 6
        for key in ("accuracy", "answered", "ece", "brier", "auroc"):
            assert key in summary
        assert 0.0 <= summary["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "| model | accuracy | answered | ECE | Brier | AUROC |" in printed
    assert "| before training |" in printed and "| after 2 steps |" in printed


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
REWARDS = """\
def digits(completions, **columns):  # TRL hands conversational completions as [{"role", "content"}]
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(sum(ch.isdigit() for ch in t)) for t in texts]


def last_number(text):
    words = [w for w in text.replace("\\n", " ").split() if w.isdigit()]
    return words[-1] if words else None
"""


def test_real_files_conversations_and_functions(tmp_path, model_dir, monkeypatch):
    """Files as editors write them (a UTF-8 byte order mark, CRLF line ends, blank lines at the end),
    conversational prompts through the tokenizer's chat template, and --reward_funcs /
    --answer_fn naming functions (module:function, the working directory importable): 1 step runs,
    logs the named reward, and evaluates with the same answer function."""
    chat_dir = tmp_path / "chat-model"
    shutil.copytree(model_dir, chat_dir)
    tok = transformers.AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_dir)
    chat = lambda text: [{"role": "user", "content": text.strip()}]

    def editor_file(name, records):
        path = tmp_path / name
        lines = "\r\n".join(json.dumps(r) for r in records)
        path.write_bytes(b"\xef\xbb\xbf" + (lines + "\r\n\r\n  \n").encode())
        return str(path)

    traces = editor_file("traces.jsonl", [dict(r, prompt=chat(r["prompt"])) for r in sums(4)])
    queries = editor_file("queries.jsonl", [{"prompt": chat(r["prompt"])} for r in sums(8, 10)])
    evals = editor_file("eval.jsonl", [{"prompt": chat(r["prompt"]), "answer": r["answer"]} for r in sums(4, 30)])
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "hytuning.yaml"
    config.write_text(CONFIG)
    argv = ["train", "--config", str(config), "--model", str(chat_dir), "--traces", traces, "--queries", queries,
            "--eval-queries", evals, "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--reward_funcs", "my_rewards:digits", "self_certainty", "--answer_fn", "my_rewards:last_number",
            "--max_prompt_length", "64"]  # the chat template adds 19 tokens to each prompt
    assert main(argv) == 0
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for key in ("rewards/digits/mean", "rewards/self_certainty/mean", "answered"):
        assert key in logs[0], logs[0].keys()
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["before training"]["summary"]["questions"] == 4


def test_text_flags_read_escapes_as_the_yaml_does(inputs, tmp_path):
    """--answer_cue '\\nAnswer: ' typed on a shell (a backslash and an n) is the YAML's "\\nAnswer: ";
    a YAML value is read once, by the YAML (its single-quoted backslash stays a backslash)."""
    from hykernels.integrations.trl import HyTuningTrainerConfig
    from hykernels.apps.train import cli

    argv, files = inputs
    _, config, _ = cli.parse(HyTuningTrainerConfig, argv[1:] + ["--answer_cue", "\\nResult:\\t", "--step-delimiter",
                                                               "\\n\\n"])
    assert (config.answer_cue, config.step_delimiter) == ("\nResult:\t", "\n\n")
    files["config"].write_text(CONFIG + "answer_cue: '\\nA:'\nstep_delimiter: \"\\n--\\n\"\n")
    _, config, _ = cli.parse(HyTuningTrainerConfig, argv[1:])
    assert (config.answer_cue, config.step_delimiter) == ("\\nA:", "\n--\n")


def test_answer_span_starts_at_the_token_reaching_past_the_cue():
    from hykernels.apps.train.evaluate import answer_span

    tok = char_tokenizer(merges=((" ", "1"),))  # " 1" is one token: it holds the cue's last character
    ids = tok.encode("x\nAnswer: 12", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids[9:11]) == [" 1", "2"]
    assert answer_span(tok, ids, CUE) == ((9, 11), "12")
    assert answer_span(tok, ids, "Result: ") == (None, None)
    assert answer_span(tok, tok.encode("x\nAnswer:  ", add_special_tokens=False), CUE) == (None, None)


def test_evaluation_scores_the_models_own_answers(model_dir, monkeypatch):
    """Given the model's responses: the answer after the cue, correctness against the gold answer, the
    confidence exp(mean log p) of the answer tokens from the model's own logits, and the summary."""
    import torch

    from hykernels.apps.train import evaluate as ev

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    records = [{"prompt": "Q: 1+2\n", "answer": "3"}, {"prompt": "Q: 2+2\n", "answer": " 4"},
               {"prompt": "Q: 5\n", "answer": "5"}]
    texts = ["1+2=3\nAnswer: 3", "2+2=5\nAnswer: 5", "no cue"]
    prompts = [tok(r["prompt"])["input_ids"] for r in records]
    responses = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (prompts, responses))
    result = ev.evaluate(model, tok, records, cue=CUE, max_new_tokens=8, batch_size=2)  # 2 batches
    questions = result["questions"]
    assert [q["answer"] for q in questions] == ["3", "5", None]
    assert [q["correct"] for q in questions] == [True, False, False]
    with torch.no_grad():
        want = []
        for prompt, response in zip(prompts[:2], responses[:2]):
            logp = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            at = len(prompt) + len(response) - 2  # the answer: the one token before <eos>
            want.append(logp[at - 1, response[-2]].exp().item())
    got = [q["confidence"] for q in questions]
    assert got[2] is None and got[:2] == pytest.approx(want, rel=1e-4)
    summary = result["summary"]
    assert (summary["accuracy"], summary["answered"], summary["questions"]) == pytest.approx((1 / 3, 2 / 3, 3))
    assert summary["brier"] == pytest.approx(((1 - want[0]) ** 2 + want[1] ** 2) / 2, rel=1e-4)
    assert summary["auroc"] == (1.0 if want[0] > want[1] else 0.0)


def test_model_config_flags_reach_the_trainer(inputs):
    """TRL's ModelConfig flags (LoRA, dtype) become the trainer's peft config and model init kwargs, as in
    TRL's own grpo script; the command line overrides the YAML, which overrides the defaults."""
    from hykernels.integrations.trl import HyTuningTrainerConfig
    from hykernels.apps.train import cli

    argv, _ = inputs
    script, config, model_args = cli.parser(HyTuningTrainerConfig).parse_args_and_config(
        argv[1:] + ["--use_peft", "--lora_r", "4", "--dtype", "bfloat16", "--model_init_kwargs",
                    '{"attn_implementation": "eager"}'])
    options = cli.model_options(script, config, model_args)
    assert options["peft_config"].r == 4 and options["quantization_config"] is None
    init = config.model_init_kwargs
    assert init["dtype"] == "bfloat16" and init["attn_implementation"] == "eager"
    assert (config.max_steps, config.num_generations, config.traces_per_step, config.lambda0) == (2, 4, 2, 0.5)


def _spoil_model(model_dir: Path, tmp_path: Path, *remove: str) -> str:
    spoilt = tmp_path / "spoilt-model"
    shutil.copytree(model_dir, spoilt)
    for name in remove:
        (spoilt / name).unlink()
    return str(spoilt)


def _with(argv: list, flag: str, value: str) -> tuple:
    """(argv with ``flag``'s value replaced, the start of the message naming it)."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv, f"{flag} {value}: "


GOOD = {"prompt": "Q: 1+2+3\n", "reasoning": "1+2=3\n\n3+3=6", "answer": "6"}
# file to spoil: (its lines, what stderr must say after "FILE")
BAD_FILES = {
    "missing column": ("traces", [GOOD, {"prompt": "Q: 1+1\n", "reasoning": ""}], [":2: field 'answer' is missing"]),
    "empty line": ("traces", [GOOD, "", GOOD], [":2: empty line"]),
    "invalid JSON": ("traces", [GOOD, GOOD, '{"prompt": "Q: 1+1\\n", '], [":3: invalid JSON"]),
    "empty answer": ("traces", [dict(GOOD, answer="  ")], [":1: field 'answer' is empty"]),
    "not a string": ("traces", [GOOD, dict(GOOD, answer=6)], [":2: field 'answer' must be a string, got a number"]),
    "trace too long": ("traces", [GOOD, dict(GOOD, reasoning="1+1=2\n\n" * 60)],
                       [":2: field 'reasoning': the trace is", "over max_prompt_length + max_completion_length = 44"]),
    "empty prompt": ("queries", [{"prompt": "Q: 1\n"}, {"prompt": "Q: 2\n"}, {"prompt": ""}],
                     [":3: field 'prompt' is empty"]),
    "not an object": ("queries", [["Q: 1\n"]], [":1: expected a JSON object with prompt, got an array"]),
    "missing prompt": ("queries", [{"question": "Q: 1\n"}], [":1: field 'prompt' is missing"]),
    "eval answer missing": ("eval", [{"prompt": "Q: 1\n", "answer": "1"}, {"prompt": "Q: 2\n"}],
                            [":2: field 'answer' is missing"]),
    "no lines": ("eval", [], [": no lines"]),
}
BAD_MODELS = {"no config.json": ("config.json",), "no weights": ("model.safetensors",),
              "no tokenizer files": ("tokenizer.json", "tokenizer_config.json")}


def _spoil(case: str, argv: list, files: dict, tmp_path: Path, model_dir: Path) -> tuple:
    """(argv, what stderr must hold) of one kind of bad input."""
    if case in BAD_FILES:
        which, lines, expected = BAD_FILES[case]
        write_jsonl(files[which], lines)
        return argv, [str(files[which]) + expected[0], *expected[1:]]
    if case in BAD_MODELS:
        argv, named = _with(argv, "--model", _spoil_model(model_dir, tmp_path, *BAD_MODELS[case]))
        return argv, [named + case.split(".")[0]]
    if case == "no such file":
        argv, named = _with(argv, "--queries", str(tmp_path / "nope.jsonl"))
        return argv, [named + "no such file"]
    if case == "no model directory":
        argv, named = _with(argv, "--model", str(tmp_path / "nope"))
        return argv, [named + "no such directory"]
    if case == "unknown YAML key":
        files["config"].write_text(CONFIG + "no_such_field: 1\n")
        return argv, ["no_such_field"]
    if case == "unknown reward function":
        return argv + ["--reward_funcs", "no_such_module:reward"], ["--reward_funcs no_such_module:reward: cannot import"]
    if case == "unknown answer function":
        return argv + ["--answer_fn", "json:no_such_function"], ["--answer_fn json:no_such_function: module json has no"]
    if case == "conversation without a chat template":
        write_jsonl(files["queries"], [{"prompt": [{"role": "user", "content": "Q: 1+1"}]}])
        return argv, [f"{files['queries']}:1: field 'prompt' is a conversation, but the tokenizer"]
    if case == "mixed prompts":
        write_jsonl(files["queries"], [{"prompt": "Q: 1+1\n"}, {"prompt": [{"role": "user", "content": "Q: 1+1"}]}])
        return argv, [f"{files['queries']}:2: field 'prompt' is a conversation where line 1's is text"]
    if case == "bad message":
        write_jsonl(files["queries"], [{"prompt": [{"role": "user"}]}])
        return argv, [f"{files['queries']}:1: field 'prompt': message 0 must be an object with string 'role'"]
    if case == "bad config value":  # HyTuningTrainerConfig's own check
        return argv + ["--lambda0", "0.95"], ["lambda0: expected a number in [lambda_min, lambda_max]"]
    assert case == "bad flag type"  # argparse's
    return argv + ["--kappa", "strong"], ["--kappa", "invalid float value: 'strong'"]


@pytest.mark.parametrize("case", [*BAD_FILES, *BAD_MODELS, "no such file", "no model directory", "unknown YAML key",
                                  "bad config value", "bad flag type", "unknown reward function",
                                  "unknown answer function", "conversation without a chat template", "mixed prompts",
                                  "bad message"])
def test_bad_input_fails_before_any_model_loads(case, inputs, tmp_path, model_dir, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a) or pytest.fail("a model was loaded")))
    argv, expected = _spoil(case, *inputs, tmp_path, model_dir)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit 2 too
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert all(s in err for s in expected), (expected, err[-2000:])
    assert "Traceback" not in err and not loaded


def test_without_trl_train_says_how_to_install_and_demo_still_parses():
    code = ("import sys; sys.modules['trl'] = None; from hykernels.__main__ import main; import hykernels.apps.demo; "
            "rc = main(['train', '--help']); print('rc', rc); main(['demo', '--help'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'pip install "hykernels[trl]"' in r.stderr and "rc 1" in r.stdout and "--warmup-steps" in r.stdout
