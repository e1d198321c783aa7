"""Oversized-input drill (part of `make soak`, or alone): peak memory of real processes on hostile sizes.

- `ingest` of a 20 MB file of one line of real words, of a 20 MB run of one letter, and of a
  WebVTT file of 1,000,000 cues: peak RSS of the process (VmHWM), seconds, chunks.
- `podembed serve`: one 8 MB single-line POST, then three at once: VmHWM of the server.

Run alone: `python tests/soak/oversize.py` (starts its own services; one JSON document).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from config.services import free_port  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database  # noqa: E402
from producer.parsing import parse_file  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402
from tests.soak.harness import run_alone, worker_env  # noqa: E402
from tests.test_api_limits import _peak_mb, _single_line_body  # noqa: E402

MB = 1024 * 1024
TOKEN = "oversize-drill-token"


# `podembed` that prints its own peak RSS last on stderr. (wait4's ru_maxrss is no use here: a
# child started by vfork+exec keeps the high-water mark of the parent it was started from.)
_PEAK_REPORTING = ("import runpy, sys\n"
                   "try:\n    runpy.run_module('worker.cli', run_name='__main__', alter_sys=True)\n"
                   "finally:\n    print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0],"
                   " file=sys.stderr)\n")


def _ingest_peak(settings: Settings, path: Path) -> dict:
    """`podembed ingest PATH --json` in its own process: exit code, seconds, chunks, peak RSS."""
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_REPORTING, "ingest", str(path), "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    job = json.loads(done.stdout) if done.stdout.strip() else {}
    peak_kb = int(done.stderr.splitlines()[-1].split()[1])
    return {"file_mb": round(path.stat().st_size / MB, 1), "rc": done.returncode,
            "seconds": round(time.perf_counter() - began, 1), "chunks": job.get("chunks"),
            "peak_rss_mb": round(peak_kb / 1024, 1)}


def _files(folder: Path) -> dict[str, Path]:
    words = " ".join(s.text for path in sorted(EXAMPLES.glob("E0*.vtt")) for s in parse_file(path).segments)
    line = folder / "one-line.txt"
    line.write_text(((words + " ") * (20 * MB // len(words) + 1))[: 20 * MB])
    run = folder / "run.txt"
    run.write_text("a" * 20 * MB)
    cues = folder / "cues.vtt"
    with cues.open("w") as out:
        out.write("WEBVTT\n\n")
        for i in range(1_000_000):
            out.write(f"{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000 --> "
                      f"{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.900\n[Speaker {i % 3}]: cue number {i}\n\n")
    return {"one_line_20mb": line, "run_20mb": run, "cues_1m": cues}


def _serve_peaks(settings: Settings) -> dict:
    body = _single_line_body(8 * MB - 1024)
    port = free_port()
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, api_token=TOKEN)
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/healthz")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        idle = _peak_mb(process.pid)
        began = time.perf_counter()
        one = httpx.post(url + "/jobs", content=body, headers=headers, timeout=600).status_code
        one_s = time.perf_counter() - began
        after_one = _peak_mb(process.pid)
        with ThreadPoolExecutor(3) as pool:
            three = sorted(pool.map(lambda _: httpx.post(url + "/jobs", content=body, headers=headers,
                                                         timeout=600).status_code, range(3)))
        after_three = _peak_mb(process.pid)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    return {"body_mb": round(len(body) / MB, 2), "idle_peak_mb": round(idle, 1), "one_post": one,
            "one_post_seconds": round(one_s, 1), "peak_mb_after_one": round(after_one, 1),
            "three_at_once": three, "peak_mb_after_three": round(after_three, 1)}


def drill_oversize(settings: Settings, folder: Path) -> dict:
    """Every oversized input through real processes, on the services of `settings`."""
    settings = settings.replace(mongo_db="soak_oversize")
    folder.mkdir(parents=True, exist_ok=True)
    report = {name: _ingest_peak(settings, path) for name, path in _files(folder).items()}
    report["serve_8mb_posts"] = _serve_peaks(settings)
    mongo_database(settings).client.drop_database(settings.mongo_db)
    return report


if __name__ == "__main__":
    run_alone("python tests/soak/oversize.py", drill_oversize)
