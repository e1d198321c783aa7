"""Cut an episode into chunks that end at segment boundaries and fit the model.

A chunk's text plus the instruction plus the special tokens never exceeds the
model's max sequence length, so the model never truncates anything silently. A
segment longer than that is split at token boundaries, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.errors import ConfigError
from producer.models import Chunk, Episode, Segment
from producer.tokens import ModelTokenizer


@dataclass(frozen=True)
class ChunkLimits:
    target_tokens: int
    overlap_tokens: int
    instruction: str


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
    pieces = _fit_segments(episode.segments, tokenizer, budget)
    chunks: list[Chunk] = []
    start = 0
    while start < len(pieces):
        end = start
        total = 0
        while end < len(pieces) and (end == start or total + pieces[end][1] <= budget):
            total += pieces[end][1]
            end += 1
        # Joining can merge or split tokens at the seams: check the real count, shrink if needed.
        while end - start > 1 and not _fits(pieces[start:end], tokenizer, limits.instruction):
            end -= 1
        chunks.append(_make_chunk(episode, len(chunks), pieces[start:end], tokenizer))
        if end == len(pieces):
            break
        start = _overlap_start(pieces, start, end, limits.overlap_tokens)
    return chunks


def _fit_segments(segments: list[Segment], tokenizer: ModelTokenizer, budget: int) -> list[tuple[Segment, int]]:
    """Each segment with its token count; segments over the budget split into pieces."""
    counts = tokenizer.count([s.text for s in segments])
    pieces: list[tuple[Segment, int]] = []
    for segment, count in zip(segments, counts, strict=True):
        if count <= budget:
            pieces.append((segment, count))
        else:
            pieces.extend(_split_segment(segment, tokenizer, budget))
    return pieces


def _split_segment(segment: Segment, tokenizer: ModelTokenizer, budget: int) -> list[tuple[Segment, int]]:
    offsets = tokenizer.offsets(segment.text)
    # Leave a margin for tokens that re-merge differently once the text is cut.
    step = max(1, budget - 8)
    bounds = [0]
    for i in range(step, len(offsets), step):
        cut = offsets[i][0]
        # Cut at the space before the word the token belongs to, unless the word is enormous.
        space = segment.text.rfind(" ", bounds[-1] + 1, cut + 1)
        bounds.append(space if space > bounds[-1] else cut)
    bounds.append(len(segment.text))
    duration = segment.end - segment.start
    pieces: list[tuple[Segment, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        text = segment.text[a:b].strip()
        if not text:
            continue
        piece = Segment(
            start=segment.start + duration * a / len(segment.text),
            end=segment.start + duration * b / len(segment.text),
            speaker=segment.speaker,
            text=text,
        )
        pieces.append((piece, tokenizer.count([text])[0]))
    return pieces


def _fits(pieces: list[tuple[Segment, int]], tokenizer: ModelTokenizer, instruction: str) -> bool:
    return tokenizer.count_with_specials(instruction + _join(pieces)) <= tokenizer.max_seq_length


def _overlap_start(pieces: list[tuple[Segment, int]], start: int, end: int, overlap_tokens: int) -> int:
    """First piece of the next chunk: repeat whole trailing pieces up to `overlap_tokens`."""
    next_start = end
    total = 0
    while next_start - 1 > start and total + pieces[next_start - 1][1] <= overlap_tokens:
        next_start -= 1
        total += pieces[next_start][1]
    return next_start


def _join(pieces: list[tuple[Segment, int]]) -> str:
    return " ".join(segment.text for segment, _ in pieces)


def _make_chunk(episode: Episode, seq: int, pieces: list[tuple[Segment, int]], tokenizer: ModelTokenizer) -> Chunk:
    speakers: list[str] = []
    for segment, _ in pieces:
        if segment.speaker and segment.speaker not in speakers:
            speakers.append(segment.speaker)
    text = _join(pieces)
    return Chunk(
        chunk_id=f"{episode.key}:{seq}",
        episode_id=episode.episode_id,
        podcast=episode.podcast,
        seq=seq,
        start=pieces[0][0].start,
        end=pieces[-1][0].end,
        speakers=speakers,
        text=text,
        n_tokens=tokenizer.count([text])[0],
    )
