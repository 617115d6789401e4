"""Tokenisation, ROUGE and BLEU against numbers worked out by hand."""

import math
import random

import pytest

from tunelab.evaluate.metrics import bleu, corpus_bleu, rouge_l, rouge_n, tokenize
from tunelab.evaluate.metrics.text import lcs_length


def test_chinese_is_split_into_characters_and_latin_runs_are_words():
    assert tokenize("我爱ＮＬＰ，GPT-4模型！") == ["我", "爱", "nlp", "gpt", "4", "模", "型"]
    assert tokenize("Hello, World_2 café") == ["hello", "world", "2", "café"]
    assert tokenize("ひらがなテスト") == list("ひらがなテスト")
    assert tokenize(" ，。！ ") == []


# pred 今天天气很好 -> 今 天 天 气 很 好 (6 tokens); ref 今天天气不错 -> 今 天 天 气 不 错 (6 tokens)
#   unigrams: overlap 今 1 + 天 2 + 气 1 = 4                       -> p = r = f = 4/6
#   bigrams:  今天 天天 天气 气很 很好 vs 今天 天天 天气 气不 不错    -> overlap 3 of 5: p = r = f = 3/5
#   LCS: 今天天气 = 4                                              -> p = r = f = 4/6
#   trigrams: 今天天 天天气 天气很 气很好 vs 今天天 天天气 天气不 气不错 -> 2 of 4
#   4-grams:  今天天气 天天气很 天气很好 vs 今天天气 天天气不 天气不错   -> 1 of 3
#   BLEU (add-one for n >= 2), BP = 1 (equal lengths):
#     (4/6 * (3+1)/(5+1) * (2+1)/(4+1) * (1+1)/(3+1)) ** (1/4) = (2/3 * 2/3 * 3/5 * 1/2) ** (1/4) = (2/15) ** (1/4)
ZH_PRED, ZH_REF = "今天天气很好", "今天天气不错"


def test_chinese_rouge_by_hand():
    assert rouge_n(ZH_PRED, ZH_REF, 1) == pytest.approx({"p": 4 / 6, "r": 4 / 6, "f": 4 / 6})
    assert rouge_n(ZH_PRED, ZH_REF, 2) == pytest.approx({"p": 3 / 5, "r": 3 / 5, "f": 3 / 5})
    assert rouge_l(ZH_PRED, ZH_REF) == pytest.approx({"p": 4 / 6, "r": 4 / 6, "f": 4 / 6})


def test_chinese_bleu_by_hand():
    assert bleu(ZH_PRED, ZH_REF) == pytest.approx((2 / 15) ** 0.25)


def test_rouge_with_unequal_lengths():
    # pred: the cat sat (3); ref: the cat sat on the mat (6); unigram overlap 3 -> p = 1, r = 1/2, f = 2/3
    assert rouge_n("The cat sat.", "the cat sat on the mat", 1) == pytest.approx({"p": 1.0, "r": 0.5, "f": 2 / 3})
    # LCS of "the mat sat" with "the cat sat on the mat": "the sat" or "the mat" -> 2: p = 2/3, r = 2/6, f = 4/9
    assert rouge_l("the mat sat", "the cat sat on the mat") == pytest.approx({"p": 2 / 3, "r": 1 / 3, "f": 4 / 9})


def test_rouge_clips_repeated_ngrams():
    # pred "的的的的" has 4 unigrams, ref "我的书" has one 的: overlap 1 -> p = 1/4, r = 1/3
    assert rouge_n("的的的的", "我的书", 1) == pytest.approx({"p": 1 / 4, "r": 1 / 3, "f": 2 / 7})


def test_bleu_brevity_penalty_by_hand():
    # every n-gram of "the cat sat" matches (p_4 = (0+1)/(0+1) = 1); c = 3, r = 6 -> BP = exp(1 - 6/3) = exp(-1)
    assert bleu("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1))


def test_bleu_clipping_and_smoothing_by_hand():
    # p1 = 1/4 (clipped), p2 = (0+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); c = 4 > r = 2 -> BP = 1
    assert bleu("the the the the", "the cat") == pytest.approx((1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25)


def test_bleu_edge_cases():
    assert bleu("好", "好") == 1.0  # shorter than 4 tokens but exact
    assert bleu("", "好") == 0.0
    assert bleu("坏", "好") == 0.0  # no unigram match
    assert bleu("今天天气很好", "今天天气很好") == pytest.approx(1.0)


def test_corpus_bleu_sums_counts_before_dividing():
    # n-gram matches / counts summed over both pairs (see above):
    #   p1 = (4+3)/(6+3) = 7/9, p2 = (3+2)/(5+2) = 5/7, p3 = (2+1)/(4+1) = 3/5, p4 = (1+0)/(3+0) = 1/3
    #   product = 1/9; c = 9, r = 12 -> BP = exp(1 - 12/9)
    score = corpus_bleu([ZH_PRED, "the cat sat"], [ZH_REF, "the cat sat on the mat"])
    assert score == pytest.approx(math.exp(-1 / 3) * (1 / 9) ** 0.25)
    assert corpus_bleu(["a b"], ["c d"]) == 0.0


def _lcs_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_agrees_with_the_textbook_table():
    rng = random.Random(0)
    for _ in range(300):
        a = rng.choices("abcd", k=rng.randint(0, 70))
        b = rng.choices("abcd", k=rng.randint(0, 70))
        assert lcs_length(a, b) == _lcs_table(a, b)
