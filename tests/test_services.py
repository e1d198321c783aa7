"""The local services: Redis takes the URL's password, nothing listens beyond loopback, data is private."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError

from config.errors import ServiceError
from config.services import free_port, local_services, on_spare_ports, services_down, services_up
from config.settings import Settings
from producer.connections import redis_client
from tests.conftest import EXAMPLES
from tests.soak.harness import run_cli, worker_env

SECRET = "redis pass/with@odd:chars"


@pytest.fixture
def password_services(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Services started from a Redis URL with a user and password (percent-quoted as clients need)."""
    base = on_spare_ports(Settings(), tmp_path / "data")
    port = base.redis_url.rsplit(":", 1)[1].split("/")[0]
    user = request.param
    settings = base.replace(redis_url=f"redis://{user}:redis%20pass%2Fwith%40odd%3Achars@127.0.0.1:{port}/0")
    services_up(settings)
    yield settings
    services_down(settings)


def _files(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


@pytest.mark.parametrize("password_services", ["", "podembed"], indirect=True)
def test_redis_started_with_the_urls_password_refuses_anyone_without_it(password_services: Settings) -> None:
    settings = password_services
    redis = local_services(settings)[0]
    with Redis(host=redis.host, port=redis.port) as anonymous, pytest.raises((AuthenticationError, ResponseError)):
        anonymous.ping()
    with redis_client(settings) as client:
        assert client.ping()
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    # The password is in a private config file, not on a command line anyone can read in `ps`.
    cmdline = Path(f"/proc/{int(redis.pid_file.read_text())}/cmdline").read_bytes()
    assert b"odd:chars" not in cmdline and b"odd%3Achars" not in cmdline


def test_data_folder_and_its_files_are_private(service_settings: Settings, redis: Redis) -> None:
    redis.set("written", "1")
    redis.bgrewriteaof()
    # The rewrite's temporary files come and go while it runs: list the folder once it is done.
    while any(redis.info("persistence")[k] for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")):
        time.sleep(0.05)
    paths = _files(service_settings.data_dir.resolve())
    assert len(paths) > 5
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))
        if path.is_file():
            assert mode == 0o600, (path, oct(mode))
    # Without a password in the URL, Redis keeps protected mode on and listens on loopback only.
    assert redis.config_get("protected-mode") == {"protected-mode": "yes"}
    assert redis.config_get("bind")["bind"] == "127.0.0.1"


def test_services_are_never_started_on_a_non_loopback_address(tmp_path: Path) -> None:
    for settings in (Settings(redis_url=f"redis://0.0.0.0:{free_port()}/0", mongo_uri="mongodb://127.0.0.1:1",
                              data_dir=tmp_path),
                     Settings(redis_url="redis://127.0.0.1:1/0", mongo_uri=f"mongodb://0.0.0.0:{free_port()}",
                              data_dir=tmp_path)):
        service = local_services(settings)[0 if "0.0.0.0" in settings.redis_url else 1]
        with pytest.raises(ServiceError, match="loopback address only, not on 0.0.0.0"):
            service.start(["true"])


def test_mongo_credentials_against_nx_27017_fail_in_one_line_before_anything_is_queued(
    settings: Settings, redis: Redis
) -> None:
    port = settings.mongo_uri.rsplit(":", 1)[1]
    env = worker_env(settings.redis_url, f"mongodb://admin:M0ngoPW@127.0.0.1:{port}/", settings.mongo_db)
    done = run_cli(env, "ingest", str(EXAMPLES / "E05.vtt"), "--json")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "does not take credentials (nx-27017 has no authentication)" in done.stderr
    assert "M0ngoPW" not in done.stderr
    assert redis.keys("rq:*") == [] and redis.keys("podembed:*") == []
