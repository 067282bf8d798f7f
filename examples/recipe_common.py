"""What the trainer recipes share: the tiny stand-ins they run on (a random-init Llama or Qwen2
built from a config, a one-token-per-character tokenizer: offline, on a CPU, in seconds) and a
training run that saves nothing.

For a real run, replace the stand-ins with AutoModelForCausalLM/AutoTokenizer.from_pretrained(...).
"""
import importlib.util
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
PAD, EOS = 0, 1


def char_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """<pad> = 0, <eos> = 1, newline = 2 (reasoning steps and answer cues hold newlines), then one
    token per character from ' ' (printable ASCII first)."""
    chars = {chr(32 + i): i + 3 for i in range(vocab_size - 3)}
    tok = Tokenizer(models.BPE(vocab={"<pad>": PAD, "<eos>": EOS, "\n": 2, **chars}, merges=[]))
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 256, seed: int = 0, attn_implementation: str = "sdpa",
                   dtype=None):
    """A 2-layer, 64-wide random-init causal LM (~0.1 M parameters) of the given architecture."""
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    return model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def attn_implementation(packed: bool) -> str:
    """flash_attention_2 for padding-free batches where flash-attn is installed (and a GPU runs it):
    its variable-length kernels take the packed rows as they are. Otherwise sdpa: transformers
    derives a block-diagonal causal mask from position ids that restart (when attention_mask is
    None), so packed sequences do not attend to each other there either."""
    if packed and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def train_in_tempdir(make_trainer, args):
    """make_trainer(args, output_dir) with a throw-away output dir (the recipes save nothing), trained."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(args, out)
        trainer.train()
    return trainer
