"""Shared fixtures: tiny randomly initialised Llama-style models and a tiny tokenizer, built offline."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Language models predict the next token from the ones before it. "
    "Quantization stores weights in fewer bits; pruning removes them; distillation teaches a small model. "
) * 20


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in-process on a fixed text (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_llama(vocab_size: int = 300, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=tie, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def make_gemma3(vocab_size: int = 300, seed: int = 0):
    """A tiny Gemma-3 whose first two layers slide over a window of 6 tokens (shorter than the tests' outputs), with a
    final norm scaled up so its greedy tokens are not near ties."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, sliding_window=6, max_position_embeddings=256,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.add_(20)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_llama(vocab_size=len(tiny_tokenizer))


@pytest.fixture
def tiny_folder(tmp_path, tiny_model, tiny_tokenizer):
    """A tiny model saved as an ordinary Hugging Face folder."""
    d = tmp_path / "tiny"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(TRAIN_TEXT[i : i + 400] for i in range(0, len(TRAIN_TEXT), 400)))
    return p
