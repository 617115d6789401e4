"""Cosine similarity of sentence embeddings, from a sentence-transformers model already on disk.

Optional: ``sentence-transformers`` is imported only when a model is loaded, and a missing package or model is
not an error but a reason the evaluation report can show. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

Encode = Callable[[list[str]], Sequence[Sequence[float]]]
"""Texts -> one embedding vector per text."""


class EmbeddingScorer:
    """Scores answers by the cosine similarity of their embeddings to the references' embeddings."""

    def __init__(self, encode: Encode) -> None:
        """``encode`` maps a list of texts to their vectors; tests pass a fake, :meth:`from_path` a real model."""
        self.encode = encode

    @classmethod
    def from_path(cls, path: str | Path) -> EmbeddingScorer | None:
        """The scorer for the model at ``path``, or ``None`` (see :func:`load_embedding_scorer` for why)."""
        return load_embedding_scorer(path)[0]

    def similarity(self, preds: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Cosine similarity of each prediction with its reference, in -1..1; 0.0 where either vector is zero."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
        if not preds:
            return []
        # One encode call for both sides: the model batches them together.
        vectors = np.asarray(self.encode([*preds, *refs]), dtype=np.float64)
        pred_vectors, ref_vectors = vectors[: len(preds)], vectors[len(preds) :]
        norms = np.linalg.norm(pred_vectors, axis=1) * np.linalg.norm(ref_vectors, axis=1)
        dots = np.einsum("ij,ij->i", pred_vectors, ref_vectors)
        return [float(dot / norm) if norm > 0 else 0.0 for dot, norm in zip(dots, norms, strict=True)]


def load_embedding_scorer(path: str | Path) -> tuple[EmbeddingScorer | None, str]:
    """``(scorer, "")`` for the sentence-transformers model saved at ``path``, or ``(None, reason)``.

    The path must be an existing folder: given anything else, sentence-transformers would treat it as a Hub id
    and try to download it.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None, f"embedding model folder {folder} does not exist"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, "sentence-transformers is not installed: pip install 'tunelab[eval]'"
    try:
        model = SentenceTransformer(str(folder), local_files_only=True)
    except Exception as exc:  # any load failure only disables this optional metric, so report it, do not raise
        return None, f"could not load embedding model from {folder}: {type(exc).__name__}: {exc}"
    return EmbeddingScorer(lambda texts: model.encode(texts, convert_to_numpy=True)), ""
