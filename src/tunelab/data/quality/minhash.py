"""MinHash signatures over character shingles and LSH banding, in numpy, for near-duplicate search at corpus scale.

Shingles are character n-grams (:data:`SHINGLE_CHARS`) of the normalised text, so Chinese, which has no spaces to
split words on, works the same as English. Each shingle is hashed with a fixed polynomial over its code points and
the murmur3 finaliser; each of ``num_perm`` hash functions is ``x -> a*x + b (mod 2**32)`` followed by an xorshift,
with ``a``, ``b`` drawn from a fixed seed, so signatures are identical across runs and machines.

Why not ``datasketch``: its ``MinHash`` is one Python object per text and its LSH index is a dict of Python lists per
band, a few hundred bytes per record per band; at a million records that is gigabytes. Here a batch of texts is
hashed in one vectorised pass, signatures are plain ``uint32`` rows (written to disk by the caller when large) and
candidate pairs come from sorting 32-bit band keys, so memory stays four bytes per record per band (72 bytes per
record at the default threshold's 18 bands).

The signature of a union of shingle sets is the element-wise minimum of their signatures, so a record's
whole-text signature is ``min(prompt, answer)`` with no second pass over its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHINGLE_CHARS = 3
"""Characters per shingle: about one and a half Chinese words, or a syllable of English."""
NUM_PERM = 128
"""Hash functions per signature: the standard error of a similarity estimate is sqrt(J(1-J)/NUM_PERM), 0.035 at
0.8. At 64 a pair that differs in two characters of 170 (true similarity 0.93) was judged below 0.8 about once in
a few thousand pairs, which showed up as false conflicts in a 100,000-record corpus."""
EMPTY = np.uint32(0xFFFFFFFF)
"""Every slot of an empty text's signature."""

_SEED = 20240531
_MAX_CHUNK_SHINGLES = 16384  # shingles hashed per step: a (num_perm x 16384) uint32 block, 8 MB
_POLY = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1], dtype=np.uint32)


