"""API limits: memory per request (a real `podembed serve` under 8 MB single-line POSTs), instruction length."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from pymongo.database import Database
from redis import Redis

from config.services import free_port
from config.settings import Settings
from producer.jobs import JOBS_INDEX
from producer.parsing import parse_file
from producer.web.api import MAX_INSTRUCTION_CHARS, create_app
from tests.conftest import EXAMPLES
from tests.test_api import TOKEN, _serve, _wait_healthy

PEAK_LIMIT_MB = 400


def _peak_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) / 1024


def _single_line_body(size: int) -> bytes:
    """One transcript of one line of real words, `size` bytes of JSON in all."""
    words = " ".join(s.text for path in sorted(EXAMPLES.glob("E0*.vtt")) for s in parse_file(path).segments)
    line = (words + " ") * (size // len(words) + 1)
    body = b""
    while not body or len(body) > size:
        # JSON escapes and multi-byte characters make the body longer than its text: cut by the excess.
        line = line[: len(line) - max(0, len(body) - size)]
        body = json.dumps({"transcripts": [{"name": "one-line.txt", "content": line}]}).encode()
    return body


def test_serve_peak_memory_stays_bounded_under_8_mb_posts(settings: Settings, redis: Redis, db: Database) -> None:
    body = _single_line_body(8 * 1024 * 1024 - 1024)
    port = free_port()
    process = _serve(settings, port, token=TOKEN)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        _wait_healthy(url, process)
        idle = _peak_mb(process.pid)
        first = httpx.post(url + "/jobs", content=body, headers=headers, timeout=300)
        assert first.status_code == 202, first.text
        assert first.json()["chunks"] > 1000
        after_one = _peak_mb(process.pid)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: httpx.post(url + "/jobs", content=body, headers=headers, timeout=300),
                                    range(3)))
        after_three = _peak_mb(process.pid)
        codes = sorted(a.status_code for a in answers)
        # One at a time is taken; the others are told when to come back, and nothing is half-created.
        assert codes[0] == 202 and set(codes) <= {202, 503}, codes
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "5" and "PODEMBED_MAX_LARGE_REQUESTS" in answer.text
        assert redis.zcard(JOBS_INDEX) == 1 + codes.count(202)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
    print(json.dumps({"idle_mb": idle, "after_one_mb": after_one, "after_three_mb": after_three}))
    assert after_one <= PEAK_LIMIT_MB, after_one
    assert after_three <= PEAK_LIMIT_MB, after_three


def test_instruction_too_long_is_a_4xx_naming_the_limit(settings: Settings, redis: Redis, db: Database) -> None:
    client = TestClient(create_app(settings.replace(api_token=TOKEN)))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    transcript = {"name": "E05.vtt", "content": (EXAMPLES / "E05.vtt").read_text()}
    huge = client.post("/jobs", headers=headers, json={"instruction": "represent " * 200_000,
                                                       "transcripts": [transcript]})
    assert huge.status_code == 422
    assert huge.json()["detail"][0]["loc"] == ["body", "instruction"]
    assert f"at most {MAX_INSTRUCTION_CHARS} characters" in huge.json()["detail"][0]["msg"]
    # Short enough in characters, too long in tokens for the model's window.
    wordy = client.post("/jobs", headers=headers, json={"instruction": "a " * 450, "transcripts": [transcript]})
    assert wordy.status_code == 422
    assert wordy.json()["detail"] == ("instruction too long: the instruction takes 450 tokens, leaving no room in "
                                      "the model's 256-token window")
    assert redis.zcard(JOBS_INDEX) == 0
    assert client.post("/jobs", headers=headers, json={"instruction": "Represent the episode:",
                                                       "transcripts": [transcript]}).status_code == 202


def _trickle(port: int, *headers: str) -> tuple[socket.socket, threading.Event]:
    """A POST /jobs that announces a 2 MB body and sends it a few bytes at a time until stopped."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = ["POST /jobs HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
            "Content-Length: 2000000", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n" + '{"transcripts": [').encode())
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(0.2):
            try:
                sock.sendall(b" ")
            except OSError:
                return

    threading.Thread(target=send, daemon=True).start()
    return sock, stop


def _answer(sock: socket.socket) -> bytes:
    """The status line of what the server answers (waiting up to 60 s for its headers)."""
    sock.settimeout(60)
    received = b""
    while b"\r\n\r\n" not in received and (chunk := sock.recv(4096)):
        received += chunk
    return received.split(b"\r\n", 1)[0]


def test_a_trickled_body_takes_no_slot_without_a_token_and_is_dropped_with_one(
        settings: Settings, redis: Redis, db: Database) -> None:
    port = free_port()
    process = _serve(settings, port, token=TOKEN, PODEMBED_BODY_SECONDS="3")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        # No token: refused before a byte of the body is read, so it holds no large-request slot.
        anonymous, stop_anonymous = _trickle(port)
        body = _single_line_body(1_200_000)
        served = httpx.post(url + "/jobs", content=body, timeout=300,
                            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert served.status_code == 202, served.text
        assert _answer(anonymous) == b"HTTP/1.1 401 Unauthorized"
        stop_anonymous.set()
        anonymous.close()
        # With the token: the body must arrive within PODEMBED_BODY_SECONDS, else a 408 and the connection closes.
        slow, stop_slow = _trickle(port, f"Authorization: Bearer {TOKEN}")
        assert _answer(slow) == b"HTTP/1.1 408 Request Timeout"
        stop_slow.set()
        slow.close()
        assert httpx.get(url + "/healthz").status_code == 200
        assert redis.zcard(JOBS_INDEX) == 1
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
