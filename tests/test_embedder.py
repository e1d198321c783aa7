"""The embedding engine: INSTRUCTOR pooling parity, the vector key, out-of-memory splitting, dedupe."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pymongo.database import Database
from redis import Redis
from transformers import AutoModel, AutoTokenizer

from config.errors import EmbeddingError
from config.settings import Settings
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.parsing import parse_file
from tests.conftest import DATA, EXAMPLES
from worker.embedder import get_embedder
from worker.loop import run_worker
from worker.store import from_bson_vector

INSTRUCTION = "Represent the podcast transcript for retrieval:"


def _texts(n: int) -> list[str]:
    return [s.text for s in parse_file(DATA / "E03.srt").segments[:n]]


def _reference_vectors(source: str, texts: list[str], instruction: str) -> np.ndarray:
    """Mean over the text tokens only, computed with transformers directly (the INSTRUCTOR definition)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    # The prompt's tokens as the model sees them at the start of every input, without its trailing [SEP].
    prompt_length = len(tokenizer(instruction)["input_ids"]) - 1
    vectors = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(instruction + text, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state[0]
            mean = hidden[prompt_length:].mean(dim=0)
            vectors.append((mean / mean.norm()).numpy())
    return np.stack(vectors)


def test_instruction_excluded_from_pooling_matches_the_definition() -> None:
    source = Settings().model_source()
    texts = _texts(6)
    lengths = [len(t.split()) + 12 for t in texts]
    excluded = get_embedder(source, revision=None, pool_instruction=False)
    included = get_embedder(source, revision=None, pool_instruction=True)
    ours, _ = excluded.encode(texts, lengths, instruction=INSTRUCTION, normalize=True)
    pooled_with_prompt, _ = included.encode(texts, lengths, instruction=INSTRUCTION, normalize=True)
    reference = _reference_vectors(source, texts, INSTRUCTION)

    cosines = np.sum(ours * reference, axis=1)
    assert cosines.min() >= 0.9999
    assert np.sum(pooled_with_prompt * reference, axis=1).max() < 0.999
    assert excluded is not included


def test_instructor_models_are_detected_however_they_are_loaded() -> None:
    assert Settings(model="hkunlp/instructor-xl").pools_instruction() is False
    assert Settings(model="custom", model_path="/vol/hf/models--hkunlp--instructor-xl/snapshots/abc").is_instructor()
    assert Settings(model="my-model", model_path="/models/instructor-xl").pools_instruction() is False
    assert Settings().pools_instruction() is True
    env = {"PODEMBED_MODEL": "hkunlp/instructor-large", "PODEMBED_POOL_INSTRUCTION": "true"}
    assert Settings.from_env(env).pools_instruction() is True


def test_vector_key_covers_everything_that_changes_a_vector() -> None:
    base = Settings()
    keys = {
        vector_spec(base).key,
        vector_spec(base, instruction="Represent the episode:").key,
        vector_spec(base.replace(pool_instruction=False)).key,
        vector_spec(base.replace(normalize=False)).key,
        vector_spec(base.replace(model_revision="abc123")).key,
        vector_spec(base.replace(model="hkunlp/instructor-xl")).key,
    }
    assert len(keys) == 6
    assert vector_spec(base).key == vector_spec(Settings()).key


def test_out_of_memory_splits_the_micro_batch_and_loses_nothing(
    settings: Settings, redis: Redis, db: Database
) -> None:
    # A cap on padded tokens per forward pass, enforced exactly where CUDA OOM is caught.
    settings = settings.replace(micro_batch_size=32, max_forward_tokens=4 * 300)
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    run_worker(settings, burst=True, redis=redis)

    embedder = get_embedder(settings.model_source(), revision=None, pool_instruction=True,
                            micro_batch_size=32, max_forward_tokens=4 * 300)
    status = JobRecords(redis, db, settings.result_ttl).status(job.job_id)
    ids = [d["chunk_id"] for d in db.embeddings.find({}, {"chunk_id": 1})]
    # E05 has 11 chunks of up to 256 tokens: 11 x 256 and 5 x 256 are over the cap, 2 x 256 fits.
    assert job.chunks == 11
    assert embedder.micro_batch_size == 2
    assert status.state == "finished" and status.chunks.embedded == job.chunks
    assert sorted(ids) == sorted({f"_/E05:{i}" for i in range(job.chunks)})
    ledger = db.batches.find_one({"job_id": job.job_id})
    assert ledger["padded_tokens"] <= 2 * 256 * -(-job.chunks // 2)


def test_a_text_that_never_fits_is_an_embedding_error() -> None:
    embedder = get_embedder(Settings().model_source(), revision=None, pool_instruction=True,
                            micro_batch_size=8, max_forward_tokens=10)
    with pytest.raises(EmbeddingError, match="does not fit"):
        embedder.encode(_texts(2), [40, 40], instruction=INSTRUCTION, normalize=True)


def test_equal_text_is_embedded_once_across_episodes(
    settings: Settings, redis: Redis, db: Database, tmp_path
) -> None:
    # The same episode published twice under two ids, as re-uploads and mirrored feeds are.
    shutil.copy(EXAMPLES / "E05.vtt", tmp_path / "E05-mirror.vtt")
    first, _ = parse_files([EXAMPLES / "E05.vtt"])
    job1 = ingest(settings, redis, db, first, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    second, _ = parse_files([tmp_path / "E05-mirror.vtt"])
    job2 = ingest(settings, redis, db, second, kind="ingest")
    run_worker(settings, burst=True, redis=redis)

    status = JobRecords(redis, db, settings.result_ttl).status(job2.job_id)
    assert status.chunks.skipped == status.chunks.total == job1.chunks
    assert status.chunks.embedded == 0
    original = db.embeddings.find_one({"episode_id": "E05", "seq": 3})
    mirror = db.embeddings.find_one({"episode_id": "E05-mirror", "seq": 3})
    assert mirror["job_id"] == job2.job_id and mirror["text"] == original["text"]
    assert np.array_equal(from_bson_vector(mirror["embedding"]), from_bson_vector(original["embedding"]))
    assert db.embeddings.count_documents({}) == 2 * job1.chunks
