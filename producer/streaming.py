"""Chunk episodes as they are read, in bounded windows, on a small process pool where it pays.

Episodes go to the pool a few at a time (never the whole catalog), and their chunks come
back in reading order, grouped into windows of about `enqueue_window_chunks` chunks: the
unit the producer dedupes, stores and enqueues at once. Memory stays flat however large
the selection; the first window, about one batch, reaches the queue after the first episode or two.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

from config.settings import Settings
from producer.chunking import ChunkLimits, chunk_episode
from producer.models import Chunk, Episode, VectorSpec
from producer.tokens import load_tokenizer

logger = logging.getLogger(__name__)

# Episodes chunked in this process before a pool starts: an ingest of a few dozen files never pays the
# pool's start (a few seconds to spawn and load the tokenizer), a catalog hardly notices them.
INLINE_EPISODES = 64
# Episodes in flight per pool process: enough to keep it busy, few enough to keep memory flat.
IN_FLIGHT_PER_PROCESS = 4
# One transcript giving more chunks than this is unusual (some 18 hours of speech at the default
# chunk size): often a file that is not what it seems, such as a whole archive on one line.
UNUSUAL_CHUNKS = 1000


@dataclass
class ChunkedEpisode:
    episode: Episode
    chunks: list[Chunk]


def chunk_limits(settings: Settings, spec: VectorSpec) -> ChunkLimits:
    return ChunkLimits(settings.chunk_tokens, settings.chunk_overlap_tokens, spec.instruction)


def chunk_episodes(settings: Settings, episodes: Iterable[Episode], spec: VectorSpec) -> list[Chunk]:
    """Every chunk of `episodes`, in order (for callers that want them all at once)."""
    return [c for chunked in chunk_stream(settings, episodes, spec) for c in chunked.chunks]


def chunk_stream(settings: Settings, episodes: Iterable[Episode], spec: VectorSpec) -> Iterator[ChunkedEpisode]:
    """Each episode with its chunks, in reading order; an unusual number of chunks is warned of."""
    for chunked in _chunk_stream(settings, episodes, spec):
        if len(chunked.chunks) > UNUSUAL_CHUNKS:
            logger.warning("%r gave %d chunks, an unusual number for one episode (over %d): is it one transcript?",
                           chunked.episode.source or chunked.episode.key, len(chunked.chunks), UNUSUAL_CHUNKS)
        yield chunked


def _chunk_stream(settings: Settings, episodes: Iterable[Episode], spec: VectorSpec) -> Iterator[ChunkedEpisode]:
    limits = chunk_limits(settings, spec)
    tokenizer = load_tokenizer(settings)
    remaining = iter(episodes)
    for episode in islice(remaining, INLINE_EPISODES):
        yield ChunkedEpisode(episode, chunk_episode(episode, tokenizer, limits))
    processes = settings.producer_processes or os.cpu_count() or 1
    if processes == 1:
        for episode in remaining:
            yield ChunkedEpisode(episode, chunk_episode(episode, tokenizer, limits))
        return
    first = next(remaining, None)
    if first is None:
        return
    # spawn, not fork: the tokenizer's threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_start_process, initargs=(settings,)) as pool:
        pending: deque = deque()
        for episode in chain([first], remaining):
            pending.append((episode, pool.apply_async(_chunk_in_process, (episode, limits))))
            if len(pending) >= IN_FLIGHT_PER_PROCESS * processes:
                done, result = pending.popleft()
                yield ChunkedEpisode(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield ChunkedEpisode(done, result.get())


def chunk_windows(settings: Settings, episodes: Iterable[Episode], spec: VectorSpec) -> Iterator[list[ChunkedEpisode]]:
    """The producer's windows of `episodes`, chunked, sized by the settings."""
    return windows(chunk_stream(settings, episodes, spec), settings.enqueue_window_chunks, settings.batch_max_chunks)


def windows(stream: Iterable[ChunkedEpisode], max_chunks: int, first_chunks: int) -> Iterator[list[ChunkedEpisode]]:
    """Consecutive episodes grouped until a group holds enough chunks (an episode is never split).

    The first group needs `first_chunks` (about a batch: workers start at once), each next one
    twice the last, up to `max_chunks` (fewer, larger round trips once the queue is fed).
    """
    window: list[ChunkedEpisode] = []
    size, target = 0, min(first_chunks, max_chunks)
    for chunked in stream:
        window.append(chunked)
        size += len(chunked.chunks)
        if size >= target:
            yield window
            window, size, target = [], 0, min(2 * target, max_chunks)
    if window:
        yield window


_settings: Settings | None = None


def _start_process(settings: Settings) -> None:
    global _settings
    _settings = settings
    load_tokenizer(settings)


def _chunk_in_process(episode: Episode, limits: ChunkLimits) -> list[Chunk]:
    assert _settings is not None, "the pool's initializer sets the settings"
    return chunk_episode(episode, load_tokenizer(_settings), limits)
