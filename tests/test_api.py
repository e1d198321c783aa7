"""The HTTP API over real HTTP (uvicorn on a spare port), real Redis and nx-27017."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from pymongo.database import Database
from redis import Redis

from config.services import free_port
from config.settings import Settings
from producer.enqueue import ingest, parse_files
from producer.jobs import JOBS_INDEX, JobRecords
from producer.web.api import create_app
from tests.conftest import DATA, EXAMPLES, ROOT, run_cli
from worker.loop import run_worker

TOKEN = "test-token-0123456789"
BROKEN_VTT = "WEBVTT\n\n00:00:01.000 --> 00:0x:02.000\n[Amit Varma]: hello\n"
DESIGN_FIELDS = {"job_id", "kind", "state", "created_at", "finished_at", "model", "instruction", "episodes", "chunks",
                 "batches", "gpu_seconds", "cost_usd", "device"}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(api_token=TOKEN, max_request_bytes=256 * 1024)


@pytest.fixture
def base_url(api_settings: Settings, redis: Redis, db: Database) -> Iterator[str]:
    with _serving(api_settings) as url:
        yield url


@contextmanager
def _serving(settings: Settings) -> Iterator[str]:
    """The API of `settings` on a spare port, in this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def _transcript(path, **extra: str) -> dict[str, str]:
    return {"name": path.name, "content": path.read_text(), **extra}


