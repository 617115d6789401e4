"""Content diversity by topic: TF-IDF terms of a seeded sample of records, reduced by LSA, clustered by k-means.

    terms      English: words of two or more letters, less stop words. Chinese: character bigrams inside runs of CJK
               characters (bigrams stand in for words without a segmenter; a bigram holding a function character
               such as 的, 了, 是 is left out). Text: the prompt and the answer, half of :data:`TEXT_CHARS` each.
    sample     :data:`SAMPLE` records drawn without replacement by a seeded generator (all when fewer).
    vocabulary terms in at least :data:`MIN_DF` sampled records, the :data:`VOCABULARY` most frequent (terms in
               every record are kept: a corpus on one topic must still show it); weights ``(1 + log tf) * idf``, the
               smoothed ``idf = log((1 + n) / (1 + df)) + 1``; each record's row scaled to unit length.
    LSA        a randomized truncated SVD (Halko, Martinsson and Tropp 2011) to :data:`DIMENSIONS` dimensions,
               rows scaled to unit length again, so distances are cosine distances between topics, not words.
    k-means    k-means++ seeding and Lloyd iterations, for each k from 2 to :data:`K_MAX`; the k with the highest
               mean silhouette on a fixed subsample wins, and clusters whose centroids point the same way
               (cosine >= :data:`MERGE_COSINE`) are merged, since k-means cuts one topic into parts when asked for
               more clusters than there are topics. When no k reaches :data:`MIN_SILHOUETTE` no clusters stand out,
               for one of two reasons told apart by *cohesion*, the mean cosine similarity of two records: all are
               on one topic (cohesion >= :data:`ONE_TOPIC_COHESION`, one cluster), or they share none
               (:data:`K_MAX` clusters, an even partition to browse). Silhouettes cannot judge k = 1, and centroids
               of an arbitrary partition of unrelated records look alike, hence the two rules.
    score      entropy of the cluster sizes divided by ``log(K_MAX)``: 1 when the records spread evenly over
               ``K_MAX`` or more topics, 0 when they all share one. ``exp(entropy)`` is the effective number of
               topics. Dividing by ``log(K_MAX)`` rather than ``log(k)`` keeps two even topics from scoring as high
               as twenty.

Everything is seeded (sample, projection, k-means++), so the same records and seed give the same topics.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["K_MAX", "SAMPLE", "Topics", "find_topics", "sample_indices", "topic_terms"]

SAMPLE = 20_000
TEXT_CHARS = 2000
MIN_DF = 2
VOCABULARY = 4096
DIMENSIONS = 50
K_MAX = 20
MIN_SILHOUETTE = 0.1
"""Below this best mean silhouette (cosine, -1..1) clusters overlap more than they separate."""
ONE_TOPIC_COHESION = 0.3
"""Records among which no clusters stand out are one topic when their mean cosine similarity reaches this, and
share no topic below it. Measured on crafted corpora: 0.02 for random vocabulary and the bench's synthetic
corpus, 0.40 for three clear topics, 0.80 for one."""
MERGE_COSINE = 0.5
"""Clusters whose centroids (summed TF-IDF rows) have at least this cosine are one topic. Measured on crafted
corpora: 0.83 and 0.97 between two halves of one topic, at most 0.2 between different topics."""
SELECTION_SAMPLE = 4000
SILHOUETTE_SAMPLE = 2000
TOP_TERMS = 8
EXAMPLES = 3
MIN_PER_CLUSTER = 3
"""k is at most the sample size over this, so every cluster can hold a few records."""
_ITERATIONS = 50
_CHUNK = 1024  # sampled records densified at a time: 1024 x VOCABULARY float32 is 16 MB

_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))
_WORD = re.compile(r"[a-z][a-z0-9]+")
_EN_STOP = frozenset([
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do",
    "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he",
    "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "let",
    "like", "many", "may", "me", "might", "more", "most", "must", "my", "no", "nor", "not", "now", "of", "off", "on",
    "once", "one", "only", "or", "other", "our", "ours", "out", "over", "own", "please", "same", "shall", "she",
    "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "then", "there", "these",
    "they", "this", "those", "through", "to", "too", "under", "until", "up", "upon", "us", "very", "was", "we",
    "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "within", "without",
    "would", "you", "your", "yours", "yourself",
])
_ZH_STOP = "的了是在和与或及我你他她它们这那个一不也就都而把被让给对从到为以之其所吗呢吧啊"
_ZH_STOP_CODES = np.array([ord(c) for c in _ZH_STOP])


def topic_terms(text: str) -> list[str]:
    """The terms of a normalised (case-folded) text, as :func:`find_topics` counts them."""
    ids = _term_ids([text])[1]
    words = {_word_id(w): w for w in _WORD.findall(text[:TEXT_CHARS])}
    return [_term_name(int(i), words) for i in ids]


_WORD_BIT = np.int64(1) << np.int64(42)
"""Term ids: a Chinese bigram is its two code points (21 bits each, below this bit); a word is this bit plus the
crc32 of its UTF-8 bytes (two words share an id about once in 4 billion pairs, which merges their counts)."""


def _word_id(word: str) -> int:
    return int(_WORD_BIT) | zlib.crc32(word.encode("utf-8"))


def _term_name(term: int, words: dict[int, str]) -> str:
    if term & int(_WORD_BIT):
        return words.get(term, "?")
    return chr(term >> 21) + chr(term & 0x1FFFFF)


def _term_ids(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(document, term id)`` of every term of ``texts``: words through a regex, bigrams in numpy.

    Bigrams come from the code points directly (a bigram is two neighbouring CJK characters, neither of them a
    function character), which is an order of magnitude faster than a regex with overlapping matches.
    """
    owners, ids = [], []
    for doc, text in enumerate(texts):
        words = [w for w in _WORD.findall(text[:TEXT_CHARS]) if w not in _EN_STOP]
        ids.append(np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.int64, count=len(words))
                   | _WORD_BIT)
        owners.append(np.full(len(words), doc, dtype=np.int64))
    clipped = [t[:TEXT_CHARS] for t in texts]
    codes = np.frombuffer("\n".join(clipped).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), [len(t) + 1 for t in clipped])[: codes.size]
    ok = np.zeros(codes.size, dtype=bool)
    for low, high in _CJK_RANGES:
        ok |= (codes >= low) & (codes <= high)
    ok &= ~np.isin(codes, _ZH_STOP_CODES)
    pair = ok[:-1] & ok[1:]  # the "\n" between texts is not CJK, so no bigram crosses from one text to the next
    owners.append(owner[:-1][pair])
    ids.append((codes[:-1][pair] << np.int64(21)) | codes[1:][pair])
    return np.concatenate(owners), np.concatenate(ids)


