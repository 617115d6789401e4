"""Corpus-level findings from the first pass: duplicates, near-duplicate clusters, leakage, conflicts, flags,
labels, diversity and lengths. Every finding names records by stream index; the report adds their text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.data.quality import minhash
from tunelab.data.quality.analyze import FLAG_BITS, Corpus, SignatureFile
from tunelab.data.quality.diversity import normalized_entropy
from tunelab.data.quality.flags import FLAGS
from tunelab.data.quality.stream import SPLITS

__all__ = ["EXAMPLES", "Clusters", "answer_variants", "cluster_near_duplicates", "conflicts", "diversity",
           "exact_groups", "flag_summary", "label_summary", "leakage", "length_summary"]

EXAMPLES = 5
"""Example groups (or records) listed per finding; report.json holds the counts of all."""
_PAIR_CHUNK = 16384  # records per signature read: 16 MB read, about 40 MB of temporaries
LABEL_IMBALANCE_RATIO = 5.0
"""Labels are imbalanced when the most common is at least this many times the least common."""


def _groups_of(keys: np.ndarray, valid: np.ndarray | None = None) -> list[np.ndarray]:
    """Index arrays of the records sharing a key (groups of two or more), ordered by their first member."""
    index = np.arange(keys.size) if valid is None else np.nonzero(valid)[0]
    order = index[np.argsort(keys[index], kind="stable")]
    ordered = keys[order]
    if ordered.size < 2:
        return []
    starts = np.concatenate(([0], np.nonzero(ordered[1:] != ordered[:-1])[0] + 1))
    ends = np.concatenate((starts[1:], [ordered.size]))
    shared = ends - starts > 1  # only these become arrays: a million singletons would not fit in a list
    groups = [order[a:b] for a, b in zip(starts[shared].tolist(), ends[shared].tolist(), strict=True)]
    return sorted(groups, key=lambda g: int(g[0]))


def exact_groups(corpus: Corpus) -> list[np.ndarray]:
    """Records whose normalised prompt and answer are both equal (width, case and whitespace folded)."""
    return _groups_of(corpus.columns["exact"])


@dataclass
class Clusters:
    root: np.ndarray
    """Per record, the smallest index of its cluster (itself when alone)."""
    threshold: float
    bands: int
    rows: int
    candidates: int
    verified: int

    def members(self) -> list[np.ndarray]:
        """Clusters of two or more records, largest first, then by first member."""
        groups = _groups_of(self.root.astype(np.uint64))
        return sorted(groups, key=lambda g: (-g.size, int(g[0])))


def cluster_near_duplicates(corpus: Corpus, threshold: float, part: int | None = None,
                            valid: np.ndarray | None = None) -> Clusters:
    """Union of MinHash-LSH pairs whose estimated Jaccard similarity is at least ``threshold``.

    ``part`` 0 compares prompts only, 1 answers only, ``None`` whole records: candidates come from the signature of
    all their shingles, and a pair is similar when its prompts and its answers each are.
    Exact duplicates of the chosen text join their first occurrence without a comparison, so only one
    representative of each enters LSH. Clusters are transitive: A~B and B~C put A and C together.
    """
    sigs = corpus.signatures
    n = corpus.size
    key = {None: "exact", 0: "prompt_hash", 1: "answer_hash"}[part]
    union = minhash.UnionFind(n)
    usable = np.ones(n, dtype=bool) if valid is None else valid
    for group in _groups_of(corpus.columns[key], usable):
        union.parent[group[1:]] = group[0]
    representatives = np.nonzero(usable & (union.parent == np.arange(n)))[0]
    bands, rows = minhash.lsh_bands(threshold, corpus.num_perm)
    keys = np.empty((bands, representatives.size), dtype=np.uint32)  # filled in place: no list of chunks to join
    for i in range(0, representatives.size, _PAIR_CHUNK):
        chunk = representatives[i : i + _PAIR_CHUNK]
        keys[:, i : i + chunk.size] = minhash.band_keys(_signature_rows(sigs, chunk, part), bands, rows)
    pairs = representatives[minhash.candidate_pairs(keys)]
    del keys
    verified = 0
    for start in range(0, len(pairs), _PAIR_CHUNK):
        chunk = pairs[start : start + _PAIR_CHUNK]
        similar = _similar(corpus, sigs, chunk, part, threshold)
        for a, b in chunk[similar]:
            union.union(int(a), int(b))
        verified += int(similar.sum())
    return Clusters(root=union.roots(), threshold=threshold, bands=bands, rows=rows, candidates=len(pairs),
                    verified=verified)


MIN_NEAR_CHARS = 30
"""Texts shorter than this match only exactly (after normalisation): "What is 0 plus 0?" and "What is 0 plus 3?"
share 13 of 16 shingles, yet ask different things; short texts have too few shingles for similarity to mean much."""
_PARTS = (("prompt_hash", "prompt_chars"), ("answer_hash", "answer_chars"))


def _similar(corpus: Corpus, sigs: SignatureFile, pairs: np.ndarray, part: int | None, threshold: float) -> np.ndarray:
    """Whether each pair is similar: in ``part``, or (whole records) in both prompt and answer.

    Both, not the union of the two: "Is the sky green?" answered "yes" and answered "no" share most of their
    characters, but they are a conflict, not a duplicate. A short text (:data:`MIN_NEAR_CHARS`) must be equal.
    """
    similar = np.ones(len(pairs), dtype=bool)
    for p in (0, 1) if part is None else (part,):
        hashes, chars = (corpus.columns[name] for name in _PARTS[p])
        a, b = pairs[:, 0], pairs[:, 1]
        short = (chars[a] < MIN_NEAR_CHARS) | (chars[b] < MIN_NEAR_CHARS)
        near = minhash.similarity(_signature_rows(sigs, a, p), _signature_rows(sigs, b, p)) >= threshold
        similar &= np.where(short, hashes[a] == hashes[b], near)
    return similar


def _signature_rows(sigs: SignatureFile, index: np.ndarray, part: int | None) -> np.ndarray:
    """Signatures of records ``index`` (sorted reads from the memory map): prompt, answer, or their union."""
    order = np.argsort(index, kind="stable")
    block = sigs.take(index[order])
    rows = block.min(axis=1) if part is None else block[:, part]
    out = np.empty_like(rows)
    out[order] = rows
    return out


def leakage(corpus: Corpus, clusters: Clusters) -> dict[str, Any]:
    """Held-out records (validation, test) with an exact or near duplicate among the training records."""
    split = corpus.columns["split"]
    train = SPLITS.index("train")
    train_roots = np.unique(clusters.root[split == train])
    held_out = (split == SPLITS.index("validation")) | (split == SPLITS.index("test"))
    leaked = held_out & np.isin(clusters.root, train_roots)
    by_split = {name: int((leaked & (split == SPLITS.index(name))).sum()) for name in ("validation", "test")}
    examples = []
    for index in np.nonzero(leaked)[0][:EXAMPLES]:
        partner = int(np.nonzero((clusters.root == clusters.root[index]) & (split == train))[0][0])
        examples.append({"held_out": int(index), "train": partner})
    return {"held_out_records": int(held_out.sum()), "leaked": int(leaked.sum()), "by_split": by_split,
            "examples": examples, "checked": bool(held_out.any() and (split == train).any())}


def conflicts(corpus: Corpus, prompts: Clusters) -> dict[str, Any]:
    """Groups of records with the same or a near-same prompt whose answers are neither equal nor near-equal."""
    answer_hash = corpus.columns["answer_hash"]
    is_label = corpus.columns["is_label"]
    has_prompt = corpus.columns["prompt_hash"] != 0
    found = []
    records = 0
    label_groups = 0
    groups = [g for g in _groups_of(prompts.root.astype(np.uint64), has_prompt)
              if np.unique(answer_hash[g]).size > 1]
    # Most groups are pairs (a record and its edited copy): their answers are compared together, in chunks.
    pairs = np.array([g for g in groups if g.size == 2], dtype=np.int64).reshape(-1, 2)
    pair_similar = np.concatenate([_similar(corpus, corpus.signatures, pairs[i : i + _PAIR_CHUNK], 1,
                                            prompts.threshold) for i in range(0, len(pairs), _PAIR_CHUNK)]
                                  or [np.zeros(0, dtype=bool)])
    pair_distinct = iter(np.where(pair_similar, 1, 2).tolist())
    for group in groups:
        distinct = next(pair_distinct) if group.size == 2 else \
            int(answer_variants(corpus, group, prompts.threshold).max()) + 1
        if distinct < 2:
            continue  # the answers differ only slightly: near-duplicates, not a conflict
        labels = bool(is_label[group].all())
        label_groups += labels
        records += group.size
        found.append({"records": group.tolist(), "distinct_answers": distinct, "labels": labels})
    found.sort(key=lambda g: (not g["labels"], -len(g["records"]), g["records"][0]))
    return {"groups": len(found), "records": records, "label_groups": label_groups, "examples": found[:EXAMPLES],
            "all": found}


_MAX_PAIRWISE = 200
"""Distinct answers of a prompt group compared all against all up to this many; beyond, only equal answers match."""


def answer_variants(corpus: Corpus, group: np.ndarray, threshold: float) -> np.ndarray:
    """Per member of ``group``, which of the group's different answers it gives: 0, 1, ... by first appearance.

    Equal answers (after normalisation) are one answer; so are near-duplicate answers, transitively, so a chain of
    small edits (A~B~C with A, C just under the threshold) is one answer, not a conflict.
    """
    _, first, exact = np.unique(corpus.columns["answer_hash"][group], return_index=True, return_inverse=True)
    representatives = group[first]
    union = minhash.UnionFind(representatives.size)
    if 1 < representatives.size <= _MAX_PAIRWISE:
        left, right = np.triu_indices(representatives.size, k=1)
        pairs = np.stack([representatives[left], representatives[right]], axis=1)
        similar = _similar(corpus, corpus.signatures, pairs, 1, threshold)
        for a, b in zip(left[similar].tolist(), right[similar].tolist(), strict=True):
            union.union(a, b)
    variant = union.roots()[exact.ravel()]
    _, first_member, dense = np.unique(variant, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first_member, kind="stable"), kind="stable")[dense.ravel()]


def flag_summary(corpus: Corpus) -> dict[str, Any]:
    flags = corpus.columns["flags"]
    n = max(corpus.size, 1)
    out = {}
    for name, (_, meaning) in FLAGS.items():
        hit = np.nonzero(flags & np.uint16(FLAG_BITS[name]))[0]
        out[name] = {"count": int(hit.size), "share": round(hit.size / n, 4), "meaning": meaning,
                     "examples": hit[:EXAMPLES].tolist()}
    return out


def label_summary(corpus: Corpus) -> dict[str, Any] | None:
    """The label spread when answers form a small label set (:func:`infer_label_set`), else ``None``."""
    if not corpus.label_set:
        return None
    counts = dict(corpus.label_counts.most_common())
    ratio = max(counts.values()) / max(min(counts.values()), 1)
    covered = sum(counts.values())
    return {"labels": counts, "records_with_label": covered, "share_of_records": round(covered / corpus.size, 4),
            "imbalance_ratio": round(ratio, 2), "imbalanced": ratio >= LABEL_IMBALANCE_RATIO,
            "rule": f"imbalanced when the most common label has >= {LABEL_IMBALANCE_RATIO:g}x the least common"}


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def diversity(corpus: Corpus) -> dict[str, Any]:
    """One score per dimension, each in 0..1 (higher = more diverse), with what it is computed from and whether it
    describes the instructions or the content. Topics (content) come later, from a sample (:mod:`.topics`)."""
    leading = corpus.leading_words
    total = sum(leading.values())
    top = leading.most_common(10)
    top_share = sum(c for _, c in top) / total if total else None
    entropy = normalized_entropy(leading)
    effective = math.exp(-sum(c / total * math.log(c / total) for c in leading.values())) if total else None
    lengths = corpus.columns["answer_chars"].astype(np.float64)
    length_bins = np.bincount(np.floor(np.log2(lengths + 1)).astype(np.int64)) if lengths.size else np.zeros(0)
    length_entropy = normalized_entropy({str(i): int(c) for i, c in enumerate(length_bins)})
    d = corpus.distinct
    return {
        "instructions": {
            "kind": "instructions", "score": _ratio(d["instruction_2"].ratio),
            "computed_from": "distinct-2: distinct token bigrams / all token bigrams of the last user turns "
                             "(a CJK character or a Latin word is a token)",
            "distinct_1": _ratio(d["instruction_1"].ratio), "distinct_2": _ratio(d["instruction_2"].ratio),
            "estimated": d["instruction_2"].saturated,
        },
        "task_types": {
            "kind": "instructions", "score": _ratio(entropy),
            "computed_from": "normalised entropy of the leading words of instructions (first English word, first two "
                             "Chinese characters after 请/帮我/...): 1 = evenly spread, 0 = one word",
            "distinct_leading_words": len(leading), "effective_number": _ratio(effective),
            "top10_share": _ratio(top_share), "top": [{"word": w, "count": c} for w, c in leading.most_common(20)],
        },
        "answers": {
            "kind": "content", "score": _ratio(d["answer_2"].ratio),
            "computed_from": "distinct-2 of answer tokens",
            "distinct_2": _ratio(d["answer_2"].ratio), "estimated": d["answer_2"].saturated,
        },
        "answer_lengths": {
            "kind": "content", "score": _ratio(length_entropy),
            "computed_from": "normalised entropy of answer lengths in log2 character bins (1-, 2-3, 4-7, ... chars)",
            "bins": {f"{2 ** i - 1}-{2 ** (i + 1) - 2}": int(c) for i, c in enumerate(length_bins) if c},
        },
    }


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    p = np.percentile(values, [50, 90, 99])
    return {"mean": round(float(values.mean()), 1), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]),
            "max": int(values.max())}


def _histogram(values: np.ndarray, cutoff: int | None = None) -> dict[str, list]:
    if values.size == 0:
        return {"edges": [], "counts": []}
    high = max(float(values.max()), float(cutoff or 0)) + 1
    counts, edges = np.histogram(values, bins=40, range=(0, high))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def length_summary(corpus: Corpus, cutoff_len: int | None) -> dict[str, Any]:
    c = corpus.columns
    chars = c["prompt_chars"].astype(np.int64) + c["answer_chars"]
    out: dict[str, Any] = {
        "chars": {"prompt": _percentiles(c["prompt_chars"]), "answer": _percentiles(c["answer_chars"]),
                  "histogram": _histogram(chars)},
        "tokens": None,
    }
    if corpus.tokens and cutoff_len is not None:
        tokens = c["tokens"]
        truncated = tokens > cutoff_len
        lost = c["supervised"].astype(np.int64) - c["supervised_kept"]
        dropped = (c["supervised_kept"] == 0) & (c["supervised"] > 0)
        out["tokens"] = {
            "cutoff_len": cutoff_len, "lengths": _percentiles(tokens), "histogram": _histogram(tokens, cutoff_len),
            "truncated": int(truncated.sum()), "truncated_share": round(float(truncated.mean()), 4),
            "supervised_tokens": int(c["supervised"].sum()), "supervised_tokens_lost": int(lost.sum()),
            "supervised_lost_share": round(float(lost.sum() / max(int(c["supervised"].sum()), 1)), 4),
            "dropped_no_answer_left": int(dropped.sum()),
            "longest": np.argsort(-tokens.astype(np.int64), kind="stable")[:EXAMPLES].tolist(),
        }
    return out