@dataclass(frozen=True)
class Permutations:
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def make(cls, num_perm: int = NUM_PERM, seed: int = _SEED) -> Permutations:
        rng = np.random.default_rng(seed)
        a = rng.integers(1, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)  # odd: bijective
        b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
        return cls(a=a, b=b)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's finaliser: spreads every input bit over the whole word."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingle_hashes(texts: Sequence[str], size: int = SHINGLE_CHARS) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every ``size``-character shingle of every text, concatenated, and the number per text.

    A text shorter than a shingle is one shingle (padded); an empty text has none.
    """
    padded = [t + "\0" * (size - len(t)) if 0 < len(t) < size else t for t in texts]
    lengths = np.fromiter((len(t) for t in padded), dtype=np.int64, count=len(padded))
    counts = np.maximum(lengths - (size - 1), 0)
    codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32)
    if codes.size < size:
        return np.zeros(0, dtype=np.uint32), counts
    n = codes.size - (size - 1)
    h = codes[:n] * _POLY[0]
    for k in range(1, size):
        h = (h ^ (h >> np.uint32(17))) * _POLY[k % _POLY.size] + codes[k : k + n]
    # Keep shingles that lie inside one text: position within its text <= length - SHINGLE_CHARS.
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    owner = np.repeat(np.arange(len(padded)), lengths)[:n]
    valid = (np.arange(n) - starts[owner]) < counts[owner]
    return _fmix32(h[valid]), counts


def signatures(texts: Sequence[str], perms: Permutations) -> np.ndarray:
    """A ``(len(texts), num_perm)`` uint32 MinHash signature per text; empty texts get :data:`EMPTY` everywhere."""
    hashes, counts = shingle_hashes(texts)
    out = np.full((len(texts), perms.a.size), EMPTY, dtype=np.uint32)
    ends = np.cumsum(counts)
    text = 0
    while text < len(texts):
        # Group whole texts into chunks of about _MAX_CHUNK_SHINGLES shingles (a longer text is a chunk of its own).
        first = text
        start = ends[first] - counts[first]
        stop = int(np.searchsorted(ends, start + _MAX_CHUNK_SHINGLES, side="right"))
        text = max(stop, first + 1)
        chunk_counts = counts[first:text]
        present = chunk_counts > 0
        if not present.any():
            continue
        # (num_perm, shingles): each permutation's values lie contiguous, so the per-text minimum reduces along
        # the last axis, about 30x faster in numpy than reducing the transposed layout along its first.
        values = np.multiply.outer(perms.a, hashes[start : ends[text - 1]])
        values += perms.b[:, None]
        values ^= values >> np.uint32(15)
        offsets = (np.cumsum(chunk_counts) - chunk_counts)[present]
        out[first:text][present] = np.minimum.reduceat(values, offsets, axis=1).T
    return out


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D array by sorting: numpy 2's hash-based ``unique`` is several times slower on the
    hundred thousand uint64 hashes of a batch (measured 89 ms against 12 ms)."""
    ordered = np.sort(values)
    if ordered.size < 2:
        return ordered
    keep = np.empty(ordered.size, dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def distinct_shares(texts: Sequence[str], size: int) -> np.ndarray:
    """Per text, the share of its ``size``-character substrings that are distinct (1.0 for a shorter text)."""
    hashes, counts = shingle_hashes(texts, size)
    owner = np.repeat(np.arange(len(texts), dtype=np.uint64), counts)
    keys = sorted_unique((owner << np.uint64(32)) | hashes.astype(np.uint64))
    distinct = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=len(texts))
    return np.where(counts > 1, distinct / np.maximum(counts, 1), 1.0)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of row pairs: the share of equal slots."""
    return (sig_a == sig_b).mean(axis=-1)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` whose S-curve midpoint ``(1/bands)**(1/rows)`` lies about 0.1 below ``threshold``.

    Candidates are verified on the full signature afterwards, so erring towards more candidates only costs time;
    a pair at the threshold becomes a candidate with probability above 0.95 for thresholds of 0.5 to 0.95.
    """
    target = max(threshold - 0.1, 0.05)
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1.0 / bands) ** (1.0 / rows) <= target:
            return bands, rows
    return num_perm, 1


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A ``(bands, len(sigs))`` uint32 key per band per signature: equal rows in a band give equal keys.

    32 bits, not 64: a key only proposes a candidate pair, which is then verified on the full signature, so a chance
    collision (about ``n**2 / 2**33`` per band, a few hundred at a million records) costs one comparison each and
    changes no finding, while the table of keys, the largest thing the report holds, is half the size.
    """
    keys = np.empty((bands, sigs.shape[0]), dtype=np.uint32)
    for band in range(bands):
        part = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.zeros(sigs.shape[0], dtype=np.uint64)
        for column in range(rows):
            key = (key ^ part[:, column]) * np.uint64(0x100000001B3)  # FNV-1a style fold
            key ^= key >> np.uint64(29)
        keys[band] = (key ^ (key >> np.uint64(32))).astype(np.uint32)
    return keys


_LOW32 = np.uint64(0xFFFFFFFF)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """``(k, 2)`` index pairs that share a band key, each as (first index in the bucket, other member), deduplicated
    and sorted.

    ``keys`` is :func:`band_keys`' ``(bands, n)`` table. Per band, key and index are packed into one uint64
    (``key << 32 | index``) and sorted in place: equal keys become neighbours, ordered by index, so the first of a
    run is the bucket's smallest index. This needs one 8-byte word per record per band at a time, where a dict of
    buckets needs a Python object per record per band. Linking every member of a bucket to the bucket's first member
    keeps the pair count linear in the bucket size.
    """
    n = keys.shape[1]
    if n >= 2**32:
        raise ValueError("candidate_pairs packs indices into 32 bits: at most 2**32 - 1 records")
    index = np.arange(n, dtype=np.uint64)
    packed = np.empty(n, dtype=np.uint64)
    found = []
    for band in range(keys.shape[0]):
        packed[:] = keys[band]
        packed <<= np.uint64(32)
        packed |= index
        packed.sort()
        high = packed >> np.uint64(32)
        members = np.flatnonzero(high[1:] == high[:-1]) + 1  # sorted positions that continue a run of equal keys
        del high
        if members.size == 0:
            continue
        # The run a member belongs to starts just before its first member: consecutive member positions share it.
        new_run = np.concatenate(([True], members[1:] != members[:-1] + 1))
        starts = (members[new_run] - 1)[np.cumsum(new_run) - 1]
        first, other = packed[starts] & _LOW32, packed[members] & _LOW32
        found.append((first << np.uint64(32)) | other)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found))
    return np.stack([(pairs >> np.uint64(32)).astype(np.int64), (pairs & _LOW32).astype(np.int64)], axis=1)


class UnionFind:
    """Disjoint sets over ``0..n-1``; the root of a set is its smallest member, so clusters are named stably."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = int(parent[root])
        while parent[i] != root:
            parent[i], i = root, int(parent[i])
        return root

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        """The root of every element (fully compressed), vectorised."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent.copy()
            parent = grand
            self.parent = parent
