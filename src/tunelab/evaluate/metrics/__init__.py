"""Task metrics for fine-tuned LLM answers, in Chinese and English: pure functions, no model code.

The evaluation runner calls :func:`score_samples` then :func:`summarize`; the rest is public for reuse and tests.
"""

from tunelab.evaluate.metrics.bootstrap import bootstrap_ci
from tunelab.evaluate.metrics.classification import classification_report
from tunelab.evaluate.metrics.embedding import EmbeddingScorer, load_embedding_scorer
from tunelab.evaluate.metrics.exact import exact_match
from tunelab.evaluate.metrics.normalize import normalize_text
from tunelab.evaluate.metrics.score import SampleScores, score_samples, summarize
from tunelab.evaluate.metrics.select import answer_kind, infer_label_set
from tunelab.evaluate.metrics.structured import (
    ToolCallScore,
    aggregate_tool_calls,
    json_valid,
    parse_json_answer,
    score_tool_call,
)
from tunelab.evaluate.metrics.text import bleu, corpus_bleu, rouge_l, rouge_n, tokenize

__all__ = [
    "EmbeddingScorer",
    "SampleScores",
    "ToolCallScore",
    "aggregate_tool_calls",
    "answer_kind",
    "bleu",
    "bootstrap_ci",
    "classification_report",
    "corpus_bleu",
    "exact_match",
    "infer_label_set",
    "json_valid",
    "load_embedding_scorer",
    "normalize_text",
    "parse_json_answer",
    "rouge_l",
    "rouge_n",
    "score_samples",
    "score_tool_call",
    "summarize",
    "tokenize",
]
