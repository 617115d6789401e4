"""The tiny tokenizer that the tests and ``tunelab demo`` train is the one ``AutoTokenizer`` loads back."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import corpus
from tunelab.demo.tiny import CHATML_JINJA, train_tokenizer

TEXTS = [
    "order 12345 价格 99元",
    "计算 17 加 25 等于 42。",
    "What is 7 plus 8? It's 15, isn't it?",
    '{"intent":"add_to_cart","params":{"color":"red","size":"L","qty":2}}',
    " leading space,  two spaces\tand a tab\n\nnew lines  \n",
    "全角数字１２３ and an emoji 😀",
    "<|im_start|>user\n帮我把红色的卫衣加入购物车<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def trained():
    # train_tokenizer is deterministic: this is the tokenizer the session fixtures trained and saved.
    return train_tokenizer(corpus(), vocab_size=500)


@pytest.mark.parametrize("folder", ["tiny_model", "tiny_llama"])
def test_saved_tokenizer_loads_back_unchanged(trained, folder, request):
    path = request.getfixturevalue(folder)
    loaded = AutoTokenizer.from_pretrained(path)
    saved = json.loads((path / "tokenizer.json").read_text("utf-8"))
    backend = json.loads(loaded.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert backend[part] == saved[part], part
    for text in TEXTS:
        assert loaded(text)["input_ids"] == trained(text)["input_ids"], text
        assert loaded.decode(loaded(text)["input_ids"]) == text
    # digits one by one, as in Qwen2's own tokenizer
    assert loaded.tokenize("12345") == list("12345")
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (loaded.eos_token_id, loaded.pad_token_id) == (trained.eos_token_id, trained.pad_token_id)
    assert len(loaded) == len(trained) and loaded.get_vocab() == trained.get_vocab()
    assert loaded.chat_template == CHATML_JINJA
    messages = [{"role": "user", "content": "计算 3 加 4"}, {"role": "assistant", "content": "7"}]
    assert loaded.apply_chat_template(messages, tokenize=True)["input_ids"] == trained.apply_chat_template(
        messages, tokenize=True)["input_ids"]
