"""The command line as a person meets it: counts of cancelled work, services that are down, closed
pipes, `status --watch` in files, and the smaller options (`--version`, `-v`, `--episodes`, `retry`)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis

from config.services import free_port
from config.settings import Settings
from producer import streaming
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.operations import cancel
from producer.streaming import chunk_episodes
from tests.conftest import DATA, EXAMPLES, ROOT
from tests.test_sources import SHOW, transcript_docs
from worker.loop import drain, make_worker, run_worker


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
            "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db,
            "PODEMBED_DATA_DIR": str(settings.data_dir), **extra}


def _run(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=_env(settings, **extra),
                          capture_output=True, text=True, timeout=120)


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path, **changes: object) -> str:
    episodes, _ = parse_files([path], podcast=SHOW)
    return ingest(settings.replace(**changes), redis, db, episodes, kind="ingest").job_id


def test_cancelled_work_is_counted_cancelled(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _ingest(settings, redis, db, EXAMPLES / "E05.vtt", batch_max_chunks=3)
    worker, _ = make_worker(settings, redis)
    worker.work(burst=True, max_jobs=1)
    cancel(settings, redis, db, job_id)

    status = JobRecords(redis, db, settings.result_ttl).status(job_id)
    c, b = status.chunks, status.batches
    assert (b.total, b.finished, b.cancelled, b.queued, b.running) == (4, 1, 3, 0, 0)
    assert (c.total, c.embedded, c.cancelled, c.pending) == (11, 3, 8, 0)
    assert c.embedded + c.skipped + c.failed + c.cancelled == c.total
    assert db.jobs.find_one({"_id": job_id})["chunks"]["cancelled"] == 8

    human = _run(settings, "status", job_id).stdout
    assert "8 cancelled, 0 pending" in human and "3 cancelled" in human
    row = _run(settings, "jobs").stdout.splitlines()[1].split()
    assert row[:3] == [job_id, "ingest", "cancelled"] and row[4:7] == ["3/11", "0", "8"]


def test_jobs_table_shows_failed_chunks_apart_from_done(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _ingest(settings, redis, db, DATA / "E03.txt")
    run_worker(settings.replace(max_forward_tokens=1), burst=True, redis=redis)  # refused for good
    row = _run(settings, "jobs").stdout.splitlines()[1].split()
    assert row[:3] == [job_id, "ingest", "failed"] and row[4:7] == ["0/4", "4", "0"]


def test_status_of_an_ended_job_with_redis_down(settings: Settings, redis: Redis, db: Database) -> None:
    done = _ingest(settings, redis, db, DATA / "E03.txt")
    run_worker(settings, burst=True, redis=redis)
    queued = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    JobRecords(redis, db, settings.result_ttl).save(JobRecords(redis, db, settings.result_ttl).status(queued))
    down = {"PODEMBED_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}

    shown = _run(settings, "status", done, "--json", **down)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "finished" and json.loads(shown.stdout)["chunks"]["embedded"] == 4
    assert "live counters unavailable" in shown.stderr and len(shown.stderr.splitlines()) == 1

    running = _run(settings, "status", queued, **down)
    assert running.returncode == 1 and running.stdout == ""
    assert f"job {queued} was queued when last saved, and its live counters are in Redis" in running.stderr


def test_services_down_are_one_line(settings: Settings, redis: Redis, db: Database) -> None:
    mongo_port, redis_port = free_port(), free_port()
    for command in (["jobs"], ["work", "--burst"], ["ingest", str(DATA / "E03.txt")]):
        out = _run(settings, *command, PODEMBED_MONGO_URI=f"mongodb://127.0.0.1:{mongo_port}",
                   PODEMBED_FIRST_CONTACT_SECONDS="1")
        assert out.returncode == 1
        assert out.stderr.splitlines()[-1] == (f"podembed: MongoDB at mongodb://127.0.0.1:{mongo_port} is not "
                                               "reachable (is it running? podembed services up)"), command
        assert "Traceback" not in out.stderr and "Topology" not in out.stderr
        out = _run(settings, *command, PODEMBED_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
        assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
            f"podembed: Redis at redis://127.0.0.1:{redis_port}/0 is not reachable "
            "(is it running? podembed services up)"), command
    # Elsewhere than this machine the hint would mislead: the reason instead, without the password.
    from producer.connections import unreachable

    assert unreachable("MongoDB", "mongodb+srv://u:secret@db.example.net/", "no answer within 5 s") == (
        "MongoDB at mongodb+srv://u:***@db.example.net/ is not reachable (no answer within 5 s)")


def test_ctrl_c_while_waiting_for_mongodb_is_clean(settings: Settings) -> None:
    env = _env(settings, PODEMBED_MONGO_URI=f"mongodb://127.0.0.1:{free_port()}", PODEMBED_FIRST_CONTACT_SECONDS="60")
    for command in (["jobs"], ["ingest", str(DATA / "E03.txt")]):
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", *command], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # waiting on the first contact
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        assert (process.returncode, stdout, stderr) == (130, "", ""), command


def test_a_closed_pipe_ends_quietly(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _ingest(settings, redis, db, DATA / "E03.txt")
    for command in (["jobs"], ["jobs", "--json"], ["status", job_id, "--json"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written (`| head -0`)
        out = subprocess.run([sys.executable, "-m", "worker.cli", *command], cwd=ROOT, env=_env(settings),
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(write)
        assert (out.returncode, out.stderr) == (141, ""), command


def test_watch_into_a_file_writes_a_plain_line_per_change(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _ingest(settings, redis, db, EXAMPLES / "E05.vtt", batch_max_chunks=4)
    watcher = subprocess.Popen([sys.executable, "-m", "worker.cli", "status", job_id, "--watch", "--interval", "0.1"],
                               cwd=ROOT, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(1.5)
        run_worker(settings, burst=True, redis=redis)
        _, stderr = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert "\r" not in stderr and "\x1b" not in stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("[" + "." * 30 + "] 0/11 chunks") and lines[-1].endswith("finished")
    assert len(lines) == len(set(lines)) >= 2  # a line per change, none repeated while nothing moves


def test_progress_within_a_batch_per_forward_pass(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(micro_batch_size=2)
    job_id = _ingest(settings, redis, db, DATA / "E03.txt")
    seen: list[int] = []

    class Watching(JobRecords):
        def mark_stored(self, job_id: str, batch_id: str, n_chunks: int) -> None:
            super().mark_stored(job_id, batch_id, n_chunks)
            seen.append(self.status(job_id).chunks.in_progress)

    worker, ctx = make_worker(settings, redis)
    ctx.records = Watching(redis, db, settings.result_ttl)
    drain(worker)
    assert seen == [2, 4]  # 4 chunks, 2 per forward pass, in one batch
    status = ctx.records.status(job_id)
    assert (status.chunks.embedded, status.chunks.in_progress, status.chunks.pending) == (4, 0, 0)
    # A late report of a batch already counted changes nothing.
    ctx.records.mark_stored(job_id, ctx.records.batch_ids(job_id)[0], 2)
    assert ctx.records.status(job_id).chunks.in_progress == 0


def test_version_and_verbose_after_the_subcommand(settings: Settings, redis: Redis, db: Database) -> None:
    version = _run(settings, "--version")
    assert version.returncode == 0 and version.stdout.startswith("podembed ")
    after = _run(settings, "status", "nosuchjob", "-v")
    assert after.returncode == 2 and after.stderr.strip().endswith(
        "podembed: no job with id 'nosuchjob': a job id is 12 hex digits")
    assert "DEBUG" in after.stderr


def test_backfill_selection_errors(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    dated = _run(settings, "backfill", "--source", str(tmp_path), "--since", "2016-01-01", "--dry-run")
    assert dated.returncode == 1 and "--since/--until select by publication date" in dated.stderr

    db.transcripts.insert_many(transcript_docs())
    some = _run(settings, "backfill", "--episodes", "E03", "E99", "--dry-run", "--json")
    assert some.returncode == 0 and json.loads(some.stdout)["episodes"] == 1
    assert json.loads(some.stdout)["not_found"] == ["E99"] and "podembed: not found: E99" in some.stderr
    none = _run(settings, "backfill", "--episodes", "E98", "E99", "--dry-run")
    assert none.returncode == 1
    assert "none of the 2 episodes given with --episodes was found in mongo" in none.stderr


def test_retry_exits_zero_on_finished_and_cancelled_jobs(settings: Settings, redis: Redis, db: Database) -> None:
    finished = _ingest(settings, redis, db, DATA / "E03.txt")
    run_worker(settings, burst=True, redis=redis)
    cancelled = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    cancel(settings, redis, db, cancelled)
    one, two = _run(settings, "retry", finished), _run(settings, "retry", cancelled, "--json")
    assert (one.returncode, two.returncode) == (0, 0), two.stderr
    assert one.stdout.strip() == f"job {finished}: 0 failed batches requeued; now finished"
    assert json.loads(two.stdout) == {"job_id": cancelled, "state": "cancelled", "requeued": []}


def test_services_status_says_who_started_them(settings: Settings, tmp_path: Path) -> None:
    ours = _run(settings, "services", "status", "--json")
    assert ours.returncode == 0, ours.stderr
    states = {s["name"]: s for s in json.loads(ours.stdout)}
    assert states["redis"]["answering"] and states["mongo"]["answering"]
    assert states["redis"]["pid"] == int((settings.data_dir / "redis.pid").read_text())
    others = _run(settings, "services", "status", PODEMBED_DATA_DIR=str(tmp_path)).stdout.splitlines()
    assert others[0].startswith("redis") and others[0].endswith("up (not started by podembed)")


def test_worker_logs_a_failed_batch_once(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _ingest(settings, redis, db, DATA / "E03.txt")
    out = _run(settings, "work", "--burst", PODEMBED_MAX_FORWARD_TOKENS="1")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("failed for good: EmbeddingError") == 1 and "Traceback" not in out.stderr
    assert job_id in out.stderr
    verbose = _run(settings, "retry", job_id)
    assert verbose.returncode == 0
    assert "Traceback" in _run(settings, "work", "--burst", "-v", PODEMBED_MAX_FORWARD_TOKENS="1").stderr



def test_ingest_shows_progress_on_a_terminal(settings: Settings, redis: Redis, db: Database) -> None:
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "ingest", str(EXAMPLES / "E01.vtt"),
                                str(EXAMPLES / "E05.vtt")], cwd=ROOT, env=_env(settings), stdout=subprocess.PIPE,
                               stderr=follower, text=True)
    os.close(follower)
    stdout, _ = process.communicate(timeout=60)
    shown = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        shown += data
    os.close(leader)
    assert process.returncode == 0 and stdout.startswith("job ")
    text = shown.decode()
    # One line per window enqueued, redrawn in place; the last names the last file of all.
    assert f"\r[2/2] enqueued {EXAMPLES / 'E05.vtt'}\x1b[K" in text
    # Into a file or a pipe: no progress at all.
    quiet = _run(settings, "ingest", str(EXAMPLES / "E01.vtt"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_file_with_an_unusual_number_of_chunks_is_named(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    episodes, _ = parse_files([EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt"])
    spec = vector_spec(settings)
    chunks = chunk_episodes(settings, episodes, spec)
    assert not caplog.records  # real episodes are far from the threshold
    counts = {e.source: sum(c.episode_id == e.episode_id for c in chunks) for e in episodes}
    monkeypatch.setattr(streaming, "UNUSUAL_CHUNKS", min(counts.values()))
    chunk_episodes(settings, episodes, spec)
    big = max(counts, key=counts.get)
    assert [r.getMessage() for r in caplog.records] == [
        f"{big!r} gave {counts[big]} chunks, an unusual number for one episode (over {min(counts.values())}): "
        "is it one transcript?"]
