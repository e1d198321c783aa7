"""Okapi BM25 over chunk texts, and reciprocal rank fusion with the dense ranking.

The hybrid search mode: section-title queries find their passages by rare words (names,
places, laws) that a small dense model blurs, and BM25 finds those. Fusing ranks, not
scores, needs no calibration between the two (what Atlas's `$rankFusion` does too).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

WORD = re.compile(r"\w+")
# Ranks each list contributes to the fusion, and the constant of reciprocal rank fusion
# (Cormack et al. 2009; also Atlas's $rankFusion default).
FUSION_DEPTH = 100
RRF_K = 60


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25:
    """An inverted index of BM25 weights (k1=1.5, b=0.75): per term, its documents and weights."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        counts = [Counter(words(t)) for t in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0)) if len(texts) else lengths
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for doc, count in enumerate(counts):
            for term, tf in count.items():
                docs, weights = postings.setdefault(term, ([], []))
                docs.append(doc)
                weights.append(tf * (k1 + 1) / (tf + norm[doc]))
        self.size = len(texts)
        self.postings = {
            term: (np.array(docs, dtype=np.int64),
                   np.array(weights) * math.log(1 + (self.size - len(docs) + 0.5) / (len(docs) + 0.5)))
            for term, (docs, weights) in postings.items()
        }

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.size)
        for term in set(words(query)):
            if term in self.postings:
                docs, weights = self.postings[term]
                out[docs] += weights
        return out

    def rank(self, query: str, rows: np.ndarray | None = None, k: int = FUSION_DEPTH) -> list[int]:
        """The best `k` documents (among `rows`, if given) that share a word with the query, best first."""
        scores = self.scores(query)
        candidates = np.flatnonzero(scores > 0) if rows is None else rows[scores[rows] > 0]
        if len(candidates) > k:
            # Common words touch nearly every document: sort only the best k.
            candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
        return candidates[np.lexsort((candidates, -scores[candidates]))].tolist()


def fuse(rankings: Sequence[Sequence[str]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of the top FUSION_DEPTH of each ranking: the best `k` with their fused scores."""
    score: Counter = Counter()
    for ranking in rankings:
        for rank, item in enumerate(ranking[:FUSION_DEPTH]):
            score[item] += 1.0 / (RRF_K + rank + 1)
    return score.most_common(k)
