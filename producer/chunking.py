"""Cut an episode into chunks that end at segment boundaries and fit the model.

A chunk's text plus the instruction plus the special tokens never exceeds the
model's max sequence length, so the model never truncates anything silently. A
segment longer than that is split at token boundaries, never dropped. A chunk's
text is also bounded in characters (`CHARS_PER_TOKEN` x the target tokens), so a
run of characters the tokenizer reads as one token cannot make a huge document.

Every text is tokenized once, in batch calls over windows of bounded size, so the
memory of chunking is a small multiple of the largest window, not of the episode.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

from config.errors import ConfigError
from producer.models import Chunk, Episode, Segment
from producer.tokens import ModelTokenizer

logger = logging.getLogger(__name__)

# A chunk's text has at most this many characters per target token (English runs near 4).
CHARS_PER_TOKEN = 16
# WordPiece reads any longer word as one [UNK]: longer runs are cut into words of this size.
MAX_WORD_CHARS = 100
# Characters per batch call to the tokenizer: its encodings take ~100x the text in memory.
ENCODE_CHARS = 64 * 1024

Piece = tuple[Segment, int]


@dataclass(frozen=True)
class ChunkLimits:
    target_tokens: int
    overlap_tokens: int
    instruction: str

    @property
    def max_chars(self) -> int:
        return CHARS_PER_TOKEN * self.target_tokens


def text_budget(tokenizer: ModelTokenizer, limits: ChunkLimits) -> int:
    """Tokens a chunk's text may have once the instruction and special tokens are counted."""
    instruction_tokens = tokenizer.count([limits.instruction])[0] if limits.instruction else 0
    room = tokenizer.max_seq_length - tokenizer.n_special - instruction_tokens
    if room <= 0:
        raise ConfigError(
            f"the instruction takes {instruction_tokens} tokens, leaving no room in the model's "
            f"{tokenizer.max_seq_length}-token window"
        )
    return min(limits.target_tokens, room)


def chunk_episode(episode: Episode, tokenizer: ModelTokenizer, limits: ChunkLimits) -> list[Chunk]:
    """Chunks of `episode` with deterministic ids `{episode key}:{seq}` (the key includes the podcast)."""
    budget = text_budget(tokenizer, limits)
    pieces = _fit_segments(episode, tokenizer, budget, limits.max_chars)
    chunks: list[Chunk] = []
    start = 0
    while start < len(pieces):
        end = start
        total = 0
        chars = -1
        while end < len(pieces) and (end == start or (
                total + pieces[end][1] <= budget and chars + 1 + len(pieces[end][0].text) <= limits.max_chars)):
            total += pieces[end][1]
            chars += 1 + len(pieces[end][0].text)
            end += 1
        # Joining can merge or split tokens at the seams: check the real count, shrink if needed.
        while True:
            text = _join(pieces[start:end])
            n_tokens, fits = _measure(pieces[start:end], text, tokenizer, limits.instruction)
            if fits or end - start == 1:
                break
            end -= 1
        chunks.append(_make_chunk(episode, len(chunks), pieces[start:end], text, n_tokens))
        if end == len(pieces):
            break
        start = _overlap_start(pieces, start, end, limits.overlap_tokens)
    return chunks


def _fit_segments(episode: Episode, tokenizer: ModelTokenizer, budget: int, max_chars: int) -> list[Piece]:
    """Each segment with its token count, tokenized once; segments over the budget split into pieces."""
    pieces: list[Piece] = []
    for window in _encode_windows(_char_windows(episode, max_chars)):
        encodings = tokenizer.encode([s.text for s in window])
        for segment, encoding in zip(window, encodings, strict=True):
            if len(encoding.ids) <= budget:
                pieces.append((segment, len(encoding.ids)))
            else:
                pieces.extend(_split_segment(segment, encoding.offsets, tokenizer, budget))
    return pieces


def _encode_windows(segments: Iterator[Segment]) -> Iterator[list[Segment]]:
    """Segments in groups of about `ENCODE_CHARS` characters, for one tokenizer call each."""
    window: list[Segment] = []
    chars = 0
    for segment in segments:
        window.append(segment)
        chars += len(segment.text)
        if chars >= ENCODE_CHARS:
            yield window
            window, chars = [], 0
    if window:
        yield window


