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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pymongo.database import Database
from redis import Redis

from config.services import free_port
from config.settings import Settings
from producer import streaming
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords, NewJob
from producer.operations import cancel
from producer.streaming import chunk_episodes
from tests.conftest import DATA, EXAMPLES, ROOT, taking_drain
from tests.conftest import cli_env as _env
from tests.test_sources import SHOW, transcript_docs
from worker.loop import drain, make_worker, run_worker
from worker.pipeline import Housekeeper


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


def test_services_down_are_one_line(
    settings: Settings, redis: Redis, db: Database, cli_in_process: Callable[..., subprocess.CompletedProcess]
) -> None:
    mongo_port, redis_port = free_port(), free_port()
    mongo_down = {"PODEMBED_MONGO_URI": f"mongodb://127.0.0.1:{mongo_port}", "PODEMBED_FIRST_CONTACT_SECONDS": "1"}
    redis_down = {"PODEMBED_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    for command in (["jobs"], ["work", "--burst"], ["ingest", str(DATA / "E03.txt")]):
        if command == ["jobs"]:  # in a process of its own: the one line is all the interpreter prints
            on_mongo_down, on_redis_down = (_run(settings, *command, **down) for down in (mongo_down, redis_down))
        else:  # the others in this process
            on_mongo_down, on_redis_down = (cli_in_process(_env(settings, **down), *command)
                                            for down in (mongo_down, redis_down))
        out = on_mongo_down
        assert out.returncode == 1
        assert out.stderr.splitlines()[-1] == (f"podembed: MongoDB at mongodb://127.0.0.1:{mongo_port} is not "
                                               "reachable (is it running? podembed services up)"), command
        assert "Traceback" not in out.stderr and "Topology" not in out.stderr
        out = on_redis_down
        assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
            f"podembed: Redis at redis://127.0.0.1:{redis_port}/0 is not reachable "
            "(is it running? podembed services up)"), command
    # Elsewhere than this machine the hint would mislead: the reason instead, without the password.
    from producer.connections import unreachable

    assert unreachable("MongoDB", "mongodb+srv://u:secret@db.example.net/", "no answer within 5 s") == (
        "MongoDB at mongodb+srv://u:***@db.example.net/ is not reachable (no answer within 5 s)")


def test_search_and_index_with_mongodb_down_are_one_line(settings: Settings) -> None:
    # They read MongoDB only, and used to wait for the client's long server selection (2 minutes).
    port = free_port()
    for command in (["search", "bees", "-k", "1"], ["index", "--print"], ["index"]):
        # The subprocess' own limit (120 s) only catches a hang; the command gives up after 1 s.
        out = _run(settings, *command, PODEMBED_MONGO_URI=f"mongodb://127.0.0.1:{port}",
                   PODEMBED_FIRST_CONTACT_SECONDS="1")
        assert (out.returncode, out.stdout) == (1, ""), command
        assert out.stderr.splitlines() == [f"podembed: MongoDB at mongodb://127.0.0.1:{port} is not reachable "
                                           "(is it running? podembed services up)"], command


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
    after = _run(settings, "status", "0123456789ab", "-vv")  # -vv: pymongo's debug log too
    assert after.returncode == 2 and after.stderr.strip().endswith("podembed: no job with id '0123456789ab'")
    assert "DEBUG pymongo.command" in after.stderr


