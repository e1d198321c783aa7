"""The dashboard and /docs in a real browser: Debian's Chromium, driven by Playwright, against `podembed serve`.

Real services, real transcripts, a real worker. Every request the page makes to anything but this
server is recorded and refused, so the pages are shown to work offline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from config.services import free_port
from config.settings import Settings
from tests.conftest import EXAMPLES, ROOT, cli_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "dashboard-test-token"


@dataclass
class Server:
    url: str
    process: subprocess.Popen


@pytest.fixture
def server(settings: Settings, redis, db) -> Iterator[Server]:  # noqa: ANN001 (fixtures)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--host", "127.0.0.1", "--port",
                                str(port)], cwd=ROOT, env=cli_env(settings, PODEMBED_API_TOKEN=TOKEN),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # up to 30 s for the interpreter and its imports
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.1)
    yield Server(url, process)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def offline_page(browser: Browser, server: Server, elsewhere: list[str]) -> Page:
    """A page that may reach only `server`: every other request is recorded in `elsewhere` and refused."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    host = urlsplit(server.url).netloc

    def guard(route: Route) -> None:
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    return page


def log_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login button")


@pytest.fixture
def podembed(settings: Settings, cli_in_process: Callable[..., CompletedProcess]) -> Callable[..., CompletedProcess]:
    """`podembed ARGS` in this process (the model loaded once), on the services and database `serve` uses."""

    def run(*args: str, **extra_env: str) -> CompletedProcess:
        return cli_in_process(cli_env(settings, **extra_env), *args)

    return run


def ingest(podembed: Callable[..., CompletedProcess], *paths: Path, podcast: str) -> str:
    out = podembed("ingest", *map(str, paths), "--podcast", podcast, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["job_id"]


def test_dashboard_shows_a_job_to_its_end_cancels_a_queued_one_and_retries_a_failed_one(
    podembed: Callable[..., CompletedProcess], server: Server, browser: Browser, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    elsewhere: list[str] = []
    page = offline_page(browser, server, elsewhere)
    page.goto(server.url + "/")
    # No token yet: the page asks for one and shows no data.
    expect(page.locator("#error")).to_have_text("this API needs its token")
    log_in(page, "not-the-token")
    expect(page.locator("#error")).to_have_text("wrong token: the API refused it")
    expect(page.locator("#data")).to_be_hidden()
    assert page.locator("#jobs tbody tr").count() == 0
    assert page.evaluate("sessionStorage.getItem('podembed-token')") is None

    log_in(page, TOKEN)
    expect(page.locator("#data")).to_be_visible()
    job = ingest(podembed, EXAMPLES, podcast="The Seen and the Unseen")
    row = page.locator(f'#jobs tr[data-job="{job}"]')
    expect(row).to_have_attribute("data-state", "queued", timeout=10_000)
    expect(page.locator("#queues tbody tr").first).to_contain_text("podembed")

    worker = podembed("work", "--burst")
    assert worker.returncode == 0, worker.stderr
    expect(row.locator(".bar")).to_have_attribute("data-percent", "100", timeout=15_000)
    expect(row).to_have_attribute("data-state", "finished")
    status = json.loads(podembed("status", job, "--json").stdout)
    expect(row.locator(".cost")).to_have_text(f"${status['cost_usd']:.6f}")
    assert status["cost_usd"] > 0
    # The chart's last point holds this batch: both lines drawn, and a non-zero peak.
    assert page.locator("#chart polyline").count() == 2
    assert len(page.locator("#chart polyline.chunks").get_attribute("points").split()) == 96
    expect(page.locator("#peaks")).not_to_contain_text("peak 0.00 chunks/s")

    # The token stays in the tab's session, not in the address.
    assert page.evaluate("sessionStorage.getItem('podembed-token')") == TOKEN
    assert TOKEN not in page.url

    queued = ingest(podembed, Path(__file__).parent / "data" / "E03.srt", podcast="Cancel Me")
    queued_row = page.locator(f'#jobs tr[data-job="{queued}"]')
    expect(queued_row).to_have_attribute("data-state", "queued", timeout=10_000)
    queued_row.locator('button[data-action="cancel"]').click()
    expect(queued_row).to_have_attribute("data-state", "cancelled", timeout=10_000)
    assert json.loads(podembed("status", queued, "--json").stdout)["state"] == "cancelled"

    # A batch the model refuses (a text over the forward-pass cap) fails for good: its error line shows,
    # and its retry button puts it back on the queue.
    failing = ingest(podembed, Path(__file__).parent / "data" / "E06.vtt", podcast="Too Long")
    refused = podembed("work", "--burst", PODEMBED_MAX_FORWARD_TOKENS="8")
    assert refused.returncode == 0, refused.stderr
    failed_row = page.locator("#failed tbody tr").filter(has_text=failing)
    expect(failed_row).to_contain_text("EmbeddingError", timeout=10_000)
    expect(page.locator(f'#jobs tr[data-job="{failing}"]')).to_have_attribute("data-state", "failed")
    failed_row.locator('button[data-action="retry"]').click()
    expect(page.locator(f'#jobs tr[data-job="{failing}"]')).to_have_attribute("data-state", "queued",
                                                                             timeout=10_000)
    assert json.loads(podembed("status", failing, "--json").stdout)["batches"]["queued"] == 1
    podembed("work", "--burst", PODEMBED_MAX_FORWARD_TOKENS="8")  # failed again: the picture shows it
    expect(failed_row).to_contain_text("EmbeddingError", timeout=10_000)

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if request.config.getoption("--dashboard-png"):
        shutil.copyfile(shot, request.config.getoption("--dashboard-png"))
    assert elsewhere == []


def test_docs_render_offline(server: Server, browser: Browser, tmp_path: Path) -> None:
    elsewhere: list[str] = []
    page = offline_page(browser, server, elsewhere)
    page.goto(server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("podembed", timeout=15_000)
    expect(page.locator(".opblock-summary-path").filter(has_text="/jobs/{job_id}").first).to_be_visible()
    page.screenshot(path=tmp_path / "docs.png")
    assert elsewhere == []
