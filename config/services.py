"""The local embedded services: a real `redis-server` and `nx-27017` (MongoDB wire protocol).

`up` starts each one only if nothing answers at the configured URL and the URL is
on this machine; `down` stops only what `up` started (it keeps pid files in the
data folder). Redis takes the URL's password when it has one; nx-27017 has no
authentication at all, so both listen on loopback addresses only. The data folder
holds transcripts: it is readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from config.errors import ServiceError
from config.settings import Settings, bad_url

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ServiceState:
    name: str
    address: str
    answering: bool
    # The process `services up` started and still runs; None: not started by podembed.
    pid: int | None

    def line(self) -> str:
        where = f"{self.name:<6} {self.address:<22}"
        if not self.answering:  # who started a service matters only while it runs
            return f"{where} down" + (f" (pid {self.pid} started by podembed, not answering)" if self.pid else "")
        started = f"started by podembed, pid {self.pid}" if self.pid is not None else "not started by podembed"
        return f"{where} up ({started})"


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    data_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    def answering(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def state(self) -> ServiceState:
        return ServiceState(self.name, f"{self.host}:{self.port}", self.answering(), self._pid())

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def start(self, command: list[str]) -> None:
        # Neither service may listen beyond this machine: nx-27017 has no authentication at all.
        if self.host not in LOOPBACK:
            raise ServiceError(f"{self.name}: nothing answers at {self.host}:{self.port}, and podembed starts "
                               f"local services on a loopback address only, not on {self.host}")
        private_dir(self.data_dir)
        log = private_file(self.data_dir / f"{self.name}.log").open("ab")
        # umask: what the services write (Redis' append-only file, nx-27017's SQLite) is the owner's only.
        process = subprocess.Popen(command, cwd=self.data_dir, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        private_file(self.pid_file).write_text(str(process.pid))
        deadline = time.monotonic() + 60
        while not self.answering():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not start on {self.host}:{self.port}; "
                                   f"see {self.data_dir / (self.name + '.log')}")
            time.sleep(0.1)

    def stop(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        # A child of ours that exited stays a zombie until reaped.
        try:
            return os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return True


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_spare_ports(settings: Settings, data_dir: Path) -> Settings:
    """`settings` pointed at a private Redis and nx-27017 on spare ports (tests, benchmarks, soak)."""
    return settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                            mongo_uri=f"mongodb://127.0.0.1:{free_port()}", data_dir=data_dir)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (it holds transcripts and vectors)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """`path`, created if missing, readable and writable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    return path


@contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A new file beside `path` that replaces it when the block ends without an error (else it goes).

    Its name is random and it is opened with O_EXCL | O_NOFOLLOW, mode 0600: a link planted beside
    `path` is never followed, and writers at once never share a file.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def local_services(settings: Settings) -> tuple[Service, Service]:
    data_dir = settings.data_dir.resolve()
    return (
        Service("redis", *_address(settings.redis_url, 6379, "PODEMBED_REDIS_URL"), data_dir),
        Service("mongo", *_address(settings.mongo_uri.split(",")[0], 27017, "PODEMBED_MONGO_URI"), data_dir),
    )


def _address(url: str, default_port: int, variable: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        return parts.hostname or "127.0.0.1", parts.port or default_port
    except ValueError as exc:
        raise bad_url(variable, url, exc) from None


def services_up(settings: Settings) -> list[ServiceState]:
    """Start Redis (append-only) and nx-27017 where nothing answers at the configured URLs."""
    redis, mongo = local_services(settings)
    if not redis.answering():
        redis.start([
            _binary("redis-server", "apt-get install redis-server"), str(_redis_config(settings, redis.data_dir)),
            "--bind", redis.host, "--port", str(redis.port), "--dir", str(redis.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
        ])
    if not mongo.answering():
        mongo.start([
            _binary("nx-27017", "pip install nx-27017"),
            "--host", mongo.host, "--port", str(mongo.port), "--data-dir", str(mongo.data_dir / "mongo"),
            "--pid-file", str(mongo.data_dir / "nx-27017.pid"), "--log-file", str(mongo.data_dir / "nx-27017.log"),
        ])
    return [redis.state(), mongo.state()]


def services_down(settings: Settings) -> list[ServiceState]:
    """Stop the services `services_up` started; others are left alone."""
    states = []
    for service in local_services(settings):
        service.stop()
        states.append(service.state())
    return states


def services_status(settings: Settings) -> list[ServiceState]:
    return [service.state() for service in local_services(settings)]


def _redis_config(settings: Settings, data_dir: Path) -> Path:
    """A config file (mode 600) giving Redis the URL's user and password, so it never shows in `ps`.

    Without a password in the URL the file is empty: protected mode and the loopback bind keep
    others out.
    """
    from redis.connection import parse_url

    try:
        url = parse_url(settings.redis_url)
    except ValueError as exc:
        raise bad_url("PODEMBED_REDIS_URL", settings.redis_url, exc) from None
    lines = []
    if url.get("password"):
        user = url.get("username") or "default"
        # ACL with the password's SHA-256: no quoting of arbitrary characters in the config syntax.
        lines.append(f"user {_config_string(user)} on #{sha256(url['password'].encode()).hexdigest()} ~* &* +@all")
        if user != "default":
            lines.append("user default off")
    config = private_file(private_dir(data_dir) / "redis.conf")
    config.write_text("".join(f"{line}\n" for line in lines))
    return config


def _config_string(text: str) -> str:
    """`text` as one argument of Redis' config syntax, whatever characters it holds."""
    return '"' + "".join(f"\\x{b:02x}" for b in text.encode()) + '"'


def _binary(name: str, hint: str) -> str:
    # Prefer the one installed beside this interpreter (the project's virtualenv).
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name} is not installed ({hint})")
    return found
