"""Build a tiny, randomly initialised causal LM and a locally trained tokenizer, saved as a normal HF folder.

Used by ``tunelab demo`` and the tests: nothing is downloaded, and the result is loaded back through the same
``from_pretrained`` path a user's real model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer (its tokenizer.json; also ``PRETOKENIZE_REGEX`` in transformers' tokenization_qwen2.py): digits
# one by one, letters with at most one leading non-letter. transformers 5 loads every folder whose config.json says
# qwen2 as ``Qwen2Tokenizer``, whatever tokenizer_class tokenizer_config.json names (qwen2 is in
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), and that class rebuilds normalizer, pre-tokenizer and decoder itself,
# taking only vocab and merges from tokenizer.json. A tokenizer trained with any other pre-tokenizer would not be the
# one that loads back, so the tiny tokenizer is trained with exactly this pipeline (for Llama too, whose folder loads
# as TokenizersBackend and keeps tokenizer.json as is). tests/unit/test_tiny_tokenizer.py checks the round trip.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2000, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Chinese and English) with ChatML markers and Qwen2's pre-tokenizer, so that it
    loads back unchanged through ``AutoTokenizer``; deterministic for the same texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    if chat_template:
        fast.chat_template = CHATML_JINJA
    return fast


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: Literal["qwen2", "llama"] = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 2048,
    seed: int = 0,
) -> PreTrainedModel:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def save_tiny(out_dir: Path, texts: Iterable[str], *, vocab_size: int = 2000, **model_kwargs) -> Path:
    """Train the tokenizer, build the model and save both (safetensors) to ``out_dir``."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, **model_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