def test_requests_without_the_token_get_401(base_url: str, redis: Redis) -> None:
    body = {"transcripts": [_transcript(DATA / "E03.txt")]}
    routes = [("GET", "/jobs"), ("GET", "/jobs/abc"), ("POST", "/jobs"), ("POST", "/jobs/abc/retry"),
              ("POST", "/jobs/abc/cancel"), ("GET", "/search?q=farming"), ("GET", "/fleet"),
              ("GET", "/fleet/ledger"), ("GET", "/metrics")]
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        for method, path in routes:
            response = httpx.request(method, base_url + path, headers=headers, json=body)
            assert response.status_code == 401, (headers, method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or wrong bearer token"}
    assert redis.zcard(JOBS_INDEX) == 0

    health = httpx.get(base_url + "/healthz")
    assert (health.status_code, health.json()) == (200, {"redis": True, "mongo": True})
    schema = httpx.get(base_url + "/openapi.json").json()
    assert set(schema["paths"]) == {"/healthz", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/retry",
                                    "/jobs/{job_id}/cancel", "/search", "/fleet", "/fleet/ledger",
                                    "/metrics"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/jobs"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert schema["components"]["schemas"]["JobState"]["enum"] == [
        "queued", "running", "finished", "partial", "failed", "cancelled", "interrupted"]
    assert schema["components"]["schemas"]["JobStatus"]["properties"]["state"] == {
        "$ref": "#/components/schemas/JobState"}


def test_post_poll_list_and_finish_a_job(
    client: httpx.Client, api_settings: Settings, redis: Redis, db: Database
) -> None:
    created = client.post("/jobs", json={"podcast": "The Seen and the Unseen", "transcripts": [
        _transcript(EXAMPLES / "E05.vtt"), {"name": "broken.vtt", "content": BROKEN_VTT}]})
    assert created.status_code == 202
    job = created.json()
    assert (job["episodes"], job["chunks"], job["batches"]) == (1, 11, 1)
    assert job["refused"] == ["broken.vtt: line 3: malformed timestamp in '00:00:01.000 --> 00:0x:02.000'"]
    assert created.headers["location"] == f"/jobs/{job['job_id']}"

    polled = client.get(f"/jobs/{job['job_id']}")
    assert polled.status_code == 200
    status = polled.json()
    assert DESIGN_FIELDS <= set(status)
    assert status == JobRecords(redis, db, api_settings.result_ttl).status(job["job_id"]).to_dict()
    assert (status["state"], status["kind"], status["chunks"]["total"]) == ("queued", "ingest", 11)
    assert [j["job_id"] for j in client.get("/jobs").json()] == [job["job_id"]]

    run_worker(api_settings, burst=True, redis=redis)
    status = client.get(f"/jobs/{job['job_id']}").json()
    assert (status["state"], status["chunks"]["embedded"], status["batches"]["finished"]) == ("finished", 11, 1)
    assert status["gpu_seconds"] > 0 and status["device"] == "cpu"
    assert db.embeddings.count_documents({"podcast": "The Seen and the Unseen"}) == 11

    # Nothing failed, nothing queued: retry and cancel change nothing.
    assert client.post(f"/jobs/{job['job_id']}/retry").json() == {"job_id": job["job_id"], "state": "finished",
                                                                    "requeued": [], "deleted": []}
    assert client.post(f"/jobs/{job['job_id']}/cancel").json() == {"job_id": job["job_id"], "state": "finished",
                                                                     "removed": []}


def test_cancel_then_retry_over_http(client: httpx.Client, redis: Redis) -> None:
    job_id = client.post("/jobs", json={"transcripts": [_transcript(DATA / "E03.txt")]}).json()["job_id"]
    cancelled = client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.json() == {"job_id": job_id, "state": "cancelled", "removed": [f"{job_id}-00000"]}
    assert client.post(f"/jobs/{job_id}/cancel").json()["removed"] == []
    assert client.get(f"/jobs/{job_id}").json()["state"] == "cancelled"
    retried = client.post(f"/jobs/{job_id}/retry")  # never retried, like the CLI: nothing to requeue
    assert (retried.status_code, retried.json()) == (200, {"job_id": job_id, "state": "cancelled", "requeued": [],
                                                           "deleted": []})


def test_refused_input_creates_no_job(client: httpx.Client, redis: Redis) -> None:
    response = client.post("/jobs", json={"transcripts": [
        {"name": "broken.vtt", "content": BROKEN_VTT}, {"name": "empty.srt", "content": "  \n"}]})
    assert response.status_code == 422
    assert response.json() == {"detail": "nothing to ingest: 2 transcript(s) refused, none accepted", "refused": [
        "broken.vtt: line 3: malformed timestamp in '00:00:01.000 --> 00:0x:02.000'", "empty.srt: file is empty"]}

    twice = client.post("/jobs", json={"transcripts": [_transcript(DATA / "E03.txt"),
                                                       _transcript(DATA / "E03.srt", episode_id="E03")]})
    assert twice.status_code == 202
    assert twice.json()["refused"] == ["E03.srt: episode id 'E03' already given by E03.txt"]
    assert client.post("/jobs", json={"transcripts": []}).status_code == 422
    assert client.post("/jobs", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert redis.zcard(JOBS_INDEX) == 1


def test_an_ended_job_with_redis_down_is_mongodbs_copy_as_status_shows_it(
    api_settings: Settings, redis: Redis, db: Database
) -> None:
    done = ingest(api_settings, redis, db, parse_files([DATA / "E03.txt"])[0], kind="ingest").job_id
    run_worker(api_settings, burst=True, redis=redis)
    records = JobRecords(redis, db, api_settings.result_ttl)
    queued = ingest(api_settings, redis, db, parse_files([EXAMPLES / "E05.vtt"])[0], kind="ingest").job_id
    records.save(records.status(queued))
    down = api_settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with _serving(down) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        served = http.get(f"/jobs/{done}")
        running = http.get(f"/jobs/{queued}")
    shown = run_cli(down, "status", done, "--json")
    assert (served.status_code, shown.returncode) == (200, 0), served.text
    assert served.json() == json.loads(shown.stdout) and served.json()["chunks"]["embedded"] == 4
    note = f": live counters unavailable; job {done} as MongoDB `jobs` kept it when it ended"
    assert served.headers["x-podembed-note"].endswith(note) and shown.stderr.strip().endswith(note)
    assert running.status_code == 503
    assert f"job {queued} was queued when last saved, and its live counters are in Redis" in running.json()["detail"]


def test_unknown_job_id_is_404(client: httpx.Client) -> None:
    for job_id, detail in (("0123456789ab", "no job with id '0123456789ab'"),
                           ("nosuchjob", "no job with id 'nosuchjob': a job id is 12 hex digits")):
        for method, path in (("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/retry"),
                             ("POST", f"/jobs/{job_id}/cancel")):
            response = client.request(method, path)
            assert (response.status_code, response.json()) == (404, {"detail": detail})


def test_request_body_size_is_limited(client: httpx.Client, api_settings: Settings, redis: Redis) -> None:
    big = {"transcripts": [{"name": "big.txt", "content": "word " * api_settings.max_request_bytes}]}
    assert client.post("/jobs", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"transcripts": [{"name": "big.txt", "content": "'
        for _ in range(api_settings.max_request_bytes // 4096 + 1):
            yield b"word " * 820
        yield b'"}]}'

    streamed = client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert redis.zcard(JOBS_INDEX) == 0


def _serve(settings: Settings, port: int, *args: str, token: str | None = None, output: object = subprocess.PIPE,
           **extra: str) -> subprocess.Popen:
    """`podembed serve` in its own process; its output to pipes (read them, or give a file as `output`)."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db, **extra}
    if token:
        env["PODEMBED_API_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                            env=env, stdout=output, stderr=output, text=True)


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "podembed serve did not answer"
            time.sleep(0.1)


def test_serve_needs_a_token_or_loopback(settings: Settings, redis: Redis, db: Database) -> None:
    refused = _serve(settings, free_port())
    assert refused.wait(timeout=30) == 1
    assert "PODEMBED_API_TOKEN is not set" in refused.communicate()[1]
    wide = _serve(settings, free_port(), "--insecure-loopback", "--host", "0.0.0.0")
    assert wide.wait(timeout=30) == 1
    assert "--insecure-loopback serves on a loopback address only, not on 0.0.0.0" in wide.communicate()[1]

    for token in (TOKEN, None):
        port = free_port()
        process = _serve(settings, port, *([] if token else ["--insecure-loopback"]), token=token)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process)
            assert httpx.get(url + "/jobs").status_code == (401 if token else 200)
            assert httpx.get(url + "/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).json() == []
        finally:
            os.kill(process.pid, signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert process.returncode == -signal.SIGTERM
        assert "Finished server process" in stderr


def test_docs_need_no_token_and_a_413_is_json(base_url: str, api_settings: Settings, redis: Redis) -> None:
    # The API's description holds no data, and a browser opening /docs sends no token: README says so.
    assert httpx.get(base_url + "/docs").status_code == 200
    assert httpx.get(base_url + "/openapi.json").json()["info"]["title"] == "podembed"
    assert "Every route but `/healthz`, `/docs` and `/openapi.json` needs" in (ROOT / "README.md").read_text()
    limit = api_settings.max_request_bytes
    big = {"transcripts": [{"name": "big.txt", "content": "word " * limit}]}
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        response = httpx.post(base_url + "/jobs", json=big, headers=headers)
        assert response.status_code == 413 and response.headers["content-type"] == "application/json"
        assert response.json() == {"detail": f"request body over {limit} bytes (PODEMBED_MAX_REQUEST_BYTES)"}
    assert redis.zcard(JOBS_INDEX) == 0
