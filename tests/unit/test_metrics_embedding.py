"""Embedding similarity: the missing-model paths and the cosine, with a fake encoder."""

import importlib.util
import sys

import pytest

from tunelab.evaluate.metrics import EmbeddingScorer, load_embedding_scorer


def _count_vector(text):
    # A fake embedding: counts of the letters a, b, c.
    return [text.count("a"), text.count("b"), text.count("c")]


def test_cosine_of_fake_embeddings_by_hand():
    scorer = EmbeddingScorer(lambda texts: [_count_vector(t) for t in texts])
    similarity = scorer.similarity(["aab", "c", "ab", ""], ["ab", "a", "ba", "a"])
    # (2,1,0)·(1,1,0) = 3, |(2,1,0)| = sqrt 5, |(1,1,0)| = sqrt 2 -> 3 / sqrt 10; orthogonal -> 0; same -> 1;
    # the empty text has a zero vector -> 0 rather than NaN
    assert similarity == pytest.approx([3 / 10**0.5, 0.0, 1.0, 0.0])


def test_predictions_and_references_are_encoded_in_one_batch():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return [_count_vector(t) for t in texts]

    assert EmbeddingScorer(encode).similarity(["a", "b"], ["a", "c"]) == pytest.approx([1.0, 0.0])
    assert calls == [["a", "b", "a", "c"]]
    assert EmbeddingScorer(encode).similarity([], []) == []


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        EmbeddingScorer(lambda texts: []).similarity(["a", "b"], ["a"])


def test_missing_folder_gives_a_reason_and_downloads_nothing(tmp_path, monkeypatch):
    # A Hub id must not be passed on: sentence-transformers would download it. Make any import of it fail loudly.
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    scorer, reason = load_embedding_scorer("sentence-transformers/all-MiniLM-L6-v2")
    assert scorer is None
    assert reason == "embedding model folder sentence-transformers/all-MiniLM-L6-v2 does not exist"
    assert EmbeddingScorer.from_path(tmp_path / "absent") is None


def test_missing_package_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    scorer, reason = load_embedding_scorer(tmp_path)
    assert scorer is None
    assert reason == "sentence-transformers is not installed: pip install 'tunelab[eval]'"


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None, reason="needs sentence-transformers")
def test_folder_that_is_not_a_model_gives_the_load_error(tmp_path):
    scorer, reason = load_embedding_scorer(tmp_path)
    assert scorer is None
    assert reason.startswith(f"could not load embedding model from {tmp_path}: ")
