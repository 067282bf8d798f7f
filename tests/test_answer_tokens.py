"""Answers in HyTuningTrainer: found robustly in generated text (find_answer), their absence loud,
and cue + answer encoded together (encode_answer) for traces, probes and rollouts, with a
byte-level BPE and a SentencePiece tokenizer, on number and word answers.

Expected tokens come from the tokenizer's own offsets: the answer's tokens are those of the whole
text whose characters reach into the answer."""
import io
import json
import logging
import random

import pytest
import torch

from hykernels.hytuning import encode_answer
from hykernels.integrations._trl_rows import find_answer

CUE = "\nAnswer: "
REASONING = "7+9 = 16\n\nso it is 16"
ANSWERS = ["16", "Paris"]


def corpus():
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        lines.append(f"Q: what is {a}+{b}?\n{a}+{b} = {a + b}\n\nso it is {a + b}\nAnswer: {a + b}")
        lines.append("Q: the capital of France?\nIt is Paris.\nAnswer: Paris")
    return lines


def byte_level_bpe():
    """A GPT-2-style byte-level BPE (Ġ for a space, Ċ for a newline), trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=500, min_frequency=2, special_tokens=["<pad>", "<eos>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")


def sentencepiece(tmp_path):
    """A Llama-style SentencePiece BPE (▁ for a space, a dummy prefix, byte fallback, digits split),
    trained here and loaded by transformers from its tokenizer.model."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=360, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                 "add_bos_token": False, "legacy": False}))
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tok(request, tmp_path_factory):
    if request.param == "byte_level_bpe":
        return byte_level_bpe()
    return sentencepiece(tmp_path_factory.mktemp("spm"))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def in_context(tok, text, start, end):
    """The tokens of ``text`` whose characters reach into text[start:end], by the tokenizer's offsets."""
    out = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in zip(out["input_ids"], out["offset_mapping"]) if a < end and b > start]


@pytest.mark.parametrize("answer", ANSWERS)
def test_cue_and_answer_encoded_together(tok, answer):
    text = REASONING + CUE + answer
    start = len(REASONING + CUE)
    # the defect this guards against: encoded apart, the parts are not the text's encoding
    assert enc(tok, REASONING) + enc(tok, CUE) + enc(tok, answer) != enc(tok, text)
    reasoning, cue, answer_ids = encode_answer(tok, REASONING, CUE, answer)
    assert reasoning + cue + answer_ids == enc(tok, text)
    assert answer_ids == in_context(tok, text, start, len(text))
    assert cue and tok.decode(answer_ids).strip() == answer
    # no reasoning: the cue opens the completion
    reasoning, cue, answer_ids = encode_answer(tok, "", CUE, answer)
    assert reasoning == [] and cue + answer_ids == enc(tok, CUE + answer)
    assert answer_ids == in_context(tok, CUE + answer, len(CUE), len(CUE + answer))


def test_a_cue_without_a_token_of_its_own_is_refused(tok):
    with pytest.raises(ValueError, match="cue: ' ' keeps no token of its own"):
        encode_answer(tok, "", " ", "Paris")
    with pytest.raises(ValueError, match="answer: expected a non-empty answer"):
        encode_answer(tok, REASONING, CUE, "")


@pytest.fixture(scope="module")
def trainer(tok, tmp_path_factory):
    pytest.importorskip("trl")
    import sys
    from pathlib import Path

    from datasets import Dataset

    from hykernels.integrations.trl import HyTuningTrainer, HyTuningTrainerConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from recipe_common import tiny_causal_lm

    path = tmp_path_factory.mktemp("model")
    tiny_causal_lm("qwen2", len(tok)).save_pretrained(path)
    args = HyTuningTrainerConfig(output_dir=str(path / "out"), per_device_train_batch_size=2, num_generations=2,
                                 max_completion_length=32, traces_per_step=2, report_to=[], use_cpu=True,
                                 save_strategy="no")
    traces = [dict(prompt="Q: 7+9?\n", reasoning=REASONING, answer=a) for a in ANSWERS]
    return HyTuningTrainer(model=str(path), args=args, train_dataset=Dataset.from_dict({"prompt": ["Q: 1+1?\n"]}),
                           trace_dataset=Dataset.from_list(traces), processing_class=tok)


@pytest.mark.parametrize("answer", ANSWERS)
def test_trainer_traces_probes_and_rollouts_use_the_joint_encoding(tok, trainer, answer):
    """A trace's RD row is its completion text's own encoding; its probe and a rollout's probe end
    with the cue and answer tokens of that encoding (the rollout's answer line ended at the newline)."""
    text = REASONING + CUE + answer
    want_answer = in_context(tok, text, len(REASONING + CUE), len(text))
    row = trainer._trace_rows[ANSWERS.index(answer)]
    assert row.completion == enc(tok, text) + [tok.eos_token_id]
    assert list(row.probe.answer) == want_answer and list(row.probe.cue) + want_answer == row.completion[
        len(row.probe.reasoning):-1]
    generated = enc(tok, text + "\nthat is all") + [tok.eos_token_id]
    out = dict(prompt_ids=torch.tensor([enc(tok, "Q: 7+9?\n")]), prompt_mask=torch.ones(1, len(enc(tok, "Q: 7+9?\n"))),
               completion_ids=torch.tensor([generated]), completion_mask=torch.ones(1, len(generated)))
    probe, = trainer._rollout_probes(out, "train")
    assert list(probe.answer) == want_answer and list(probe.cue) == list(row.probe.cue)
    assert list(probe.reasoning) == list(row.probe.reasoning)


@pytest.mark.parametrize("text, answer, reasoning", [
    ("2+3 = 5\n\nyes\nAnswer: 5", "5", "2+3 = 5\n\nyes"),
    ("Answer: 7", "7", ""),  # the answer first: the cue without its newline
    ("x\nAnswer: 12\nthe rest is not the answer", "12", "x"),  # the answer ends at its line's end
    ("x\nAnswer:12", "12", "x"),  # the cue without its trailing space
    ("so\nAnswer:   Paris  ", "Paris", "so"),
    ("no cue at all", None, None),
    ("x\nAnswer: \nAnswer: 3", None, None),  # the first cue's line is blank: no answer
])
def test_find_answer(text, answer, reasoning):
    found = find_answer(text, CUE)
    if answer is None:
        assert found is None
        return
    assert (found.answer, found.reasoning) == (answer, reasoning)
    assert text[found.start:found.end] == answer


def test_find_answer_with_answer_fn():
    last_word = lambda text: text.split()[-1].strip(".") if text.split() else None
    found = find_answer("so we get 42.", CUE, last_word)
    assert (found.answer, found.reasoning, found.start) == ("42", "so we get ", 10)
    assert find_answer("", CUE, last_word) is None
    found = find_answer("3+4 = 7\nAnswer: 7", CUE, lambda text: "7")
    assert (found.reasoning, found.answer) == ("3+4 = 7", "7")  # the reasoning ends before the cue


def test_no_answers_warn_naming_the_cue(trainer, caplog):
    """Most rollouts of the last 10 generation batches without an answer: one warning that names
    the cue; then quiet until another full window."""
    from hykernels.integrations import trl as hk_trl

    trainer._answered_window.clear()
    with caplog.at_level(logging.WARNING, logger=hk_trl.__name__):
        for share in [1.0] * 10:
            trainer._watch_answers(share)
        assert not caplog.records
        for share in [0.25] * 14:
            trainer._watch_answers(share)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and repr(CUE) in warnings[0] and "had no answer" in warnings[0]
