"""Hostile-input drill (part of `make soak`, or alone): adversarial shapes and requests, timed.

- The parser on every adversarial shape of `tests/test_fuzz.py` (runs of `<v.`, `<a`, `[`, newlines,
  digits, dots and spaces, nested and unclosed tags): seconds at about 1 MB, and the time ratio of
  a doubling (linear: 2).
- `redact_url`, which every error message goes through, on the same kind of runs.
- A real `podembed serve`: the 110-byte `POST /jobs` of `<v` and 40 dots with `/healthz` polled
  meanwhile; a trickled body without a token beside an authenticated 1.2 MB request; a trickled
  body with the token (answered 408 after `PODEMBED_BODY_SECONDS`); a foreign `Host`; job ids that
  name other keys; then schemathesis over the API's own OpenAPI document with the token: status
  codes per operation and the slowest answer.

Run alone: `python tests/soak/hostile.py` (starts its own services; one JSON document).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import schemathesis  # noqa: E402

from config.services import free_port  # noqa: E402
from config.settings import Settings, redact_url  # noqa: E402
from producer.connections import mongo_database  # noqa: E402
from tests.soak.harness import run_alone  # noqa: E402
from tests.test_api import _serve, _wait_healthy  # noqa: E402
from tests.test_api_limits import _answer, _single_line_body, _trickle  # noqa: E402
from tests.test_api_schema import check_operations  # noqa: E402
from tests.test_fuzz import SHAPES, _best_seconds, _doubling_ratio, _parse_or_refuse  # noqa: E402

TOKEN = "hostile-drill-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Bytes of each shape timed whole, and schemathesis examples per operation.
SHAPE_BYTES = 1024 * 1024
SCHEMA_EXAMPLES = 100
# Seconds a trickled body may take before it is dropped, in this drill.
BODY_SECONDS = 3


def shape_timings() -> dict:
    """Per shape: seconds to parse (or refuse) about 1 MB of it, and the doubling ratio."""
    report = {}
    for shape, (name, make) in SHAPES.items():
        unit = len(make(1000)) / 1000
        data = make(int(SHAPE_BYTES / unit))
        size, ratio = _doubling_ratio(lambda n, name=name, make=make: _parse_or_refuse(name, make(n)))
        report[shape] = {"bytes": len(data), "seconds": round(_best_seconds(_parse_or_refuse(name, data), 3), 4),
                         "doubling_ratio": round(ratio, 2), "ratio_measured_at": size}
    for text in ("a", "a://", "a://b:c"):
        line = text * (SHAPE_BYTES // len(text))
        size, ratio = _doubling_ratio(lambda n, text=text: lambda: redact_url(text * n))
        seconds = _best_seconds(partial(redact_url, line), 3)
        report[f"redact {text}"] = {"bytes": len(line), "seconds": round(seconds, 4),
                                    "doubling_ratio": round(ratio, 2), "ratio_measured_at": size}
    return report


def _timed(call: object) -> tuple[object, float]:
    began = time.perf_counter()
    result = call()
    return result, round(time.perf_counter() - began, 3)


def served_requests(settings: Settings, log: Path) -> dict:
    port = free_port()
    # The server's log to a file: thousands of requests would fill a pipe nobody reads, and stall it.
    with log.open("w") as output:
        process = _serve(settings, port, token=TOKEN, output=output, PODEMBED_BODY_SECONDS=str(BODY_SECONDS))
    url = f"http://127.0.0.1:{port}"
    report: dict = {}
    try:
        _wait_healthy(url, process)
        # The 110-byte body that once held the interpreter for seconds, /healthz polled meanwhile.
        voice = json.dumps({"transcripts": [{"name": "v.txt", "content": "<v" + "." * 40}]})
        polls: list[float] = []
        posted: dict = {}

        def post() -> None:
            posted["answer"], posted["seconds"] = _timed(lambda: httpx.post(url + "/jobs", content=voice, timeout=600,
                                                                            headers=AUTH).status_code)

        poster = threading.Thread(target=post)
        poster.start()
        while poster.is_alive():
            polls.append(_timed(lambda: httpx.get(url + "/healthz", timeout=600))[1])
        report["voice_post"] = {"body_bytes": len(voice), "status": posted["answer"], "seconds": posted["seconds"],
                                "healthz_slowest_seconds": max(polls, default=None)}

        anonymous, stop = _trickle(port)
        body = _single_line_body(1_200_000)
        served, seconds = _timed(lambda: httpx.post(url + "/jobs", content=body, timeout=600,
                                                    headers={**AUTH, "Content-Type": "application/json"}).status_code)
        report["trickle_without_token"] = {"trickle": _answer(anonymous).decode(), "authenticated_1_2mb": served,
                                           "authenticated_seconds": seconds}
        stop.set()
        anonymous.close()
        slow, stop = _trickle(port, f"Authorization: Bearer {TOKEN}")
        answer, seconds = _timed(lambda: _answer(slow).decode())
        report["trickle_with_token"] = {"answer": answer, "seconds": seconds, "body_seconds": BODY_SECONDS}
        stop.set()
        slow.close()
        report["foreign_host"] = httpx.get(url + "/healthz", headers={"Host": "rebind.attacker.example"}).status_code
        job_id = httpx.get(url + "/jobs", headers=AUTH).json()[0]["job_id"]
        report["job_id_naming_other_keys"] = {
            suffix: httpx.get(f"{url}/jobs/{job_id}{suffix}", headers=AUTH).status_code for suffix in (":done",
                                                                                                     ":failed")}
        report["schemathesis"] = _schemathesis(url)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    return report


def _schemathesis(url: str) -> dict:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    times: list[float] = []

    def call(case: schemathesis.Case) -> object:
        response, seconds = _timed(lambda: case.call(base_url=url, headers=AUTH, timeout=600))
        times.append(seconds)
        return response

    # The first search loads the model (a cold start, not an answer's time): before the clock runs.
    _, warm_up = _timed(lambda: httpx.get(url + "/search", params={"q": "warm up"}, headers=AUTH, timeout=600))
    # A server error fails the drill at once, naming the request.
    codes = check_operations(schema, SCHEMA_EXAMPLES, call)
    return {"requests": len(times), "server_errors": 0, "slowest_seconds": max(times),
            "search_warm_up_seconds": warm_up, "answers": codes}


def drill_hostile(settings: Settings, folder: Path) -> dict:
    """The hostile shapes through the parser, then the hostile requests through a real `serve` (its log in `folder`)."""
    settings = settings.replace(mongo_db="soak_hostile")
    folder.mkdir(parents=True, exist_ok=True)
    report = {"parse": shape_timings(), "serve": served_requests(settings, folder / "serve.log")}
    mongo_database(settings).client.drop_database(settings.mongo_db)
    return report


if __name__ == "__main__":
    run_alone("python tests/soak/hostile.py", drill_hostile)