def test_backfill_selection_errors(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    dated = _run(settings, "backfill", "--source", str(tmp_path), "--since", "2016-01-01", "--dry-run")
    assert dated.returncode == 1 and "--since/--until select by publication date" in dated.stderr

    db.transcripts.insert_many(transcript_docs())
    some = _run(settings, "backfill", "--episodes", "E03", "E99", "--dry-run", "--json")
    assert some.returncode == 0 and json.loads(some.stdout)["episodes"] == 1
    assert json.loads(some.stdout)["not_found"] == ["E99"]
    assert "podembed: no episode 'E99' among those selected from mongo (none is close)" in some.stderr
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
    assert json.loads(two.stdout) == {"job_id": cancelled, "state": "cancelled", "requeued": [], "deleted": []}


def test_services_status_says_who_started_them(settings: Settings, tmp_path: Path) -> None:
    ours = _run(settings, "services", "status", "--json")
    assert ours.returncode == 0, ours.stderr
    states = {s["name"]: s for s in json.loads(ours.stdout)}
    assert states["redis"]["answering"] and states["mongo"]["answering"]
    assert states["redis"]["pid"] == int((settings.data_dir / "redis.pid").read_text())
    others = _run(settings, "services", "status", PODEMBED_DATA_DIR=str(tmp_path)).stdout.splitlines()
    assert others[0].startswith("redis") and others[0].endswith("up (not started by podembed)")


def test_worker_logs_a_failed_batch_once(
    settings: Settings, redis: Redis, db: Database, cli_in_process: Callable[..., subprocess.CompletedProcess]
) -> None:
    job_id = _ingest(settings, redis, db, DATA / "E03.txt")
    out = _run(settings, "work", "--burst", PODEMBED_MAX_FORWARD_TOKENS="1")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("failed for good: EmbeddingError") == 1 and "Traceback" not in out.stderr
    assert job_id in out.stderr
    verbose = _run(settings, "retry", job_id)
    assert verbose.returncode == 0
    # Verbose, in this process (the first ran in one of its own, as a person runs it).
    verbose = cli_in_process(_env(settings, PODEMBED_MAX_FORWARD_TOKENS="1"), "work", "--burst", "-v")
    assert "Traceback" in verbose.stderr and "failed for good: EmbeddingError" in verbose.stderr



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
    assert "stderr shows `[n/total] enqueued FILE` each time a" in (ROOT / "README.md").read_text()  # as it says
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


def test_backfill_names_what_matched_nothing(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    empty = _run(settings, "backfill", "--dry-run")
    assert empty.returncode == 1 and empty.stderr == (
        "podembed: MongoDB `transcripts` holds no transcript: `ingest` embeds files without storing them there. "
        "To embed files again, give their directory: backfill --source DIR\n")

    db.transcripts.insert_many(transcript_docs())
    typo = _run(settings, "backfill", "--podcast", SHOW.lower(), "--dry-run")
    assert typo.returncode == 1 and typo.stderr == (
        f"podembed: no podcast {SHOW.lower()!r} in MongoDB `transcripts` (closest: {SHOW!r})\n")

    # A folder per podcast; the id of `E140.mp3.vtt` is `E140.mp3`.
    (tmp_path / SHOW).mkdir()
    (tmp_path / SHOW / "E140.mp3.vtt").write_bytes((EXAMPLES / "E05.vtt").read_bytes())
    (tmp_path / SHOW / "E141.mp3.vtt").write_bytes((EXAMPLES / "E01.vtt").read_bytes())
    source = str(tmp_path)
    stem = _run(settings, "backfill", "--source", source, "--episodes", "E140", "--dry-run")
    assert stem.returncode == 1
    assert stem.stderr.splitlines() == [
        f"podembed: no episode 'E140' among those selected from {source} (closest: 'E140.mp3')",
        f"podembed: none of the 1 episode given with --episodes was found in {source}"]
    folder = _run(settings, "backfill", "--source", source, "--podcast", "Nope Show", "--dry-run")
    assert folder.returncode == 1 and folder.stderr == (
        f"podembed: no podcast 'Nope Show' in {source}: with --source DIR, a podcast is a folder of it "
        "(none is close)\n")
    one = _run(settings, "backfill", "--source", source, "--podcast", SHOW, "--episodes", "E140.mp3", "--dry-run")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(f"dry run, nothing enqueued: 1 episode of podcast {SHOW!r} (the folder "
                                 f"{tmp_path / SHOW}), 11 chunks (0 already embedded, left out), 1 batch, ")
    # The two meanings of --podcast, side by side in the help.
    assert "ingest --podcast names the show instead" in " ".join(_run(settings, "backfill", "--help").stdout.split())
    assert "backfill --podcast selects by it" in " ".join(_run(settings, "ingest", "--help").stdout.split())


def test_bad_and_unknown_settings(settings: Settings, redis: Redis, db: Database) -> None:
    gpu = _run(settings, "jobs", PODEMBED_DEVICE="gpu")
    assert gpu.returncode == 1 and gpu.stderr == ("podembed: PODEMBED_DEVICE='gpu' is not a device: cpu, cuda, "
                                                  "cuda:N or mps (unset: cuda where torch has it, else cpu)\n")
    # A device torch cannot use here: `cuda` on a CPU build (the one pinned), a GPU beyond the last elsewhere.
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    out = _run(settings, "work", "--burst", PODEMBED_DEVICE=device)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines()[-1].startswith(f"podembed: PODEMBED_DEVICE={device!r} is not usable here: ")

    typo = _run(settings, "jobs", PODEMBED_BATCH_MAX_TOKEN="100", PODEMBED_MODAL_GPU="cpu")
    assert typo.returncode == 0
    warnings = [line.split(": ", 1)[1] for line in typo.stderr.splitlines()]
    assert warnings == ["PODEMBED_BATCH_MAX_TOKEN is not a podembed setting and is ignored "
                        "(did you mean PODEMBED_BATCH_MAX_TOKENS?)"]


def test_the_small_things(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    nightly = _run(settings, "nightly", "--source", str(DATA / "E03.txt"))
    assert nightly.returncode == 1 and nightly.stderr == (
        f"podembed: --source {DATA / 'E03.txt'} is a file: nightly and backfill read a directory of transcripts "
        "(podembed ingest FILE embeds one file)\n")

    notes = tmp_path / "notes.md"
    notes.write_text("Not a transcript.\n")
    md = _run(settings, "ingest", str(notes), str(DATA / "E03.txt"))
    assert md.returncode == 1 and md.stderr == (f"podembed: not a transcript file: {notes} (podembed reads .json, "
                                                ".srt, .txt, .vtt files)\n")

    broken = tmp_path / "broken.json"
    broken.write_text('{"segments": [{"start": 0, "end": 1, "text": "unterminated}]}')
    refused = _run(settings, "ingest", str(broken), str(DATA / "E03.txt"), "--podcast", SHOW)
    assert refused.returncode == 1
    assert f"podembed: refused {broken}: line 1: invalid JSON: Unterminated string starting at column 46\n" in (
        refused.stderr)
    # One episode, one batch: no `1 episodes`, `1 batches`.
    assert f": 1 episode of podcast {SHOW!r}, 4 chunks (0 already embedded), 1 batch, " in refused.stdout
    assert "\n1 file refused (see above)\n" in refused.stdout

    # The worker's state as rq's own `rq info` shows it, from its first beat.
    drain = taking_drain(settings, redis)
    drain.worker.register_birth()
    for state in ("idle", "busy"):  # the ingest above queued one batch: taken between the two beats
        Housekeeper(drain).beat()
        info = subprocess.run([str(Path(sys.executable).parent / "rq"), "info", "--url", settings.redis_url, "-W",
                               "-r"], capture_output=True, text=True, timeout=60)
        (shown,) = [line for line in info.stdout.splitlines() if line.startswith(f"worker {drain.worker.name} ")]
        assert f") {state} {settings.queue_name}, " in shown, info.stdout
        drain.take()

    # Mongo's wire protocol is not debug output of podembed: only -vv shows it.
    verbose = _run(settings, "jobs", "-v")
    assert verbose.returncode == 0 and "pymongo" not in verbose.stderr
    assert "pymongo.command" in _run(settings, "jobs", "-vv").stderr

    # `jobs` keeps its columns for the longest state.
    records = JobRecords(redis, db, settings.result_ttl)
    records.create(NewJob(job_id="0123456789ab", kind="ingest", queue=settings.queue_name, model=settings.model,
                          instruction=settings.instruction, vector_key=vector_spec(settings).key))
    records.release_producer("0123456789ab")
    header, *rows = _run(settings, "jobs").stdout.splitlines()
    assert any(" interrupted " in row for row in rows)
    assert {row.index(":") - len("2026-12-07T09") for row in rows} == {header.index("created")}

    # `services down` stops only what `up` started: it says so of one it leaves running.
    others = _run(settings, "services", "down", PODEMBED_DATA_DIR=str(tmp_path / "elsewhere")).stdout.splitlines()
    assert others[0].startswith("redis") and others[0].endswith("up (not started by podembed), left running")
    idle = _run(settings, "services", "status", PODEMBED_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                PODEMBED_DATA_DIR=str(tmp_path / "elsewhere"))
    assert idle.stdout.splitlines()[0].endswith(" down")
