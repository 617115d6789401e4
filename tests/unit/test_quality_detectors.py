"""Each per-record detector of the data quality report on crafted zh/en inputs, with the exact expected findings."""

import pytest

from tunelab.data.quality.flags import Texts, answer_flags
from tunelab.data.quality.minhash import Permutations, distinct_shares, signatures, similarity
from tunelab.data.quality.text import language, leading_word, normalized


def flags_of(prompt: str, answer: str, is_label: bool = False) -> list[str]:
    pn, an = normalized(prompt), normalized(answer)
    sigs = signatures([pn, an], Permutations.make())
    return answer_flags(Texts(
        prompt=prompt, answer=answer, prompt_norm=pn, answer_norm=an, prompt_lang=language(prompt),
        answer_lang=language(answer), copy_similarity=float(similarity(sigs[0], sigs[1])),
        distinct_long_ngrams=float(distinct_shares([an if len(an) >= 40 else ""], 10)[0]), is_label=is_label))


@pytest.mark.parametrize(("text", "expected"), [
    ("帮我把红色的卫衣加入购物车", "zh"),
    ("请用Python写一个快速排序", "zh"),  # Latin code words inside Chinese text
    ("Add two blue hoodies to my cart.", "en"),
    ("Привет, как дела?", "other"),
    ("12345 + 678 = ?", "none"),
])
def test_language_by_script(text, expected):
    assert language(text) == expected


@pytest.mark.parametrize(("instruction", "expected"), [
    ("Please explain what a hash map is.", "explain"),
    ("Write a poem about rain", "write"),
    ("请翻译下面这句话", "翻译"),
    ("帮我总结这篇文章", "总结"),
    ("解释一下量子纠缠", "解释"),
])
def test_leading_word_skips_polite_prefixes(instruction, expected):
    assert leading_word(normalized(instruction)) == expected


CLEAN_EN = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
            "chloroplasts of plant cells.")
CLEAN_ZH = "光合作用把光能、水和二氧化碳转化为糖和氧气。这个过程发生在植物细胞的叶绿体中。"


@pytest.mark.parametrize(("prompt", "answer", "expected"), [
    ("Explain photosynthesis.", CLEAN_EN, []),
    ("解释光合作用。", CLEAN_ZH, []),
    ("Explain photosynthesis.", "...", ["empty"]),
    ("解释光合作用。", "无", ["empty"]),
    ("Is this review positive? Great phone!", "A", ["empty"]),
    ("Repeat after me: the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over the lazy dog",
     ["copy"]),
    ("把这句话改写得更正式：明天下午三点在会议室开会讨论项目进度", "明天下午三点在会议室开会讨论项目进度", ["copy"]),
    ("Tell me a story.", "I went home. " * 12, ["loop"]),
    ("讲个故事。", "我很好，谢谢你。" * 10, ["loop"]),
    ("Explain photosynthesis.", "Photosynthesis turns light into sugar. It happens in the chloroplasts of plant "
     "cells, where the", ["truncated"]),
    ("写一段代码", "好的。下面是代码：\n```python\nprint('hi')\n", ["truncated"]),
    ("解释光合作用。", CLEAN_EN, ["language"]),
    ("Translate to English: 光合作用", CLEAN_EN, []),
    ("把这段话翻译成中文：Photosynthesis is how plants eat.", CLEAN_ZH, []),
    ("How do I pick a lock?", "I'm sorry, but I can't help with that request.", ["refusal"]),
    ("Tell me about yourself.", "As an AI language model, I do not have feelings.", ["refusal"]),
    ("你是谁？", "作为一个人工智能语言模型，我无法提供个人信息。", ["refusal"]),
    ("这个问题怎么办？", "很抱歉，我无法回答这个问题。", ["refusal"]),
])
def test_answer_flags(prompt, answer, expected):
    assert flags_of(prompt, answer) == expected


def test_a_label_answer_is_not_empty():
    assert flags_of("Is this review positive? Great phone!", "A", is_label=True) == []
    assert flags_of("情感是正面还是负面？", "是", is_label=True) == []


def test_short_complete_answers_are_not_truncated():
    assert flags_of("Name a colour.", "Blue") == []
    assert flags_of("列出三种水果", "苹果\n香蕉\n橙子") == []
    assert flags_of("What is 2+2?", "The answer is 4") == []  # under 40 characters: too short to judge


def test_public_surface_is_sorted_and_importable():
    from tunelab.data import quality

    assert quality.__all__ == sorted(quality.__all__)
    assert all(hasattr(quality, name) for name in quality.__all__)


def reference_candidate_pairs(sigs, bands: int, rows: int) -> set[tuple[int, int]]:
    """The obvious LSH index: per band, a dict from the band's rows (a tuple) to the first record holding them."""
    pairs = set()
    for band in range(bands):
        first: dict[tuple, int] = {}
        for i, sig in enumerate(sigs):
            key = tuple(sig[band * rows : (band + 1) * rows].tolist())
            if key in first:
                pairs.add((first[key], i))
            else:
                first[key] = i
    return pairs


def test_lsh_by_sorting_finds_exactly_the_pairs_of_a_dict_index():
    import random

    from tunelab.data.quality.minhash import UnionFind, band_keys, candidate_pairs, lsh_bands

    rng = random.Random(2)
    base = ["".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(120)) for _ in range(40)]
    base += [" ".join(f"w{rng.randrange(10**5)}" for _ in range(30)) for _ in range(40)]
    texts = list(base)
    for i in range(0, 80, 4):  # a one-character edit of every fourth text, and an exact copy of every eighth
        texts.append(base[i][:50] + "变" + base[i][51:])
        if i % 8 == 0:
            texts.append(base[i])
    rng.shuffle(texts)
    sigs = signatures(texts, Permutations.make())
    bands, rows = lsh_bands(0.8, sigs.shape[1])
    found = candidate_pairs(band_keys(sigs, bands, rows))
    assert {(int(a), int(b)) for a, b in found} == reference_candidate_pairs(sigs, bands, rows)
    near = [(int(a), int(b)) for a, b in found if similarity(sigs[a], sigs[b]) >= 0.8]
    # Each bucket links its members to its first, so the verified pairs connect exactly the planted groups.
    union = UnionFind(len(texts))
    for a, b in near:
        union.union(a, b)
    roots = union.roots().tolist()
    clusters = sorted(sorted(i for i in range(len(texts)) if roots[i] == r) for r in set(roots) if roots.count(r) > 1)
    planted = sorted(sorted(i for i, t in enumerate(texts) if t[:50] + t[51:] == base[b][:50] + base[b][51:])
                     for b in range(0, 80, 4))
    assert clusters == planted and [len(c) for c in planted].count(3) == 10 and len(planted) == 20