def _char_windows(episode: Episode, max_chars: int) -> Iterator[Segment]:
    """The episode's segments, overlong words cut and long segments cut at spaces into `max_chars` pieces."""
    word_chars = min(MAX_WORD_CHARS, max_chars)
    # Tried only where a word starts: from inside one, each start would rescan the rest of it.
    long_word = re.compile(rf"(?<!\S)\S{{{word_chars + 1},}}")
    for segment in episode.segments:
        text = segment.text
        if len(text) > word_chars and long_word.search(text):
            logger.warning("%r: a word of over %d characters at %.1f s is cut into words of %d",
                           episode.source or episode.episode_id, word_chars, segment.start, word_chars)
            text = long_word.sub(lambda m: " ".join(m[0][i : i + word_chars]
                                                    for i in range(0, len(m[0]), word_chars)), text)
        if len(text) <= max_chars and text is segment.text:
            yield segment
            continue
        bounds = [0]
        while len(text) - bounds[-1] > max_chars:
            space = text.rfind(" ", bounds[-1] + 1, bounds[-1] + max_chars + 1)
            bounds.append(space if space > bounds[-1] else bounds[-1] + max_chars)
        bounds.append(len(text))
        yield from (piece for piece, _ in _cut(segment, text, bounds))


def _split_segment(
    segment: Segment, offsets: list[tuple[int, int]], tokenizer: ModelTokenizer, budget: int
) -> list[Piece]:
    # Leave a margin for tokens that re-merge differently once the text is cut.
    step = max(1, budget - 8)
    starts = [start for start, _ in offsets]
    bounds = [0]
    first = 0  # the first token after the last cut: each piece holds at most `step` tokens
    while len(starts) - first > step:
        cut = starts[first + step]
        # Cut at the space before the word the token belongs to, unless the word is enormous.
        space = segment.text.rfind(" ", bounds[-1] + 1, cut + 1)
        bounds.append(space if space > bounds[-1] else cut)
        first = bisect_left(starts, bounds[-1])
    bounds.append(len(segment.text))
    pieces = _cut(segment, segment.text, bounds)
    counts = tokenizer.count([piece.text for piece, _ in pieces])
    return [(piece, count) for (piece, _), count in zip(pieces, counts, strict=True)]


def _cut(segment: Segment, text: str, bounds: list[int]) -> list[Piece]:
    """`text` (the segment's, maybe respaced) cut at `bounds`, times shared out by characters."""
    duration = segment.end - segment.start
    pieces: list[Piece] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece = text[a:b].strip()
        if piece:
            pieces.append((Segment(start=segment.start + duration * a / len(text),
                                   end=segment.start + duration * b / len(text),
                                   speaker=segment.speaker, text=piece), 0))
    return pieces


def _measure(pieces: list[Piece], text: str, tokenizer: ModelTokenizer, instruction: str) -> tuple[int, bool]:
    """(tokens of `text`, whether instruction + text + special tokens fit the model), exactly."""
    if tokenizer.additive:
        # Counts add up across spaces: only the seam between instruction and text needs encoding.
        n_tokens = sum(count for _, count in pieces)
        head = text.split(" ", 1)[0]
        seam = 0
        if instruction:
            with_head, alone = tokenizer.count([instruction + head, head])
            seam = with_head - alone
        total = tokenizer.n_special + seam + n_tokens
    else:
        n_tokens = tokenizer.count([text])[0]
        total = tokenizer.count_with_specials(instruction + text)
    return n_tokens, total <= tokenizer.max_seq_length


def _overlap_start(pieces: list[Piece], start: int, end: int, overlap_tokens: int) -> int:
    """First piece of the next chunk: repeat whole trailing pieces up to `overlap_tokens`."""
    next_start = end
    total = 0
    while next_start - 1 > start and total + pieces[next_start - 1][1] <= overlap_tokens:
        next_start -= 1
        total += pieces[next_start][1]
    return next_start


def _join(pieces: list[Piece]) -> str:
    return " ".join(segment.text for segment, _ in pieces)


def _make_chunk(episode: Episode, seq: int, pieces: list[Piece], text: str, n_tokens: int) -> Chunk:
    speakers: list[str] = []
    for segment, _ in pieces:
        if segment.speaker and segment.speaker not in speakers:
            speakers.append(segment.speaker)
    return Chunk(
        chunk_id=f"{episode.key}:{seq}",
        episode_id=episode.episode_id,
        podcast=episode.podcast,
        seq=seq,
        start=pieces[0][0].start,
        end=pieces[-1][0].end,
        speakers=speakers,
        text=text,
        n_tokens=n_tokens,
    )
