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

import logging
import re
from collections import Counter
from collections.abc import Sequence
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
# Ranks each list contributes to the fusion, and the constant of reciprocal rank fusion
# (Cormack et al. 2009; also Atlas's $rankFusion default).
FUSION_DEPTH = 100
RRF_K = 60
# A word held by more than this share of the chunks is a common one (see LexicalIndex).
COMMON_SHARE = 0.05


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
    pruning (Turtle and Flood 1995): the words most chunks hold add next to nothing to a score, yet touch
    nearly every chunk, so they are added only to the chunks that the rarer words leave in reach of the top k.
    The ranking is the one that adding every weight to every chunk gives.
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
        # Weakest first: the words whose best weight is lowest are the ones pruning can leave out.
        terms = terms[np.argsort(self.highest[terms], kind="stable")]
        common = np.diff(self.starts)[terms] > COMMON_SHARE * self.size
        scores = np.zeros(self.size, dtype=np.float32)
        for term in terms[~common]:
            self._add(scores, term)
        pool = self._held(scores, rows)
        weak = terms[common]
        if len(weak) and len(pool) >= k:
            # Every chunk's final score is at least its score so far, so the k-th best so far bounds the k-th
            # best from below; the weak words together add less than that to any chunk.
            floor = _kth(scores[pool], k)
            strong = weak[np.cumsum(self.highest[weak]) >= floor]
            for term in strong:
                self._add(scores, term)
            weak = weak[:len(weak) - len(strong)]
            if len(strong):
                pool = self._held(scores, rows)
            partial = scores[pool]
            floor, reach = _kth(partial, k), float(self.highest[weak].sum())
            if floor > reach:
                pool = pool[partial + reach >= floor]
                for term in weak:
                    self._add(scores, term, pool)
                return _best(pool, scores[pool], k)
        for term in weak:
            self._add(scores, term)
        pool = self._held(scores, rows)
        return _best(pool, scores[pool], k)

    @staticmethod
    def _held(scores: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """The chunks (among `rows`, if given) scored above 0, in row order."""
        return np.flatnonzero(scores) if rows is None else rows[scores[rows] > 0]

    def _add(self, scores: np.ndarray, term: int, only: np.ndarray | None = None) -> None:
        """Add the term's weights to `scores`: of every chunk that holds it, or of the chunks `only` only."""
        chunks = self.chunks[self.starts[term]:self.starts[term + 1]]  # sorted, as bm25s builds them
        weights = self.weights[self.starts[term]:self.starts[term + 1]]
        if only is None:
            scores[chunks] += weights
            return
        at = np.minimum(np.searchsorted(chunks, only), len(chunks) - 1)
        held = chunks[at] == only
        scores[only[held]] += weights[at[held]]

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
    """Reciprocal rank fusion of the top FUSION_DEPTH of each ranking: the best `k` with their fused scores."""
    score: Counter = Counter()
    for ranking in rankings:
        for rank, item in enumerate(ranking[:FUSION_DEPTH]):
            score[item] += 1.0 / (RRF_K + rank + 1)
    return score.most_common(k)
