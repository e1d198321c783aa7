"""Hostile transcripts: Unicode line breaks inside cues, runs without spaces, one huge line."""

from __future__ import annotations

import logging

import pytest

from config.settings import Settings
from producer.chunking import CHARS_PER_TOKEN, ChunkLimits, chunk_episode, text_budget
from producer.parsing import parse_bytes, parse_file
from producer.tokens import load_tokenizer
from tests.conftest import EXAMPLES

INSTRUCTION = Settings().instruction


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Settings())


@pytest.mark.parametrize("breaker", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1e"])
def test_unicode_line_breaks_inside_cues_are_text_not_new_lines(breaker: str) -> None:
    original = (EXAMPLES / "E01.vtt").read_text()
    # Inside every cue's text, and at the end of one cue line: a valid WebVTT file still.
    hostile = original.replace(" in a small village", f" in a{breaker}small village").replace(
        "One morning he", f"One{breaker}morning he").replace("loud noise", f"loud{breaker} noise")
    assert hostile != original
    expected = parse_file(EXAMPLES / "E01.vtt").segments
    got = parse_bytes(hostile.encode(), name="E01.vtt", episode_id="E01").segments
    assert [(s.start, s.end, s.speaker) for s in got] == [(s.start, s.end, s.speaker) for s in expected]
    assert [s.text.split() for s in got] == [s.text.split() for s in expected]


def test_error_line_numbers_count_only_real_line_breaks() -> None:
    text = "WEBVTT\r\n\r\n00:00:01.000 --> 00:00:02.000\rfirst\u2028cue\n\nno timing here\n"
    with pytest.raises(Exception, match=r"E\.vtt: line 6: cue has no 'start --> end' timing line"):
        parse_bytes(text.encode(), name="E.vtt", episode_id="E")


def test_a_run_without_spaces_is_cut_into_words_and_chunks_bounded_in_characters(tokenizer, caplog) -> None:
    run = "a" * 300_000
    episode = parse_bytes(run.encode(), name="run.txt", episode_id="run")
    limits = ChunkLimits(256, 32, INSTRUCTION)
    with caplog.at_level(logging.WARNING, logger="producer.chunking"):
        chunks = chunk_episode(episode, tokenizer, limits)

    assert "run.txt': a word of over 100 characters at 0.0 s is cut into words of 100" in caplog.text
    assert len(chunks) > 50
    # Nothing dropped: the chunks without their overlap hold every character of the run.
    unique = chunk_episode(episode, tokenizer, ChunkLimits(256, 0, INSTRUCTION))
    assert sum(len(c.text.replace(" ", "")) for c in unique) == len(run)
    budget = text_budget(tokenizer, limits)
    for chunk in chunks:
        assert len(chunk.text) <= CHARS_PER_TOKEN * 256
        assert chunk.n_tokens == tokenizer.count([chunk.text])[0] <= budget
        assert tokenizer.count_with_specials(INSTRUCTION + chunk.text) <= tokenizer.max_seq_length
        # Real word pieces, not one unknown token standing for a megabyte.
        assert "[UNK]" not in tokenizer.tokenizer.decode(tokenizer.tokenizer.encode(chunk.text).ids,
                                                         skip_special_tokens=False)


def test_one_huge_line_of_real_words_gives_bounded_chunks_with_every_word(tokenizer) -> None:
    words = " ".join(s.text for s in parse_file(EXAMPLES / "E01.vtt").segments)
    line = " ".join([words] * 60)
    episode = parse_bytes(line.encode(), name="line.txt", episode_id="line")
    assert len(episode.segments) == 1 and len(line) > 1_000_000
    limits = ChunkLimits(256, 0, INSTRUCTION)
    chunks = chunk_episode(episode, tokenizer, limits)

    assert " ".join(c.text for c in chunks).split() == line.split()
    budget = text_budget(tokenizer, limits)
    for chunk in chunks:
        assert len(chunk.text) <= CHARS_PER_TOKEN * 256
        assert chunk.n_tokens == tokenizer.count([chunk.text])[0] <= budget
        assert tokenizer.count_with_specials(INSTRUCTION + chunk.text) <= tokenizer.max_seq_length
