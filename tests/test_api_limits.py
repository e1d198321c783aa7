"""API limits: memory per request (a real `podembed serve` under 8 MB single-line POSTs), instruction length."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from pymongo.database import Database
from redis import Redis

from config.services import free_port
from config.settings import Settings
from producer.api import MAX_INSTRUCTION_CHARS, create_app
from producer.jobs import JOBS_INDEX
from producer.parsing import parse_file
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
