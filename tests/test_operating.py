"""/metrics against `podembed status` and `podembed costs`, and the webhook of a job's end with a real receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.worker import WorkerStatus

from config.settings import Settings
from modal_jobs.drain import WorkerRecord, save_worker
from producer import notify
from producer.jobs import JobRecords
from producer.web.api import create_app
from tests.conftest import DATA, EXAMPLES, run_cli
from worker.loop import make_worker, run_worker

SECRET = "webhook-test-secret"
TOKEN = "metrics-test-token"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: answers 500 to the first `fail_first` POSTs, then 204."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        code = 500 if len(self.server.posts) < self.server.fail_first else 204
        self.server.posts.append((dict(self.headers), body, code))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def ingest(settings: Settings, *args: str, **env: str) -> str:
    out = run_cli(settings, "ingest", *args, "--json", **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["job_id"]


def status(settings: Settings, job_id: str) -> dict:
    return json.loads(run_cli(settings, "status", job_id, "--json").stdout)


def test_one_signed_post_per_ended_job_after_a_retry(settings: Settings, redis: Redis, db, receiver: Receiver) -> None:  # noqa: ANN001
    env = {"PODEMBED_NOTIFY_SECRET": SECRET, "PODEMBED_NOTIFY_ALLOW_PRIVATE": "1"}
    ended = ingest(settings, str(EXAMPLES), "--podcast", "The Seen and the Unseen", "--notify", receiver.url, **env)
    assert status(settings, ended)["notify"] == {"url": receiver.url, "state": "waiting", "attempts": 0,
                                                 "error": None}
    worker_settings = settings.replace(notify_secret=SECRET, notify_allow_private=True, notify_retry_intervals=(1,))
    run_worker(worker_settings, burst=True, redis=redis)  # its drain waits for the delivery at its end
    running = ingest(settings, str(DATA / "E03.srt"), "--podcast", "Later", "--notify", receiver.url, **env)

    # The receiver answered 500 once: the same signed body came again, once, and was taken.
    assert [code for *_, code in receiver.posts] == [500, 204]
    done = status(settings, ended)
    for headers, body, _ in receiver.posts:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Podembed-Signature"], expected)
        sent = json.loads(body)
        assert (sent["job_id"], sent["state"], sent["chunks"]) == (ended, "finished", done["chunks"])
    assert done["notify"]["state"] == "sent" and done["notify"]["attempts"] == 2
    assert done["notify"]["error"] is None
    # Nothing for the job still queued; its cancel ends it, and the CLI delivers before it exits.
    assert status(settings, running)["notify"]["state"] == "waiting"
    assert run_cli(settings, "cancel", running, **env).returncode == 0
    assert len(receiver.posts) == 3
    assert json.loads(receiver.posts[2][1])["state"] == "cancelled"
    assert status(settings, running)["notify"]["state"] == "sent"
    # Once per ended job: a second cancel, or another worker finding the job ended, sends nothing.
    assert run_cli(settings, "cancel", running, **env).returncode == 0
    assert len(receiver.posts) == 3


def test_a_failed_delivery_shows_in_status(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    server = Receiver(fail_first=99)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"PODEMBED_NOTIFY_SECRET": SECRET, "PODEMBED_NOTIFY_ALLOW_PRIVATE": "1",
           "PODEMBED_NOTIFY_RETRY_INTERVALS": "0"}
    job = ingest(settings, str(DATA / "E03.srt"), "--notify", server.url, **env)
    assert run_cli(settings, "cancel", job, **env).returncode == 0
    server.shutdown()
    server.server_close()
    notify = status(settings, job)["notify"]
    assert (notify["state"], notify["attempts"], notify["error"]) == ("failed", 2, "HTTP 500 Internal Server Error")
    assert "notify    failed (2 attempts) to " in run_cli(settings, "status", job).stdout


@pytest.mark.parametrize(("url", "env", "why"), [
    ("http://127.0.0.1:9/hook", {"PODEMBED_NOTIFY_SECRET": SECRET}, "resolves to 127.0.0.1, not a public address"),
    ("ftp://example.com/hook", {"PODEMBED_NOTIFY_SECRET": SECRET}, "only http:// and https:// URLs"),
    ("https://example.com/hook", {}, "PODEMBED_NOTIFY_SECRET is not set"),
])
def test_a_notify_url_is_refused_before_anything_is_queued(
    settings: Settings, redis: Redis, db, url: str, env: dict[str, str], why: str  # noqa: ANN001
) -> None:
    out = run_cli(settings, "ingest", str(DATA / "E03.srt"), "--notify", url, **env)
    assert out.returncode == 1
    assert why in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert redis.keys("rq:queue:*") == [] and db.jobs.count_documents({}) == 0


def scrape(client: TestClient, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_match_status_and_costs(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    done = ingest(settings, str(EXAMPLES), "--podcast", "The Seen and the Unseen")
    run_worker(settings, burst=True, redis=redis)
    waiting = ingest(settings, str(DATA / "E03.srt"), "--podcast", "Later")
    client = TestClient(create_app(settings.replace(api_token=TOKEN)))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    m = scrape(client)

    finished, queued = status(settings, done), status(settings, waiting)
    cost = json.loads(run_cli(settings, "costs", done, "--json").stdout)
    model, device = finished["model"], finished["device"]
    assert m[("podembed_jobs", (("state", "finished"),))] == 1
    assert m[("podembed_jobs", (("state", "queued"),))] == 1
    assert m[("podembed_chunks_embedded_total", (("model", model),))] == finished["chunks"]["embedded"]
    assert m[("podembed_batches_total", (("device", device), ("model", model)))] == finished["batches"]["finished"]
    assert m[("podembed_gpu_seconds_total", (("device", device), ("model", model)))] == pytest.approx(
        cost["busy_seconds"])
    assert m[("podembed_cost_usd_total", (("device", device), ("model", model)))] == pytest.approx(cost["busy_usd"])
    assert m[("podembed_cost_usd_total", (("device", device), ("model", model)))] == pytest.approx(
        finished["cost_usd"])
    assert m[("podembed_tokens_total", (("model", model),))] > finished["chunks"]["embedded"]
    assert m[("podembed_queue_batches", (("queue", "podembed"), ("state", "queued")))] == queued["batches"]["queued"]
    assert m[("podembed_queue_batches", (("queue", "podembed-nightly"), ("state", "queued")))] == 0
    assert m[("podembed_queue_oldest_age_seconds", (("queue", "podembed"),))] >= 0
    assert m[("podembed_batch_compute_seconds_count", ())] == finished["batches"]["finished"]
    assert m[("podembed_batch_compute_seconds_sum", ())] == pytest.approx(cost["busy_seconds"])
    assert m[("podembed_workers_lost", ())] == 0

    public = TestClient(create_app(settings.replace(api_token=TOKEN, metrics_public=True)))
    assert scrape(public, token=None)[("podembed_jobs", (("state", "finished"),))] == 1


def test_a_process_without_the_secret_sends_nothing_and_says_so(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    server = Receiver(fail_first=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"PODEMBED_NOTIFY_SECRET": SECRET, "PODEMBED_NOTIFY_ALLOW_PRIVATE": "1"}
    job = ingest(settings, str(DATA / "E03.srt"), "--notify", server.url, **env)
    assert run_cli(settings, "cancel", job).returncode == 0  # this process has no secret
    server.shutdown()
    server.server_close()
    assert server.posts == []
    notify = status(settings, job)["notify"]
    assert (notify["state"], notify["attempts"]) == ("failed", 0)
    assert notify["error"].startswith("PODEMBED_NOTIFY_SECRET is not set on the process that ended the job")


def test_post_jobs_takes_a_notify_url_and_refuses_a_private_one(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    body = {"transcripts": [{"name": "E03.srt", "content": (DATA / "E03.srt").read_text()}],
            "notify": "http://127.0.0.1:9/hook"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    strict = TestClient(create_app(settings.replace(api_token=TOKEN, notify_secret=SECRET)))
    refused = strict.post("/jobs", json=body, headers=headers)
    assert refused.status_code == 422
    assert "resolves to 127.0.0.1, not a public address" in refused.json()["detail"]
    assert db.jobs.count_documents({}) == 0

    lenient = TestClient(create_app(settings.replace(api_token=TOKEN, notify_secret=SECRET,
                                                     notify_allow_private=True)))
    created = lenient.post("/jobs", json=body, headers=headers)
    assert created.status_code == 202, created.text
    job = lenient.get(f"/jobs/{created.json()['job_id']}", headers=headers).json()
    assert job["notify"] == {"url": "http://127.0.0.1:9/hook", "state": "waiting", "attempts": 0, "error": None}


def test_workers_racing_to_deliver_one_end_send_it_once(settings: Settings, redis: Redis, db,  # noqa: ANN001
                                                        receiver: Receiver) -> None:
    receiver.fail_first = 0
    env = {"PODEMBED_NOTIFY_SECRET": SECRET, "PODEMBED_NOTIFY_ALLOW_PRIVATE": "1"}
    job = ingest(settings, str(DATA / "E03.srt"), "--notify", receiver.url, **env)
    records = JobRecords(redis, db, settings.result_ttl)
    records.mark_cancelled(job)  # ended, and nobody has sent it yet
    sender = settings.replace(notify_secret=SECRET, notify_allow_private=True)
    with ThreadPoolExecutor(4) as pool:
        claimed = list(pool.map(lambda _: notify.deliver(sender, records, job), range(4)))
    assert sorted(claimed) == [False, False, False, True]
    assert len(receiver.posts) == 1 and json.loads(receiver.posts[0][1])["state"] == "cancelled"


def _container(name: str, updated_at: datetime, *, exited: bool = False) -> WorkerRecord:
    return WorkerRecord(worker=name, gpu="A10G", device="NVIDIA A10G", model="m", model_revision=None,
                        price_per_hour=1.1, billed_price_per_hour=1.2, snapshot="cpu", torch_cuda=None,
                        cuda_driver=None, weight_dtype="bfloat16",
                        weight_bytes=1, started_at=updated_at - timedelta(seconds=600), ready_at=updated_at,
                        cold_start_seconds=5.0, from_snapshot=True, load_seconds=0.0, to_device_seconds=1.0,
                        busy_seconds=120.0, billed_seconds=600.0, updated_at=updated_at,
                        exited_at=updated_at if exited else None)


def test_workers_and_lost_containers_in_metrics_and_fleet(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    worker, _ = make_worker(settings, redis)
    worker.register_birth()  # a local `podembed work`: registered with rq, no container record
    worker.set_state(WorkerStatus.IDLE)
    now = datetime.now(UTC)
    save_worker(db, _container("ta-live", now))
    save_worker(db, _container("ta-killed", now - timedelta(hours=1)))  # stopped beating, no exit
    save_worker(db, _container("ta-done", now - timedelta(hours=2), exited=True))
    client = TestClient(create_app(settings.replace(api_token=TOKEN)))
    m = scrape(client)
    assert m[("podembed_workers", (("device", "NVIDIA A10G"),))] == 1
    assert m[("podembed_workers", (("device", "unknown"),))] == 1
    assert m[("podembed_worker_busy_seconds", (("device", "NVIDIA A10G"),))] == 120.0
    assert m[("podembed_worker_billed_seconds", (("device", "NVIDIA A10G"),))] == 600.0
    assert m[("podembed_workers_lost", ())] == 1
    fleet = client.get("/fleet", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {(w["name"], w["device"], w["state"]) for w in fleet["workers"]} == {
        (worker.name, "unknown", "idle"), ("ta-live", "NVIDIA A10G", "between drains")}
    assert fleet["workers_lost"] == 1
    assert fleet["ended_states"] == ["cancelled", "failed", "finished", "partial"]
    worker.register_death()
