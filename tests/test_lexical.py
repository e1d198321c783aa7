"""The BM25 index of hybrid search (worker/read/lexical.py) against BM25 computed chunk by chunk, on real
transcripts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.bench.corpus import seenunseen_titles
from tests.conftest import EXAMPLES
from worker.read.lexical import LexicalIndex, lexical_index


def bm25_scores(texts: list[str], query: str) -> list[float]:
    """Okapi BM25 (k1=1.5, b=0.75, Lucene's idf) of every text for the query's distinct words, text by text."""
    words = [re.findall(r"\w+", t.lower()) for t in texts]
    average = sum(map(len, words)) / len(words)
    scores = []
    for text in words:
        score = 0.0
        for term in set(re.findall(r"\w+", query.lower())):
            tf, df = text.count(term), sum(term in w for w in words)
            if tf:
                idf = math.log(1 + (len(words) - df + 0.5) / (df + 0.5))
                score += idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * len(text) / average))
        scores.append(score)
    return scores


def _chunks(words_per_chunk: int = 60) -> list[str]:
    """The spoken lines of the two example episodes, cut into chunks of about `words_per_chunk` words."""
    lines = [line.partition("]: ")[2] for path in (EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt")
             for line in path.read_text().splitlines() if "]: " in line]
    spoken = " ".join(lines).split()
    return [" ".join(spoken[i:i + words_per_chunk]) for i in range(0, len(spoken), words_per_chunk)]


def _queries() -> list[str]:
    titles = [t["title"] for episode in ("E01", "E05")
              for t in json.loads((seenunseen_titles() / f"{episode}_titles.json").read_text())]
    # Words every chunk holds alone (no stopword is dropped), and a mix of rare and common ones.
    return titles + ["the of and", "the", "India and the farmer", "a the to Varma"]


@pytest.mark.parametrize("k", [1, 3, 10, 100])
def test_ranking_is_the_top_k_of_bm25_computed_chunk_by_chunk(k: int) -> None:
    texts = _chunks()
    index = LexicalIndex.build(texts, "v")
    every_third = np.arange(1, len(texts), 3)
    for query in _queries():
        full = np.array(bm25_scores(texts, query))
        for rows in (None, every_third):
            pool = np.arange(len(texts)) if rows is None else rows
            ranked = index.rank(query, rows, k)
            # Equal scores may be taken in either order: the scores, best first, are the top k's.
            best = sorted(full[pool][full[pool] > 0], reverse=True)[:k]
            assert full[ranked].tolist() == pytest.approx(best, rel=1e-5), query
            assert set(ranked) <= set(pool.tolist()) and len(set(ranked)) == len(ranked)


def test_a_saved_index_ranks_as_the_built_one_and_only_for_its_version(tmp_path: Path, caplog) -> None:
    texts = _chunks()
    path = tmp_path / "cache.bm25"
    built = lexical_index(path, texts, "v1")
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = LexicalIndex.load(path, "v1")
    assert loaded is not None and loaded.version == "v1"
    for query in _queries():
        assert loaded.rank(query, None, 10) == built.rank(query, None, 10)
    # Built from other rows: not used, and the next build replaces it.
    assert LexicalIndex.load(path, "v2") is None
    assert lexical_index(path, texts[:5], "v2").size == 5 and LexicalIndex.load(path, "v2").size == 5
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"not an index"):
        path.write_bytes(damaged)
        with caplog.at_level("WARNING"):
            assert LexicalIndex.load(path, "v2") is None
        assert "ignoring unreadable BM25 index" in caplog.text
        caplog.clear()


def test_inputs_without_words_rank_nothing(tmp_path: Path) -> None:
    one = LexicalIndex.build(["Ram Singh is a farmer in a small village in India."], "v")
    assert (one.rank("a farmer", None, 100), one.rank("spaceship", None, 100)) == ([0], [])
    # A query of no word (punctuation, spaces) or of words no chunk holds ranks nothing: the dense ranking stands.
    texts = _chunks()
    index = LexicalIndex.build(texts, "v")
    assert index.rank("?! -- ...", None, 10) == index.rank("", None, 10) == index.rank("zzyzx", None, 10) == []
    # Chunks without a word: no index to build, nothing ranked, saved and loaded all the same.
    path = tmp_path / "empty.bm25"
    empty = lexical_index(path, ["", "!!!", " "], "v")
    assert empty.rank("farmer", None, 10) == LexicalIndex.load(path, "v").rank("farmer", None, 10) == []
