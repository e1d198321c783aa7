"""Pack chunks into batches (one RQ job each) by a token budget and a chunk cap."""

from __future__ import annotations

from producer.models import Batch, Chunk, VectorSpec


def pack_batches(
    job_id: str, chunks: list[Chunk], spec: VectorSpec, *, max_tokens: int, max_chunks: int, force: bool = False,
    first_index: int = 0,
) -> list[Batch]:
    """Batches of chunks of similar length, so micro-batches waste little on padding; their ids count
    on from `first_index` (a job packs each window of a stream in turn)."""
    ordered = sorted(chunks, key=lambda c: (-c.n_tokens, c.chunk_id))
    batches: list[Batch] = []
    current: list[Chunk] = []
    tokens = 0
    for chunk in ordered:
        if current and (len(current) >= max_chunks or tokens + chunk.n_tokens > max_tokens):
            batches.append(_batch(job_id, first_index + len(batches), spec, current, force))
            current, tokens = [], 0
        current.append(chunk)
        tokens += chunk.n_tokens
    if current:
        batches.append(_batch(job_id, first_index + len(batches), spec, current, force))
    return batches


def _batch(job_id: str, index: int, spec: VectorSpec, chunks: list[Chunk], force: bool) -> Batch:
    return Batch(job_id=job_id, batch_id=f"{job_id}-{index:05d}", spec=spec, chunks=chunks, force=force)
