"""BM25 over chunk texts (the bm25s library), and reciprocal rank fusion with the dense ranking.

The hybrid search mode: section-title queries find their passages by rare words (names,
places, laws) that a small dense model blurs, and BM25 finds those. Fusing ranks, not
scores, needs no calibration between the two (what Atlas's `$rankFusion` does too).

bm25s keeps every (chunk, word) weight in one sparse matrix, so a query sums a few of its
columns. The index is saved beside the search cache's file, tagged with the version of the
cache's rows it was built from: a new process loads it instead of building it again, and
any change to the rows builds it anew.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from config.services import replacing

if TYPE_CHECKING:
    import bm25s

logger = logging.getLogger(__name__)

WORD = re.compile(r"\w+")
# Okapi BM25's usual parameters. bm25s's "lucene" form scores idf x tf / (tf + k1 x (1 - b + b x length / mean
# length)), idf = log(1 + (N - df + 0.5) / (df + 0.5)): Robertson's weight over k1 + 1, the same ranking.
K1 = 1.5
B = 0.75
# A chunk looked up in a word's rows (a binary search) costs about as much as adding this many of its weights.
LOOKUP_COST = 32
# Ranks each list contributes to the fusion, and the constant of reciprocal rank fusion
# (Cormack et al. 2009; also Atlas's $rankFusion default).
FUSION_DEPTH = 100
RRF_K = 60
RRF_WEIGHTS = [1.0 / (RRF_K + rank + 1) for rank in range(FUSION_DEPTH)]


def _bm25(**params: object) -> bm25s.BM25:
    """A bm25s index, imported only when hybrid search builds or loads one (scipy's import costs about 0.5 s)."""
    import bm25s

    # bm25s sets its own logger to DEBUG when imported, so its notes ("Building index from tokens") passed the
    # level the CLI chose and reached stderr: it follows the root logger's level again.
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s.BM25(**params)


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: no stopwords dropped, no stemming."""
    return WORD.findall(text.lower())


class LexicalIndex:
    """BM25 weights of every chunk's words (k1=1.5, b=0.75), built from one `version` of the cache's rows.

    bm25s builds the weights (a chunks x words sparse matrix, by column); `rank` reads them with MaxScore's
    pruning (Turtle and Flood 1995). The words most chunks hold add next to nothing to a score, yet touch
    nearly every chunk: once the chunks scored so far put the k-th best above what the remaining words could
    add together, a chunk holding none of the words added so far can no longer reach the top k, and those
    words are added only to the chunks still in reach. The ranking is the one that adding every weight to
    every chunk gives.
    """

    def __init__(self, retriever: bm25s.BM25 | None, size: int, version: str) -> None:
        self.retriever = retriever  # None: no chunk holds a word
        self.size = size
        self.version = version
        if retriever is not None:
            self.weights, self.chunks, self.starts = (retriever.scores[name] for name in ("data", "indices", "indptr"))
            # Every word of the index is in some chunk: no empty column for reduceat to misread.
            self.highest = np.maximum.reduceat(self.weights, self.starts[:-1])

    @classmethod
    def build(cls, texts: Sequence[str], version: str) -> LexicalIndex:
        tokens = [words(t) for t in texts]
        if not any(tokens):
            return cls(None, len(texts), version)
        retriever = _bm25(k1=K1, b=B, method="lucene")
        # No "" word: a query without words is answered here, before bm25s.
        retriever.index(tokens, create_empty_token=False, show_progress=False)
        return cls(retriever, len(texts), version)

    def rank(self, query: str, rows: np.ndarray | None = None, k: int = FUSION_DEPTH) -> list[int]:
        """The best `k` chunks (among `rows`, if given) that share a word with the query, best first (equal
        scores: the lower row first)."""
        terms = np.array(self.retriever.get_tokens_ids(list(dict.fromkeys(words(query)))) if self.retriever
                         else [], dtype=np.int64)
        if not len(terms):
            return []
        allowed = None
        if rows is not None:
            allowed = np.zeros(self.size, dtype=bool)
            allowed[rows] = True
        terms = terms[np.argsort(-self.highest[terms], kind="stable")]  # the strongest word first
        # reach[n]: the most that terms[n:] add to any chunk's score together.
        reach = np.cumsum(self.highest[terms][::-1])[::-1]
        scores = np.zeros(self.size, dtype=np.float32)
        # The k-th best score so far: every chunk's final score is at least its score so far, so it bounds the
        # k-th best final score from below (as the k-th best of any k chunks does).
        floor = 0.0
        n = 0
        while n < len(terms) and reach[n] >= floor:  # a chunk holding none of terms[:n] may still reach the floor
            chunks = self._add(scores, terms[n])
            if allowed is not None:
                chunks = chunks[allowed[chunks]]
            if len(chunks) >= k:
                floor = max(floor, _kth(scores[chunks], k))
            n += 1
        # In the dtype of the index's rows: searchsorted would otherwise convert a whole word's rows per call.
        pool = np.flatnonzero(scores > 0 if allowed is None else (scores > 0) & allowed).astype(self.chunks.dtype)
        # The weaker words, each added only to the chunks that it and the ones after it could lift to the floor.
        for term, rest in zip(terms[n:], reach[n:], strict=True):
            partial = scores[pool]
            if len(pool) >= k:
                floor = max(floor, _kth(partial, k))
                pool = pool[partial + rest >= floor]
            self._add_to(scores, term, pool)
        return _best(pool, scores[pool], k)

    def _add(self, scores: np.ndarray, term: int) -> np.ndarray:
        """Add the term's weights to the scores of every chunk that holds it; those chunks."""
        chunks = self.chunks[self.starts[term]:self.starts[term + 1]]  # sorted, as bm25s builds them
        np.add.at(scores, chunks, self.weights[self.starts[term]:self.starts[term + 1]])  # 3x `scores[chunks] +=`
        return chunks

    def _add_to(self, scores: np.ndarray, term: int, pool: np.ndarray) -> None:
        """Add the term's weights to the scores of the chunks of `pool` (sorted) that hold it: looked up in its
        rows, or added to every chunk where that is cheaper (the others' scores are not read again)."""
        start, end = self.starts[term], self.starts[term + 1]
        if len(pool) * LOOKUP_COST > end - start:
            self._add(scores, term)
            return
        chunks = self.chunks[start:end]
        at = np.minimum(np.searchsorted(chunks, pool), len(chunks) - 1)
        held = chunks[at] == pool
        np.add.at(scores, pool[held], self.weights[start:end][at[held]])

    def save(self, path: Path) -> None:
        """Write the index to `path` (a private file, like the cache beside it: its words come from the texts)."""
        arrays: dict[str, np.ndarray] = {"version": np.array(self.version), "size": np.array(self.size)}
        if self.retriever is not None:
            vocab = sorted(self.retriever.vocab_dict, key=self.retriever.vocab_dict.__getitem__)
            # Words never hold a newline: one UTF-8 buffer, not a string array padded to the longest word.
            arrays |= {"vocab_utf8": np.frombuffer("\n".join(vocab).encode(), dtype=np.uint8),
                       **{name: self.retriever.scores[name] for name in ("data", "indices", "indptr")}}
        with replacing(path) as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: Path, version: str) -> LexicalIndex | None:
        """The index saved at `path` if it was built from `version` of the rows; None if not (or unreadable)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["version"]) != version:
                    return None
                size = int(data["size"])
                if "vocab_utf8" not in data.files:
                    return cls(None, size, version)
                vocab = data["vocab_utf8"].tobytes().decode().split("\n")
                scores = {name: data[name] for name in ("data", "indices", "indptr")}
            if len(scores["indptr"]) != len(vocab) + 1:
                raise ValueError("its vocabulary and its weights differ in length")
        except Exception as exc:  # whatever a damaged file raises: a cut zip, a bad array
            logger.warning("ignoring unreadable BM25 index %s (it is built again): %s: %s",
                           path, type(exc).__name__, exc)
            return None
        # What bm25s.BM25.load sets from its own files (bm25s 0.3.16); tests/test_search.py checks a loaded
        # index ranks as the built one.
        retriever = _bm25(k1=K1, b=B, method="lucene")
        retriever.scores = scores | {"num_docs": size}
        retriever.vocab_dict = {word: n for n, word in enumerate(vocab)}
        retriever.unique_token_ids_set = set(range(len(vocab)))
        retriever.nonoccurrence_array = None
        return cls(retriever, size, version)


def _kth(scores: np.ndarray, k: int) -> float:
    """The k-th highest of `scores` (k <= their number)."""
    return float(np.partition(scores, len(scores) - k)[len(scores) - k])


def _best(pool: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The `k` rows of `pool` with the highest `scores`, best first (equal scores: the lower row first)."""
    top = min(k, len(pool))
    if not top:
        return []
    best = np.flatnonzero(scores >= _kth(scores, top))
    return pool[best[np.lexsort((pool[best], -scores[best]))][:top]].tolist()


def lexical_index(path: Path, texts: Sequence[str], version: str) -> LexicalIndex:
    """The index of `texts` (`version` of the cache's rows): the one saved at `path`, or a new one saved there."""
    index = LexicalIndex.load(path, version)
    if index is None:
        index = LexicalIndex.build(texts, version)
        index.save(path)
    return index


def fuse(rankings: Sequence[Sequence[str]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of the top FUSION_DEPTH of each ranking: the best `k` with their fused scores
    (equal scores: the one ranked first in the first ranking first)."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for item, weight in zip(ranking, RRF_WEIGHTS, strict=False):  # stops at FUSION_DEPTH
            score[item] = score.get(item, 0.0) + weight
    return heapq.nlargest(k, score.items(), key=itemgetter(1))
