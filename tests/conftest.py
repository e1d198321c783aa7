"""Real services for the suite: a redis-server and nx-27017 on spare loopback ports.

The session starts its own pair (so a running demo is never touched) and stops it
at the end. Each test gets a flushed Redis database and its own Mongo database,
dropped afterwards. The model is the real small one, loaded once per session.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis

from config.services import on_spare_ports, services_down, services_up
from config.settings import Settings
from producer.batches.take import PriorityTake
from producer.connections import mongo_database, redis_client
from producer.enqueue import batch_queues
from worker.cli import main
from worker.loop import make_worker
from worker.pipeline import Drain

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = on_spare_ports(Settings(), tmp_path_factory.mktemp("services"))
    services_up(settings)
    yield settings
    services_down(settings)


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    """Per-test settings: own Mongo database; retries without back-off so burst workers see them;
    the API answers TestClient's host name."""
    return service_settings.replace(mongo_db=f"test_{uuid.uuid4().hex[:10]}", retry_intervals=(0,),
                                    allowed_hosts="testserver")


@pytest.fixture
def redis(settings: Settings) -> Iterator[Redis]:
    client = redis_client(settings)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = mongo_database(settings)
    yield database
    database.client.drop_database(database.name)
    database.client.close()


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `podembed` process on the services and database of `settings`, plus `extra`."""
    return {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
            "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db,
            "PODEMBED_DATA_DIR": str(settings.data_dir), **extra}


def run_cli(settings: Settings, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`podembed ARGS` in a fresh process on the services and database of `settings`."""
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=cli_env(settings, **extra_env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Callable[..., subprocess.CompletedProcess]:
    """`podembed ARGS` without a new interpreter: `main(ARGS)` in this process, with exactly the `PODEMBED_*`
    variables of `env` (as `cli_env` or the soak harness's `worker_env` give); the session's model serves it.
    For what does not depend on the process: what does (exit by signal, the interpreter's own output, what a
    command imports) keeps a real one."""

    def run(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess:
        for name in [n for n in os.environ if n.startswith("PODEMBED_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("PODEMBED_"):
                monkeypatch.setenv(name, value)
        # `main` configures logging as in its own process: on stderr, at its level; pytest's handlers wait.
        root, pymongo, rq_worker = (logging.getLogger(name) for name in ("", "pymongo", "rq.worker"))
        kept = root.handlers[:], root.level, pymongo.level, rq_worker.filters[:]
        for handler in kept[0]:
            root.removeHandler(handler)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse refusing the arguments
            code = exit_.code
        finally:
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            for handler in kept[0]:
                root.addHandler(handler)
            root.setLevel(kept[1])
            pymongo.setLevel(kept[2])
            rq_worker.filters[:] = kept[3]
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--dashboard-png", default=None, metavar="PATH",
                     help="also save the browser test's dashboard screenshot here (README's picture)")


def taking_drain(settings: Settings, redis: Redis) -> Drain:
    """A drain whose takes a test makes itself (no lanes, no retries moved), its worker registered."""
    worker, ctx = make_worker(settings, redis)
    queues = batch_queues(settings, redis)
    d = Drain(worker=worker, ctx=ctx, queues=queues, taker=PriorityTake(redis, queues, None), deadline=None,
              burst=True, scheduler=None)  # type: ignore[arg-type]
    d.born.set()
    return d
