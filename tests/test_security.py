"""Security: the queue runs only podembed's JSON batches, secrets never reach output, the API guards itself.

A job written into Redis by someone else, pickled or naming another function, is refused
without running any of it. Connection strings with passwords and the API token never appear
in what the commands print, whether they succeed or fail.
"""

from __future__ import annotations

import inspect
import json
import socket
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from fastapi.testclient import TestClient
from pymongo.database import Database
from redis import Redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from config.errors import PodembedError
from config.settings import Settings
from producer.connections import mongo_database, redis_client
from producer.enqueue import TASK, batch_queue, ingest, parse_files
from producer.jobs import JOBS_INDEX, JobRecords
from producer.sources import DirectorySource
from producer.web import api
from tests.conftest import EXAMPLES
from tests.soak.harness import run_cli, worker_env
from worker.loop import run_worker

REDIS_SECRET = "r3dis-Secret-7f1c"
MONGO_SECRET = "m0ngo-Secret-92ab"
API_SECRET = "api-Token-Secret-4d0e"


class Trap:
    """Unpickling this touches `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def _real_job(settings: Settings, redis: Redis, db: Database) -> str:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    return ingest(settings, redis, db, episodes, kind="ingest").job_id


def _failure(redis: Redis, job_id: str) -> tuple[JobStatus, str]:
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    return job.get_status(), job.latest_result().exc_string


def test_pickled_job_is_refused_not_executed(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    real = _real_job(settings, redis, db)
    trap = tmp_path / "unpickled"
    # What rq's default (pickle) serializer writes, as anyone with access to Redis could.
    Queue(settings.queue_name, connection=redis).enqueue("pathlib.Path.touch", Trap(trap), job_id="pickled",
                                                          at_front=True)
    assert run_worker(settings, burst=True, redis=redis)

    status, reason = _failure(redis, "pickled")
    assert not trap.exists()
    assert status == JobStatus.FAILED and "rq.exceptions.DeserializationError" in reason
    assert batch_queue(settings, redis).failed_job_registry.get_job_ids() == ["pickled"]
    assert JobRecords(redis, db, settings.result_ttl).status(real).state == "finished"


@pytest.mark.parametrize(("func", "on_failure", "refusal"), [
    ("os.system", None, "refusing to run 'os.system', not a podembed task"),
    (TASK, "os.system", "refusing failure callback 'os.system', not podembed's"),
])
def test_json_job_naming_other_code_is_refused(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path, func: str, on_failure: str | None, refusal: str
) -> None:
    real = _real_job(settings, redis, db)
    trap = tmp_path / "ran"
    queue = batch_queue(settings, redis)
    # JSON keeps pickles out, but a JSON job names any importable function: the worker must refuse it.
    queue.enqueue(func, f"touch {trap}", job_id="foreign", at_front=True,
                  on_failure=Callback(on_failure) if on_failure else None)
    run_worker(settings, burst=True, redis=redis)

    status, reason = _failure(redis, "foreign")
    assert not trap.exists()
    assert status == JobStatus.FAILED and f"ForeignJobError: job foreign: {refusal}" in reason
    assert JobRecords(redis, db, settings.result_ttl).status(real).state == "finished"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_secrets_never_appear_in_output(
    settings: Settings, redis: Redis, db: Database, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    port = settings.redis_url.rsplit(":", 1)[1]
    # This Redis has no password: over RESP3 it takes HELLO with one and carries on, so these commands succeed
    # (over RESP2, podembed's default, it refuses AUTH).
    env = worker_env(f"redis://:{REDIS_SECRET}@127.0.0.1:{port}/0?protocol=3", settings.mongo_uri, settings.mongo_db,
                     api_token=API_SECRET)
    ran = {}
    ingested = run_cli(env, "ingest", str(EXAMPLES / "E05.vtt"), "--json")
    assert ingested.returncode == 0, ingested.stderr
    job_id = json.loads(ingested.stdout)["job_id"]
    ran["ingest"] = ingested
    # The verbose worker in a process of its own (every library's debug log, the interpreter's warnings);
    # the quicker commands in this one, their output captured as a process's would be.
    for args in (["-v", "work", "--burst"], ["status", job_id, "--json"], ["status", job_id], ["jobs", "--json"],
                 ["retry", job_id, "--json"], ["cancel", job_id, "--json"], ["services", "status"]):
        ran[" ".join(args)] = done = (run_cli if args[0] == "-v" else cli_in_process)(env, *args)
        assert done.returncode == 0, (args, done.stderr)
    assert "worker on redis://:***@127.0.0.1" in ran["-v work --burst"].stderr
    assert json.loads(ran["status " + job_id + " --json"].stdout)["state"] == "finished"

    # Unreachable, refusing or malformed: each fails with one line, the URL shown without its password.
    dead = _dead_port()
    failing = {
        "redis down": {"PODEMBED_REDIS_URL": f"redis://bob:{REDIS_SECRET}@127.0.0.1:{dead}/0"},
        "redis refuses": {"PODEMBED_REDIS_URL": f"redis://bob:{REDIS_SECRET}@127.0.0.1:{port}/0"},
        "redis malformed": {"PODEMBED_REDIS_URL": f"redis://:{REDIS_SECRET}@127.0.0.1:no-port/0"},
        "mongo down": {"PODEMBED_MONGO_URI": f"mongodb://bob:{MONGO_SECRET}@127.0.0.1:{dead}/",
                       "PODEMBED_MONGO_TIMEOUT_MS": "300"},
        "mongo malformed": {"PODEMBED_MONGO_URI": f"mongodb://bob:{MONGO_SECRET}@x@127.0.0.1:{dead}/"},
    }
    for fault, overrides in failing.items():
        # An unknown job, so that `status` asks MongoDB too; `work` loads torch, so it runs twice only.
        # `status` in a process of its own for each fault: the one line is all the interpreter prints.
        for args in (["status", "0123456789ab", "--json"], ["ingest", str(EXAMPLES / "E05.vtt"), "--json"],
                     *([["work", "--burst"]] if fault.endswith("down") else [])):
            run = run_cli if args[0] == "status" else cli_in_process
            done = ran[f"{fault}: {' '.join(args)}"] = run({**env, **overrides}, *args)
            assert done.returncode != 0 and done.stdout == "", (fault, args, done.stdout)
            assert done.stderr.splitlines()[-1].startswith("podembed: "), (fault, args, done.stderr)
    assert "PODEMBED_REDIS_URL='redis://:***@127.0.0.1:no-port/0'" in ran["redis malformed: ingest"
                                                                         f" {EXAMPLES / 'E05.vtt'} --json"].stderr
    assert f"Redis at redis://bob:***@127.0.0.1:{dead}/0 is not reachable" in ran["redis down: work --burst"].stderr
    for name, done in ran.items():
        for secret in (REDIS_SECRET, MONGO_SECRET, API_SECRET):
            assert secret not in done.stdout + done.stderr, (name, secret)


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(api.create_app(settings.replace(api_token=API_SECRET, max_request_bytes=64 * 1024)))


def test_api_token_is_required_and_never_echoed(client: TestClient, redis: Redis) -> None:
    # The comparison is `hmac.compare_digest` on bytes: its time does not depend on where they differ.
    assert "hmac.compare_digest((given or \"\").encode(), token.encode())" in inspect.getsource(api)
    wrong = [None, "Bearer ", f"Bearer {API_SECRET[:-1]}x", f"Bearer {API_SECRET}x", "Bearer é".encode("latin-1"),
             f"Basic {API_SECRET}"]
    for header in wrong:
        answer = client.get("/jobs", headers={"Authorization": header} if header else {})
        assert (answer.status_code, answer.json()) == (401, {"detail": "missing or wrong bearer token"}), header
        assert API_SECRET not in answer.text
    assert client.get("/jobs", headers={"Authorization": f"Bearer {API_SECRET}"}).status_code == 200


def test_api_refuses_bodies_over_the_limit_and_creates_nothing(client: TestClient, redis: Redis) -> None:
    auth = {"Authorization": f"Bearer {API_SECRET}", "Content-Type": "application/json"}
    content = (EXAMPLES / "E05.vtt").read_text()
    body = json.dumps({"transcripts": [{"name": f"E{i}.vtt", "content": content} for i in range(5)]}).encode()
    assert len(body) > 64 * 1024
    assert client.post("/jobs", content=body, headers=auth).status_code == 413
    # Without a Content-Length (chunked), the limit holds as the body streams in.
    pieces = (body[i : i + 8192] for i in range(0, len(body), 8192))
    assert client.post("/jobs", content=pieces, headers=auth).status_code == 413
    assert redis.zcard(JOBS_INDEX) == 0 and redis.keys("rq:job:*") == []


def test_settings_repr_and_url_errors_hold_no_secret() -> None:
    settings = Settings(redis_url=f"redis://bob:{REDIS_SECRET}@127.0.0.1:1/0",
                        mongo_uri=f"mongodb://bob:{MONGO_SECRET}@127.0.0.1:1/", api_token=API_SECRET)
    shown = [repr(settings), str(settings), repr(settings.replace(mongo_db="other"))]
    for variable, url in (("PODEMBED_REDIS_URL", f"redis://:{REDIS_SECRET}@127.0.0.1:no-port/0"),
                          ("PODEMBED_MONGO_URI", f"mongodb://bob:{MONGO_SECRET}@x@127.0.0.1:1/")):
        with pytest.raises(PodembedError) as refused:
            (redis_client if "REDIS" in variable else mongo_database)(Settings.from_env({variable: url}))
        shown.append(str(refused.value))
    with pytest.raises(PodembedError) as refused:
        Settings.from_env({"PODEMBED_REDIS_URL": settings.redis_url, "PODEMBED_BATCH_MAX_TOKENS": "0"})
    shown.append(str(refused.value))
    for text in shown:
        for secret in (REDIS_SECRET, MONGO_SECRET, API_SECRET):
            assert secret not in text, (secret, text)


def test_job_ids_are_checked_before_any_redis_call(client: TestClient, settings: Settings, redis: Redis,
                                                   db: Database) -> None:
    job_id = _real_job(settings, redis, db)
    auth = {"Authorization": f"Bearer {API_SECRET}"}
    # `{id}:done` and `{id}:failed` are the names of other keys of the job, of other Redis types.
    for bad in (f"{job_id}:done", f"{job_id}:failed", f"{job_id}:batches", "*", job_id.upper(), job_id + "0"):
        for method, path in (("GET", f"/jobs/{bad}"), ("POST", f"/jobs/{bad}/retry"), ("POST", f"/jobs/{bad}/cancel")):
            answer = client.request(method, path, headers=auth)
            assert answer.status_code == 404, (method, path, answer.text)
            assert "a job id is 12 hex digits" in answer.json()["detail"] and "podembed:job" not in answer.text
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
    for command in ("status", "retry", "cancel"):
        done = run_cli(env, command, f"{job_id}:failed")
        assert done.returncode == 2 and "a job id is 12 hex digits" in done.stderr, (command, done.stderr)
    assert client.get(f"/jobs/{job_id}", headers=auth).json()["job_id"] == job_id


def test_only_loopback_and_allowed_host_names_are_answered(settings: Settings, redis: Redis) -> None:
    """A page whose own name resolves to 127.0.0.1 (DNS rebinding) reaches no route, even without a token."""
    for allowed, answered in (("", ["127.0.0.1:8000", "localhost"]), ("api.example.org", ["api.example.org"])):
        open_api = TestClient(api.create_app(settings.replace(api_token=None, allowed_hosts=allowed),
                                             open_access=True))
        for host in ("rebind.attacker.example", "127.0.0.1.attacker.example", "testserver"):
            answer = open_api.get("/jobs", headers={"Host": host})
            assert answer.status_code == 400, (host, answer.text)
        for host in [*answered, "[::1]:8000"]:
            assert open_api.get("/jobs", headers={"Host": host}).status_code == 200, host


FORGED = "\n2026-12-07 03:00:00,000 ERROR producer.web.api: forged line"


def test_control_characters_in_names_are_refused_and_never_logged(client: TestClient, settings: Settings,
                                                                  redis: Redis, db: Database, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    auth = {"Authorization": f"Bearer {API_SECRET}"}
    # A cue that ends before it starts is logged with the file's name.
    content = "WEBVTT\n\n00:00:05.000 --> 00:00:01.000\n[Host]: words that go somewhere\n"
    good = {"name": "E01.vtt", "content": content}
    bodies = [{"transcripts": [{**good, "name": "E01.vtt" + FORGED}]},
              {"transcripts": [{**good, "episode_id": "E01\x1b]0;owned\x07"}]},
              {"transcripts": [good], "podcast": "Show\u202egnp.exe"},
              {"transcripts": [{**good, "episode_id": "E" * 501}]},
              {"transcripts": [good], "podcast": "S" * 501}]
    with caplog.at_level("DEBUG"):
        for body in bodies:
            answer = client.post("/jobs", json=body, headers=auth)
            assert answer.status_code == 422, answer.text
            assert "control character" in answer.text or "at most 500 characters" in answer.text, answer.text
        assert client.post("/jobs", json={"transcripts": [good]}, headers=auth).status_code == 202
    assert "forged line" not in caplog.text and "E01.vtt': line 3: cue ends before it starts" in caplog.text
    assert redis.zcard(JOBS_INDEX) == 1

    # Files and folders of a source, and the command line, are checked the same way.
    (tmp_path / "Show\x1b[31m").mkdir()
    (tmp_path / "Show\x1b[31m" / "E01.vtt").write_text(content)
    (tmp_path / "E02\r.vtt").write_text(content)
    (tmp_path / "E03.vtt").write_text(content)
    source = DirectorySource(tmp_path)
    assert [e.episode_id for e in source.episodes()] == ["E03"]
    assert len(source.refused) == 2 and all("control character" in r for r in source.refused)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
    refused = run_cli(env, "ingest", str(tmp_path / "E03.vtt"), "--podcast", "Show\x1b]0;owned\x07")
    assert refused.returncode != 0 and "control character U+001B" in refused.stderr
    assert "\x1b" not in refused.stderr


def test_cli_prints_stored_text_without_terminal_escapes(settings: Settings, redis: Redis, db: Database,
                                                         tmp_path: Path) -> None:
    transcript = tmp_path / "E01.txt"
    transcript.write_text("Before the title \x1b]0;owned title\x07 and red \x1b[31mtext\x1b[0m after it.\n")
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
    ingested = run_cli(env, "ingest", str(transcript), "--podcast", "Show")
    assert ingested.returncode == 0, ingested.stderr
    run_worker(settings, burst=True, redis=redis)
    assert "\x1b]0;owned title\x07" in db.embeddings.find_one({})["text"]
    found = run_cli(env, "search", "red text", "-k", "1", "--podcast", "Show")
    assert found.returncode == 0, found.stderr
    assert "\x1b" not in found.stdout and "\x07" not in found.stdout
    assert "\\x1b]0;owned title\\x07" in found.stdout and "\\x1b[31mtext" in found.stdout