def sample_indices(size: int, seed: int, sample: int = SAMPLE) -> list[int]:
    """Sorted stream indices of the sampled records."""
    if size <= sample:
        return list(range(size))
    return sorted(np.random.default_rng(seed).choice(size, sample, replace=False).tolist())


@dataclass
class _Matrix:
    """Rows of a sparse TF-IDF matrix (CSR), densified a chunk at a time for products."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    columns: int

    @property
    def rows(self) -> int:
        return self.indptr.size - 1

    def dense(self, start: int, stop: int) -> np.ndarray:
        block = np.zeros((stop - start, self.columns), dtype=np.float32)
        lo, hi = self.indptr[start], self.indptr[stop]
        owner = np.repeat(np.arange(stop - start), np.diff(self.indptr[start : stop + 1]))
        block[owner, self.indices[lo:hi]] = self.data[lo:hi]
        return block

    def times(self, right: np.ndarray) -> np.ndarray:
        """``X @ right``."""
        return np.concatenate([self.dense(i, min(i + _CHUNK, self.rows)) @ right
                               for i in range(0, self.rows, _CHUNK)] or [np.zeros((0, right.shape[1]), np.float32)])

    def cohesion(self) -> float:
        """Mean cosine similarity of two different rows: ``(|sum of rows|^2 - non-empty rows) / (n (n - 1))``,
        since every non-empty row has unit length."""
        n = self.rows
        total = np.bincount(self.indices, weights=self.data, minlength=self.columns)
        filled = int((np.diff(self.indptr) > 0).sum())
        return float((total @ total - filled) / (n * (n - 1))) if n > 1 else 0.0

    def transposed_times(self, right: np.ndarray) -> np.ndarray:
        """``X.T @ right``."""
        out = np.zeros((self.columns, right.shape[1]), dtype=np.float32)
        for i in range(0, self.rows, _CHUNK):
            stop = min(i + _CHUNK, self.rows)
            out += self.dense(i, stop).T @ right[i:stop]
        return out


def _tfidf(texts: Sequence[str]) -> tuple[_Matrix, list[str]]:
    """The sparse TF-IDF matrix of the texts and its vocabulary (see the module docstring).

    Texts are tokenised a chunk at a time and only each chunk's distinct (document, term) pairs with their counts
    are kept, so memory follows the number of distinct pairs, not the number of terms; rows are built per chunk.
    """
    n = len(texts)
    chunks = []
    for start in range(0, n, _CHUNK):
        owner, term = _term_ids(texts[start : start + _CHUNK])
        # Sorting (term << 10 | document) groups equal pairs: the runs are the term frequencies.
        pairs = np.sort((term << np.int64(10)) | owner)
        first = _run_starts(pairs)
        chunks.append(((pairs[first] & np.int64(_CHUNK - 1)).astype(np.int32), pairs[first] >> np.int64(10),
                       np.diff(np.append(first, pairs.size)).astype(np.int32)))
    ordered = np.sort(np.concatenate([term for _, term, _ in chunks]))
    first = _run_starts(ordered)
    terms, df = ordered[first], np.diff(np.append(first, ordered.size))  # each pair is one document with the term
    del ordered, first
    candidates = np.flatnonzero(df >= MIN_DF)
    # Most frequent first; ties by term id, which is stable across runs (no name needed yet).
    kept = candidates[np.lexsort((terms[candidates], -df[candidates]))][:VOCABULARY]
    idf = (np.log((1 + n) / (1 + df[kept])) + 1).astype(np.float32)
    by_id = np.argsort(terms[kept])
    kept_ids = terms[kept][by_id]
    rows, indices, data = [np.zeros(1, dtype=np.int64)], [], []
    for doc, term, tf in chunks:
        where = np.searchsorted(kept_ids, term).clip(max=max(kept_ids.size - 1, 0))
        inside = kept_ids[where] == term if kept_ids.size else np.zeros(term.size, dtype=bool)
        doc, col, tf = doc[inside], by_id[where[inside]], tf[inside]
        weight = (1 + np.log(tf, dtype=np.float32)) * idf[col]
        size = min(_CHUNK, n - _CHUNK * (len(rows) - 1))
        norm = np.sqrt(np.bincount(doc, weights=weight**2, minlength=size)).astype(np.float32)
        order = np.lexsort((col, doc))
        indices.append(col[order])
        data.append((weight / norm[doc])[order])
        rows.append(np.bincount(doc, minlength=size))
    indptr = np.cumsum(np.concatenate(rows))
    return _Matrix(indptr, np.concatenate(indices), np.concatenate(data).astype(np.float32), kept.size), \
        _names(terms[kept].tolist(), texts)


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Positions where a sorted array's value changes (0 first)."""
    if ordered.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))


