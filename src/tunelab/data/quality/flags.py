"""Answer-quality flags: cheap, explainable checks on one record's prompt and answer.

Each flag is a pure function of the texts, so a flag in the report can always be reproduced by hand. They are
hints for a human to look at, not verdicts: a one-word answer is fine for classification, a translation answers
in another language on purpose. The label set, when answers form one, exempts those answers from ``empty``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FLAGS", "Texts", "answer_flags"]


@dataclass(frozen=True)
class Texts:
    """What the checks look at, computed once per record."""

    prompt: str
    """The last user turn, as written."""
    answer: str
    prompt_norm: str
    answer_norm: str
    prompt_lang: str
    answer_lang: str
    copy_similarity: float
    """Estimated Jaccard similarity of the prompt's and the answer's shingles (MinHash)."""
    distinct_long_ngrams: float
    """Share of distinct 10-character substrings in the normalised answer (1.0 when shorter)."""
    is_label: bool = False


_PLACEHOLDERS = frozenset({"n/a", "na", "null", "none", "nan", "todo", "tbd", "...", "无", "暂无", "略", "空"})
_TWO_MEANINGFUL = re.compile(r"[^\W_][\W_]*[^\W_]")
"""Matches when a text holds at least two letters or digits (the first two, and what lies between), without
counting them all."""
NEAR_EMPTY_CHARS = 2
"""An answer with fewer letters/digits than this (and not a label) is near-empty (:data:`_TWO_MEANINGFUL` counts
to two)."""
COPY_SIMILARITY = 0.9
COPY_MIN_CHARS = 10
LOOP_NGRAM = 10
LOOP_MAX_DISTINCT = 0.5
"""A loop: fewer than half of the answer's 10-character substrings are distinct (natural prose is above 0.9)."""
LOOP_MIN_CHARS = 40
TRUNCATION_MIN_CHARS = 40

# A complete answer ends in sentence punctuation, a closing bracket/quote, a digit, an emoji or a code fence.
_COMPLETE_END = re.compile(r"""[.!?。！？…~～)\]}）】」』"'”’`>%*:：;；\d\U0001F300-\U0001FAFF]""")
_SENTENCE_PUNCT = re.compile(r"[.!?。！？]")
_TRANSLATION = re.compile(r"translat|翻译|译成|译为|英文|中文|英语|汉语|chinese|english", re.IGNORECASE)
_REFUSAL = re.compile(
    "|".join([
        r"\bas an ai\b", r"\bas a language model\b", r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
        r"\bi can(?:no|')t (?:help|assist|provide|answer|do that)\b", r"\bi cannot (?:help|assist|provide|answer)\b",
        r"作为(?:一个|一名)?(?:ai|人工智能|语言模型|ai语言模型)", r"我(?:无法|不能)(?:提供|回答|帮助|协助|完成)",
        r"(?:很|非常)?抱歉[,，]?我(?:无法|不能)", r"对不起[,，]?我(?:无法|不能)",
    ]),
    re.IGNORECASE,
)


def _empty(t: Texts) -> bool:
    if t.is_label:
        return False
    return _TWO_MEANINGFUL.search(t.answer_norm) is None or t.answer_norm in _PLACEHOLDERS


def _copy(t: Texts) -> bool:
    if t.answer_norm == t.prompt_norm:
        return True
    if len(t.answer_norm) >= COPY_MIN_CHARS and t.answer_norm in t.prompt_norm:
        return True
    return len(t.answer_norm) >= COPY_MIN_CHARS and t.copy_similarity >= COPY_SIMILARITY


def _loop(t: Texts) -> bool:
    return len(t.answer_norm) >= LOOP_MIN_CHARS and t.distinct_long_ngrams < LOOP_MAX_DISTINCT


def _truncated(t: Texts) -> bool:
    """Prose that stops mid-sentence, or a code block left open."""
    if t.answer.count("```") % 2 == 1:
        return True
    text = t.answer.rstrip()
    if len(text) < TRUNCATION_MIN_CHARS or not _SENTENCE_PUNCT.search(text):
        return False  # labels, names, code and lists without sentences end however they like
    return not _COMPLETE_END.match(text[-1])  # the text is right-stripped: its last character decides


def _language(t: Texts) -> bool:
    both = {t.prompt_lang, t.answer_lang}
    return t.prompt_lang != t.answer_lang and both <= {"zh", "en"} and not _TRANSLATION.search(t.prompt)


def _refusal(t: Texts) -> bool:
    return _REFUSAL.search(t.answer_norm[:300]) is not None


FLAGS: dict[str, tuple[Callable[[Texts], bool], str]] = {
    "empty": (_empty, f"answer has fewer than {NEAR_EMPTY_CHARS} letters or digits, or is a placeholder (n/a, 无)"),
    "copy": (_copy, f"answer equals the prompt, is a substring of it, or shares >= {COPY_SIMILARITY:.0%} of its "
                    "3-character shingles (MinHash estimate)"),
    "loop": (_loop, f"under {LOOP_MAX_DISTINCT:.0%} of the answer's {LOOP_NGRAM}-character substrings are distinct "
                    "(repeated text)"),
    "truncated": (_truncated, "prose answer that ends without closing punctuation, or an unclosed ``` code block"),
    "language": (_language, "answer is Chinese and prompt English or the reverse (translation prompts excepted)"),
    "refusal": (_refusal, "answer opens with a refusal or AI boilerplate (as an AI / 作为一个AI / 我无法提供 ...)"),
}
"""Flag name -> (check, what it means). The names are the values of ``tunelab data clean --drop-flags``."""


def answer_flags(t: Texts) -> list[str]:
    return [name for name, (check, _) in FLAGS.items() if check(t)]
