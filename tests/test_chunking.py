"""Chunks: deterministic ids, segment boundaries, times, speakers and the model's token limit."""

from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.settings import Settings
from producer.chunking import ChunkLimits, chunk_episode, text_budget
from producer.models import Episode, Segment
from producer.packing import pack_batches
from producer.parsing import parse_file
from producer.tokens import load_tokenizer
from tests.conftest import DATA, EXAMPLES

INSTRUCTION = Settings().instruction


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(Settings())


def test_chunks_fit_the_model_and_end_at_segment_boundaries(tokenizer) -> None:
    episode = parse_file(EXAMPLES / "E01.vtt")
    limits = ChunkLimits(target_tokens=256, overlap_tokens=0, instruction=INSTRUCTION)
    chunks = chunk_episode(episode, tokenizer, limits)
    segment_texts = [s.text for s in episode.segments]

    assert tokenizer.max_seq_length == 256
    assert [c.chunk_id for c in chunks] == [f"_/E01:{i}" for i in range(len(chunks))]
    assert " ".join(c.text for c in chunks) == " ".join(segment_texts)
    starts = {s.start for s in episode.segments}
    ends = {s.end for s in episode.segments}
    budget = text_budget(tokenizer, limits)
    for chunk in chunks:
        assert chunk.start in starts and chunk.end in ends
        assert tokenizer.count_with_specials(INSTRUCTION + chunk.text) <= tokenizer.max_seq_length
        assert chunk.n_tokens == tokenizer.count([chunk.text])[0] <= budget
    # Chunks are filled: all but the last would overflow with the next segment added.
    assert min(c.n_tokens for c in chunks[:-1]) > budget * 0.6
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_chunk_ids_are_deterministic(tokenizer) -> None:
    limits = ChunkLimits(target_tokens=200, overlap_tokens=40, instruction=INSTRUCTION)
    first = chunk_episode(parse_file(DATA / "E03.srt"), tokenizer, limits)
    again = chunk_episode(parse_file(DATA / "E03.srt"), tokenizer, limits)
    assert first == again


def test_overlap_repeats_whole_trailing_segments(tokenizer) -> None:
    episode = parse_file(EXAMPLES / "E06.json")
    chunks = chunk_episode(episode, tokenizer, ChunkLimits(200, 100, INSTRUCTION))
    no_overlap = chunk_episode(episode, tokenizer, ChunkLimits(200, 0, INSTRUCTION))
    assert len(chunks) > len(no_overlap)
    overlapping = [(a, b) for a, b in zip(chunks, chunks[1:], strict=False) if b.start < a.end]
    assert overlapping
    for a, b in overlapping:
        assert a.text.endswith(b.text[: len(b.text) // 4]) or b.text.split(" ")[0] in a.text


def test_speakers_are_kept_per_chunk(tokenizer) -> None:
    chunks = chunk_episode(parse_file(EXAMPLES / "E01.vtt"), tokenizer, ChunkLimits(256, 0, INSTRUCTION))
    assert chunks[0].speakers[:2] == ["Guest 2", "Amit Varma"]
    assert all(c.speakers for c in chunks)


def test_a_segment_longer_than_the_model_is_split_not_dropped(tokenizer) -> None:
    real = parse_file(DATA / "E03.srt").segments
    monologue = Segment(start=0.0, end=600.0, speaker="Amit Varma", text=" ".join(s.text for s in real))
    episode = Episode(episode_id="long", podcast=None, published_at=None, segments=[monologue])
    chunks = chunk_episode(episode, tokenizer, ChunkLimits(256, 0, INSTRUCTION))

    assert tokenizer.count([monologue.text])[0] > 5 * 256
    assert len(chunks) >= 6
    assert " ".join(c.text for c in chunks).split() == monologue.text.split()
    for chunk in chunks:
        assert tokenizer.count_with_specials(INSTRUCTION + chunk.text) <= tokenizer.max_seq_length
        assert 0.0 <= chunk.start < chunk.end <= 600.0
    assert chunks[0].start == 0.0 and chunks[-1].end == 600.0


def test_instruction_too_long_for_the_model_is_a_config_error(tokenizer) -> None:
    with pytest.raises(ConfigError, match="leaving no room"):
        text_budget(tokenizer, ChunkLimits(256, 0, "represent " * 300))


def test_batches_respect_token_budget_and_chunk_cap(tokenizer) -> None:
    from producer.enqueue import vector_spec

    chunks = chunk_episode(parse_file(EXAMPLES / "E01.vtt"), tokenizer, ChunkLimits(128, 0, INSTRUCTION))
    batches = pack_batches("job1", chunks, vector_spec(Settings()), max_tokens=1000, max_chunks=6)
    assert sorted(c.chunk_id for b in batches for c in b.chunks) == sorted(c.chunk_id for c in chunks)
    assert all(len(b.chunks) <= 6 and b.n_tokens <= 1000 for b in batches)
    assert [b.batch_id for b in batches] == [f"job1-{i:05d}" for i in range(len(batches))]
    lengths = [c.n_tokens for b in batches for c in b.chunks]
    assert lengths == sorted(lengths, reverse=True)
