"""`podembed doctor` against the real local services, and the Redis eviction check that workers run at start.

The eviction cases set `maxmemory-policy` on the suite's real Redis with CONFIG SET (and put it back);
the CLI runs as a subprocess, as a user runs it, or in the test's process where one such run came first.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterator
from subprocess import CompletedProcess

import pytest
from packaging.requirements import Requirement
from redis import Redis

from config.errors import ConfigError
from config.settings import Settings
from config.versions import CONSTRAINTS, drift, pinned
from tests.conftest import ROOT, cli_env, run_cli
from worker.doctor import Status, eviction_check, model_checks, refuse_eviction, run_checks
from worker.loop import make_worker


@pytest.fixture
def evicting(redis: Redis) -> Iterator[Redis]:
    """The suite's Redis with an LRU policy, as several managed services default to."""
    redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield redis
    finally:
        redis.config_set("maxmemory-policy", "noeviction")


def test_doctor_reports_every_check_ok_on_the_local_services(
    settings: Settings, redis: Redis, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    done = run_cli(settings, "doctor", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert {c["status"] for c in checks.values()} <= {"ok", "n/a"}
    assert checks["redis maxmemory-policy"]["detail"] == "noeviction"
    assert checks["bson vectors"]["status"] == "ok"
    assert checks["packages"]["detail"] == "the versions of config/constraints.txt"
    # nx-27017 is not Atlas: no search index to check, and that is not a failure.
    assert checks["vector search index podembed_vectors"] == {"name": "vector search index podembed_vectors",
                                                              "status": "n/a",
                                                              "detail": "not Atlas: search runs the exact scan"}
    assert checks["model dimension"]["detail"].startswith("384-d on cpu (float32)")
    assert checks["device price"]["detail"] == "cpu: $0.047/h (PODEMBED_GPU_PRICES)"
    # On this CPU machine CUDA is not there, which only a GPU container counts as a failure.
    assert checks["cuda"]["status"] == "n/a"
    cuda = {c.name: c for c in run_checks(settings, want_gpu=True)}["cuda"]
    assert cuda.status is Status.FAIL and "torch.cuda.is_available()=False" in cuda.detail

    human = cli_in_process(cli_env(settings), "doctor")
    assert human.returncode == 0, human.stdout
    assert "ok    redis maxmemory-policy: noeviction" in human.stdout.splitlines()


def test_doctor_and_work_refuse_a_redis_that_evicts(
    settings: Settings, evicting: Redis, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    done = cli_in_process(cli_env(settings), "doctor")
    assert done.returncode == 1
    [line] = [line for line in done.stdout.splitlines() if "maxmemory-policy" in line]
    assert line.startswith("FAIL  redis maxmemory-policy: allkeys-lru at redis://127.0.0.1:")
    assert "evicts queued batches and job records; set maxmemory-policy noeviction" in line

    work = run_cli(settings, "work", "--burst")
    assert work.returncode == 1
    assert work.stderr.splitlines()[-1].startswith("podembed: Redis maxmemory-policy allkeys-lru at ")
    # In-process too: a worker (local or a Modal container) refuses before it loads the model.
    with pytest.raises(ConfigError, match="maxmemory-policy allkeys-lru .* PODEMBED_ALLOW_EVICTION=1"):
        make_worker(settings, evicting)


def test_eviction_allowed_by_setting_and_volatile_policies(settings: Settings, evicting: Redis) -> None:
    allowed = Settings.from_env({"PODEMBED_ALLOW_EVICTION": "1"}, redis_url=settings.redis_url)
    check = eviction_check(allowed, evicting)
    assert check.status is Status.WARN and "allowed by PODEMBED_ALLOW_EVICTION" in check.detail
    refuse_eviction(allowed, evicting)  # no error
    evicting.config_set("maxmemory-policy", "volatile-ttl")
    assert "heartbeats and producer keys (live work taken for dead)" in eviction_check(settings, evicting).detail


def test_doctor_names_services_that_do_not_answer(settings: Settings) -> None:
    away = settings.replace(redis_url="redis://127.0.0.1:1/0", mongo_uri="mongodb://127.0.0.1:1",
                            first_contact_seconds=0.5)
    checks = {c.name: c for c in run_checks(away)}
    assert checks["redis"].status is Status.FAIL and "Redis at redis://127.0.0.1:1/0 is not reachable" in \
        checks["redis"].detail
    assert checks["mongodb"].status is Status.FAIL
    assert "redis maxmemory-policy" not in checks


def test_a_hub_model_not_downloaded_here_is_a_warning(settings: Settings) -> None:
    # Enqueuing for Modal needs the tokenizer here, not the weights: those are in the volume (the preflight's check).
    xl = settings.replace(model="hkunlp/instructor-xl", model_path=None, model_revision="0" * 40)
    [weights, *_] = model_checks(xl)
    assert weights.status is Status.WARN
    assert weights.detail.startswith(f"hkunlp/instructor-xl at revision {'0' * 40} is not in this machine's hub cache")
    [unpinned, *_] = model_checks(xl.replace(model_revision=None))
    assert unpinned.status is Status.WARN and "Modal refuses it" in unpinned.detail


def test_one_list_of_versions() -> None:
    pins = pinned()
    assert list(pins)[:1] == ["torch"] and pins["rq"].startswith("3.0.")
    # The suite runs the pinned versions: make install installs with the file as pip constraints.
    assert drift(pins) == []
    assert drift({"rq": "2.9.0"}) == [f"rq {pins['rq']} installed, 2.9.0 pinned"]
    assert CONSTRAINTS.read_text().count("==") == len(pins)
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := config/constraints.txt" in makefile
    assert makefile.count("pip install -q -c $(CONSTRAINTS)") == 2 and "torch==" not in makefile


def test_dependency_floors_admit_only_what_the_code_uses() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    # producer/batches calls rq 3.0.0's internals (tests/test_rq_contract.py): the one version the image installs.
    assert [v for v in ("2.4.0", "3.0.0", "3.0.9", "3.1.0", "4.0.0") if v in wanted["rq"]] == ["3.0.0"]
    for extra in ("modal", "dev"):
        [modal] = [r for r in map(Requirement, project["optional-dependencies"][extra]) if r.name == "modal"]
        # `env=` on functions and `Workspace.billing`.
        assert "1.5.0" not in modal.specifier and "1.5.1" in modal.specifier