def _names(term_ids: list[int], texts: Sequence[str]) -> list[str]:
    """The text of each term id: bigrams from their code points, words found again in the texts that hold them."""
    wanted = {t for t in term_ids if t & int(_WORD_BIT)}
    words: dict[int, str] = {}
    for text in texts:
        if len(words) == len(wanted):
            break
        for word in _WORD.findall(text[:TEXT_CHARS]):
            term = _word_id(word)
            if term in wanted:
                words.setdefault(term, word)
    return [_term_name(t, words) for t in term_ids]


def _lsa(matrix: _Matrix, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-length rows of ``U * S`` of a rank-``dims`` randomized SVD (one power iteration)."""
    width = min(dims + 10, matrix.columns, matrix.rows)
    y = matrix.times(rng.standard_normal((matrix.columns, width)).astype(np.float32))
    q, _ = np.linalg.qr(matrix.times(matrix.transposed_times(np.linalg.qr(y)[0])))
    u, s, _ = np.linalg.svd(matrix.transposed_times(q).T, full_matrices=False)
    keep = min(dims, s.size)
    points = (q @ u[:, :keep]) * s[:keep]
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return np.divide(points, norms, out=np.zeros_like(points), where=norms > 0)


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator,
            centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, centres)`` of k-means: k-means++ seeding (unless ``centers`` are given), then Lloyd iterations to
    a fixed point or :data:`_ITERATIONS`."""
    n = points.shape[0]
    if centers is None:
        centers = np.empty((k, points.shape[1]), dtype=points.dtype)
        centers[0] = points[rng.integers(n)]
        nearest = ((points - centers[0]) ** 2).sum(axis=1)
        for c in range(1, k):
            total = float(nearest.sum())
            pick = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
            centers[c] = points[pick]
            nearest = np.minimum(nearest, ((points - centers[c]) ** 2).sum(axis=1))
    centers = centers.copy()
    labels = np.full(n, -1)
    squared = (points**2).sum(axis=1, keepdims=True)
    for _ in range(_ITERATIONS):
        distances = squared - 2 * points @ centers.T + (centers**2).sum(axis=1)
        new = distances.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        onehot = np.eye(k, dtype=points.dtype)[labels]
        sizes = onehot.sum(axis=0)
        moved = onehot.T @ points
        filled = sizes > 0  # a cluster left empty keeps its centre
        centers[filled] = moved[filled] / sizes[filled, None]
    return labels, centers


def _silhouette(distances: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean silhouette (Rousseeuw 1987) from a precomputed distance matrix; a point alone in its cluster scores 0."""
    onehot = np.eye(k, dtype=np.float64)[labels]
    sizes = onehot.sum(axis=0)
    sums = distances @ onehot  # per point, the summed distance to each cluster
    own = sizes[labels]
    inside = sums[np.arange(labels.size), labels] / np.maximum(own - 1, 1)
    others = np.where(np.arange(k) == labels[:, None], np.inf, sums / np.maximum(sizes, 1))
    others[:, sizes == 0] = np.inf
    outside = others.min(axis=1)
    score = (outside - inside) / np.maximum(np.maximum(inside, outside), 1e-12)
    return float(np.where(own > 1, score, 0.0).mean())


@dataclass
class Topics:
    labels: np.ndarray
    """Per sampled record, its cluster (clusters numbered largest first)."""
    terms: list[list[str]]
    examples: list[list[int]]
    """Per cluster, positions in the sample of the records nearest its centre."""
    silhouettes: dict[int, float]
    k: int
    structured: bool
    cohesion: float
    """Mean cosine similarity of two sampled records' TF-IDF rows."""
    vocabulary: int
    dimensions: int
    sizes: list[int] = field(default_factory=list)

    def summary(self, sample: Sequence[int], total: int, seed: int) -> dict[str, Any]:
        """The report's ``diversity.topics`` block; ``sample`` maps positions to stream indices."""
        n = int(self.labels.size)
        entropy = max(0.0, -sum(s / n * math.log(s / n) for s in self.sizes if s))  # no -0.0 for one topic
        rule = (f"k from 2 to {K_MAX} with the highest mean silhouette (cosine) on {SILHOUETTE_SAMPLE:,} sampled "
                f"records, then clusters whose centroids have cosine >= {MERGE_COSINE} merged; when no k reaches "
                f"silhouette {MIN_SILHOUETTE}: one topic if the mean cosine similarity of two records is >= "
                f"{ONE_TOPIC_COHESION}, else {K_MAX} clusters")
        return {
            "score": round(entropy / math.log(K_MAX), 4),
            "computed_from": f"entropy of topic-cluster sizes / log({K_MAX}): k-means on LSA ({self.dimensions} "
                             f"dimensions) of TF-IDF terms (English words, Chinese character bigrams) of prompt + "
                             f"answer, over {n:,} records sampled from {total:,} (seed {seed})",
            "effective_topics": round(math.exp(entropy), 2), "k": self.k, "k_rule": rule,
            "structured": self.structured, "cohesion": round(self.cohesion, 4),
            "silhouettes": {str(k): round(v, 4) for k, v in self.silhouettes.items()},
            "sampled": n, "of": total, "seed": seed, "vocabulary": self.vocabulary,
            "clusters": [{"size": size, "share": round(size / n, 4), "terms": terms,
                          "examples": [int(sample[p]) for p in examples]}
                         for size, terms, examples in zip(self.sizes, self.terms, self.examples, strict=True)],
        }


def find_topics(texts: Sequence[str], seed: int) -> Topics | None:
    """Topic clusters of normalised texts (see the module docstring); ``None`` when too few records or terms.

    k is chosen on a seeded subsample of :data:`SELECTION_SAMPLE` records (k-means for every k there, silhouettes
    on its first :data:`SILHOUETTE_SAMPLE`); the chosen k's centres then start k-means on the whole sample.
    BLAS runs on one thread: these products are small, and on a busy machine threads that wait for each other made
    the step eight times slower (43 s against 5.6 s for 20,000 records on 2 shared cores).
    """
    from threadpoolctl import threadpool_limits

    if len(texts) < 2 * MIN_PER_CLUSTER:  # also keeps an empty input (every record unreadable) out of _tfidf
        return None
    with threadpool_limits(limits=1, user_api="blas"):
        matrix, vocabulary = _tfidf(texts)
        k_max = min(K_MAX, matrix.rows // MIN_PER_CLUSTER)
        if k_max < 2 or matrix.columns < 2:
            return None
        rng = np.random.default_rng(seed)
        points = _lsa(matrix, DIMENSIONS, rng)
        chosen = rng.permutation(points.shape[0])[:SELECTION_SAMPLE]
        subset = points[chosen]
        probe = subset[:SILHOUETTE_SAMPLE]
        probe_distances = np.clip(1.0 - probe @ probe.T, 0.0, 2.0).astype(np.float64)
        runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        silhouettes: dict[int, float] = {}
        for k in range(2, k_max + 1):
            runs[k] = _kmeans(subset, k, np.random.default_rng([seed, k]))
            silhouettes[k] = _silhouette(probe_distances, runs[k][0][:SILHOUETTE_SAMPLE], k)
        best = max(silhouettes, key=lambda k: (silhouettes[k], -k))
        structured = silhouettes[best] >= MIN_SILHOUETTE
        cohesion = matrix.cohesion()
        if structured:  # clusters stand out; parts of one topic among them are merged back
            labels = _merge_alike(matrix, _kmeans(points, best, rng, centers=runs[best][1])[0])
        elif cohesion >= ONE_TOPIC_COHESION:  # nothing stands out because every record is on the same topic
            labels = np.zeros(points.shape[0], dtype=np.int64)
        else:  # nothing stands out because the records share no topic: an even partition to browse
            labels = _kmeans(points, k_max, rng, centers=runs[k_max][1])[0]
        labels = _by_size(labels)
        return Topics(labels=labels, terms=_top_terms(matrix, labels, vocabulary), examples=_central(points, labels),
                      silhouettes=silhouettes, k=int(labels.max()) + 1, structured=structured,
                      cohesion=cohesion, vocabulary=len(vocabulary), dimensions=points.shape[1],
                      sizes=np.bincount(labels).tolist())


def _centroids(matrix: _Matrix, labels: np.ndarray) -> np.ndarray:
    """Per cluster, the sum of its records' TF-IDF rows (``k x vocabulary``)."""
    k = int(labels.max()) + 1
    owner = np.repeat(labels, np.diff(matrix.indptr))
    return np.bincount(owner * matrix.columns + matrix.indices, weights=matrix.data,
                       minlength=k * matrix.columns).reshape(k, matrix.columns)


def _merge_alike(matrix: _Matrix, labels: np.ndarray) -> np.ndarray:
    """Merge clusters whose centroids point the same way (cosine >= :data:`MERGE_COSINE`), transitively.

    k-means always makes k clusters: one topic cut in two comes back as two clusters with the same words.
    """
    from tunelab.data.quality.minhash import UnionFind

    centroids = _centroids(matrix, labels)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    unit = np.divide(centroids, norms, out=np.zeros_like(centroids), where=norms > 0)
    cosine = unit @ unit.T
    union = UnionFind(centroids.shape[0])
    for a, b in zip(*np.nonzero(np.triu(cosine, k=1) >= MERGE_COSINE), strict=True):
        union.union(int(a), int(b))
    return union.roots()[labels]


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters largest first (ties: the one whose first member comes first); empty clusters vanish."""
    present, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(present.size), key=lambda i: (-counts[i], first[i]))
    rank = np.empty(present.size, dtype=np.int64)
    rank[order] = np.arange(present.size)
    return rank[np.searchsorted(present, labels)]


def _top_terms(matrix: _Matrix, labels: np.ndarray, vocabulary: list[str]) -> list[list[str]]:
    """Per cluster, the terms with the highest mean weight over its records."""
    out = []
    for row in _centroids(matrix, labels):
        best = np.argsort(-row, kind="stable")[:TOP_TERMS]
        out.append([vocabulary[i] for i in best if row[i] > 0])
    return out


def _central(points: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """Per cluster, the members most similar (cosine) to the cluster's mean direction."""
    out = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        centre = points[members].mean(axis=0)
        similarity = points[members] @ centre
        out.append(members[np.argsort(-similarity, kind="stable")[:EXAMPLES]].tolist())
    return out
