"""Per-text features used by the quality report: normalisation, language, instruction tokens and leading words.

Language is decided by script: the share of CJK characters among the letters of a text. It is a coarse split
(zh / en / other / none) meant for a dataset-level mix, not a language identifier: Japanese kana count as CJK,
and any Latin-script text counts as ``en``.
"""

from __future__ import annotations

import re

from tunelab.evaluate.metrics.normalize import normalize_text

__all__ = ["LANGUAGES", "language", "leading_word", "normalized", "word_tokens"]

LANGUAGES = ("zh", "en", "other", "none")
"""``none``: no letters at all (numbers, punctuation, code symbols)."""

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LATIN_LETTER = re.compile(r"[A-Za-z]")
_LETTER = re.compile(r"[^\W\d_]")
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_CJK_SHARE = 0.3
"""A text whose letters are at least this share CJK is Chinese: code, names and units in Chinese text are Latin."""
_LATIN_SHARE = 0.5

_EN_POLITE = frozenset({"please", "kindly", "pls"})
_ZH_POLITE = ("请你", "请您", "麻烦你", "麻烦", "帮我", "帮忙", "能否", "你能", "可以", "请")


def normalized(text: str) -> str:
    """Width-folded, case-folded, whitespace-collapsed text: what "the same" means for exact duplicates."""
    return normalize_text(text)


def language(text: str) -> str:
    """``zh``, ``en``, ``other`` or ``none`` (see the module docstring)."""
    if text.isascii():  # most English text: its letters are all Latin (a fast path, same answer)
        return "en" if _LATIN_LETTER.search(text) else "none"
    cjk = len(_CJK_CHAR.findall(text))
    if cjk >= _CJK_SHARE * len(text):  # letters <= characters: Chinese without counting the letters
        return "zh"
    letters = len(_LETTER.findall(text))
    if letters == 0:
        return "none"
    if cjk >= _CJK_SHARE * letters:
        return "zh"
    if len(_LATIN_LETTER.findall(text)) >= _LATIN_SHARE * letters:
        return "en"
    return "other"


def word_tokens(text: str) -> list[str]:
    """Each CJK character is a token, each run of other letters/digits one token (as ROUGE scores Chinese)."""
    return _TOKEN.findall(text)


def leading_word(normalized_text: str) -> str:
    """The word an instruction starts with, after a polite prefix: its task verb in most instructions.

    English: the first word (``please`` skipped). Chinese: the first two characters after a polite prefix
    (请 / 帮我 / 麻烦 ...), since a Chinese verb is usually one or two characters (写, 翻译, 总结, 解释).
    """
    tokens = word_tokens(normalized_text[:200])
    while tokens and tokens[0] in _EN_POLITE:
        tokens = tokens[1:]
    if not tokens:
        return ""
    if not _CJK_CHAR.match(tokens[0]):
        return tokens[0]
    text = "".join(tokens[:6])
    for prefix in _ZH_POLITE:
        if text.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix) :]
            break
    head = ""
    for char in text:
        if not _CJK_CHAR.match(char) or len(head) == 2:
            break
        head += char
    return head or tokens[0]
