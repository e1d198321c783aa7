"""The Modal app imports offline without credentials and declares what its settings say.

Both run the import in a fresh process with an empty HOME, no MODAL_* variables, and the
socket layer replaced by one that refuses: any connection or DNS lookup fails the import.
The declarations are recorded by wrapping Modal's own decorators and constructors, which
still receive (and validate) every argument.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import Settings
from config.versions import CONSTRAINTS, pinned
from modal_jobs.settings import PREFIX, ModalSettings, container_task_id
from tests.conftest import ROOT

DEPRECATED = {"concurrency_limit", "allow_concurrent_inputs", "keep_warm", "container_idle_timeout"}

OFFLINE = """
import json, socket, sys

def refuse(*args, **kwargs):
    raise OSError("network blocked: importing the app must not connect")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
import modal
"""

IMPORT = OFFLINE + """
import modal_jobs.app as m
json.dump({"app": m.app.name, "settings": m.MODAL.__dict__, "heavy": sorted(
    name for name in ("torch", "sentence_transformers", "pymongo", "redis") if name in sys.modules)}, sys.stdout)
"""

RECORD = OFFLINE + """
declared = []

def plain(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, modal.Cron):
        return {"cron": value.proto_message.cron.cron_string}
    if isinstance(value, modal.Period):
        return {"period_s": value.proto_message.period.seconds}
    return repr(value)

def record(owner, name, decorator):
    original = getattr(owner, name)
    def called(*args, **kwargs):
        result = original(*args, **kwargs)
        own = [a for a in args if not isinstance(a, (modal.App, modal.Image))]
        entry = {"call": name, "args": plain(own), "kwargs": plain(kwargs)}
        declared.append(entry)
        if not decorator:
            return result
        def decorate(target):
            entry["target"] = getattr(target, "__name__", None) or repr(target)
            return result(target)
        return decorate
    setattr(owner, name, called)

for owner, name in [(modal.App, "cls"), (modal.App, "function"), (modal, "enter"), (modal, "method"),
                    (modal, "exit"), (modal, "asgi_app"), (modal, "concurrent")]:
    record(owner, name, True)
for owner, name in [(modal.Volume, "from_name"), (modal.Secret, "from_name"), (modal.Image, "debian_slim"),
                    (modal.Image, "pip_install"), (modal.Image, "env"), (modal.Image, "add_local_python_source"),
                    (modal.Image, "add_local_file")]:
    record(owner, name, False)

import modal_jobs.app as m
json.dump({"declared": declared, "settings": m.MODAL.__dict__}, sys.stdout)
"""

OVERRIDES = {
    "PODEMBED_MODAL_GPU": "L4",
    "PODEMBED_MODAL_MAX_CONTAINERS": "4",
    "PODEMBED_MODAL_SCALEDOWN_WINDOW": "30",
    "PODEMBED_MODAL_NIGHTLY_CRON": "15 2 * * *",
    "PODEMBED_MODAL_SECRET_NAME": "podembed-staging",
    "PODEMBED_MODAL_LAUNCHER_PERIOD_S": "120",
    # The deploying shell's model: the deployment serves it.
    "PODEMBED_MODEL": "hkunlp/instructor-xl",
    "PODEMBED_MODEL_REVISION": "ce48b213095e647a6c3536364b9fa00daf57f436",
}


def _run(code: str, home: Path, extra: dict[str, str] | None = None) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT), **(extra or {})}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_app_imports_offline_without_credentials(tmp_path: Path) -> None:
    result = _run(IMPORT, tmp_path)
    assert result["app"] == "podembed"
    assert ModalSettings(**result["settings"]) == ModalSettings.from_env({})
    # Deploying needs neither the model stack nor a database client.
    assert result["heavy"] == []
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(RECORD, tmp_path_factory.mktemp("home"), OVERRIDES)


def _declared(recorded: dict, call: str, target: str | None = None) -> list[dict]:
    return [d for d in recorded["declared"] if d["call"] == call and (target is None or d.get("target") == target)]


def test_declared_gpu_class_matches_settings(recorded: dict) -> None:
    expected = ModalSettings.from_env(OVERRIDES)
    assert ModalSettings(**recorded["settings"]) == expected
    assert (expected.gpu, expected.max_containers, expected.scaledown_window) == ("L4", 4, 30)
    [worker] = _declared(recorded, "cls", "GpuWorker")
    assert worker["kwargs"] == {
        "image": "Image(local files)",
        "secrets": ["modal.Secret.from_name('podembed-staging')"],
        # Containers read the weights from the volume only.
        "env": {"HF_HUB_OFFLINE": "1"},
        "volumes": {expected.hf_cache_path: f"modal.Volume.from_name('{expected.volume_name}')"},
        "gpu": "L4",
        # Reserved, and billed at least (README, "What the cost figures mean").
        "cpu": expected.cpu,
        "memory": expected.memory_mib,
        # GPU memory snapshots are alpha: not asked for unless PODEMBED_MODAL_GPU_SNAPSHOT=1.
        "enable_memory_snapshot": True,
        "max_containers": 4,
        "min_containers": 0,
        "scaledown_window": 30,
        "timeout": expected.timeout,
        "retries": expected.retries,
    }
    # Weights load into the snapshot; the GPU is reached only after the restore.
    assert [(d["target"], d["kwargs"]) for d in _declared(recorded, "enter")] == [
        ("load", {"snap": True}), ("start", {"snap": False})]
    assert [d["target"] for d in _declared(recorded, "method")] == ["drain"]
    assert [d["target"] for d in _declared(recorded, "exit")] == ["stop"]


def test_declared_functions_volume_secret_and_image(recorded: dict) -> None:
    expected = ModalSettings.from_env(OVERRIDES)
    # The web function is wrapped by `asgi_app` and `concurrent` first: its target is a PartialFunction.
    functions = {"web" if "PartialFunction" in d["target"] else d["target"]: d["kwargs"]
                 for d in _declared(recorded, "function")}
    assert functions["nightly"]["schedule"] == {"cron": "15 2 * * *"}
    # Retries that fall due after a drain ended, and abandoned batches, are launched for within this period.
    assert functions["launcher"]["schedule"] == {"period_s": 120}
    weights = {expected.hf_cache_path: f"modal.Volume.from_name('{expected.volume_name}')"}
    offline = {"HF_HUB_OFFLINE": "1"}
    for name in ("nightly", "web", "download_weights"):
        assert functions[name]["volumes"] == weights, name
    for name in ("nightly", "web"):
        assert functions[name]["env"] == offline, name
    # The one function that may reach the hub: it runs on CPU, and commits the volume itself.
    assert "env" not in functions["download_weights"]
    assert functions["launcher"]["secrets"] == ["modal.Secret.from_name('podembed-staging')"]
    # Only the preflight runs on the deployment's GPU, as the drains do; it reads the weights from the volume.
    assert {name for name, kwargs in functions.items() if "gpu" in kwargs} == {"preflight"}
    assert (functions["preflight"]["gpu"], functions["preflight"]["env"]) == ("L4", offline)
    assert functions["preflight"]["volumes"] == weights
    [web] = _declared(recorded, "asgi_app")
    assert web["target"] == "web"
    assert [d["kwargs"] for d in _declared(recorded, "concurrent")] == [{"max_inputs": expected.web_max_inputs}]

    [volume] = _declared(recorded, "from_name")[:1]
    assert volume == {"call": "from_name", "args": [expected.volume_name], "kwargs": {"create_if_missing": True}}
    secret = _declared(recorded, "from_name")[1]
    assert secret["args"] == ["podembed-staging"]
    # The model is fixed per deployment: the snapshot holds it.
    assert secret["kwargs"] == {"required_keys": ["PODEMBED_REDIS_URL", "PODEMBED_MONGO_URI", "PODEMBED_API_TOKEN",
                                                  "PODEMBED_MODEL"]}

    [base] = _declared(recorded, "debian_slim")
    assert base["kwargs"] == {"python_version": expected.python_version}
    torch, packages = _declared(recorded, "pip_install")
    # torch 2.13 has no CUDA 12.8 build: the CUDA 12.6 one, from PyTorch's index, runs on the driver of Modal's hosts.
    pins = pinned()
    assert torch == {"call": "pip_install", "args": [f"torch=={pins['torch']}"],
                     "kwargs": {"index_url": "https://download.pytorch.org/whl/cu126"}}
    # The image installs exactly the versions of config/constraints.txt, the versions the suite runs with.
    assert [torch["args"][0], *packages["args"]] == [f"{name}=={pin}" for name, pin in pins.items()]
    [env] = _declared(recorded, "env")
    assert env["args"] == [{"HF_HOME": expected.hf_cache_path, "DISABLE_SAFETENSORS_CONVERSION": "1",
                            **expected.to_env()}]
    # The model of the deploying shell is baked into the image: a new model is a new image and a new snapshot.
    assert (env["args"][0]["PODEMBED_MODAL_MODEL"], env["args"][0]["PODEMBED_MODAL_MODEL_REVISION"]) == (
        "hkunlp/instructor-xl", "ce48b213095e647a6c3536364b9fa00daf57f436")
    [sources] = _declared(recorded, "add_local_python_source")
    assert sources["args"] == ["config", "producer", "worker", "modal_jobs"]
    [constraints] = _declared(recorded, "add_local_file")
    assert constraints["args"] == [repr(CONSTRAINTS), "/root/config/constraints.txt"]

    used = {key for d in recorded["declared"] for key in d["kwargs"]}
    assert not used & DEPRECATED


def test_modal_settings_from_env_round_trip_and_errors() -> None:
    settings = ModalSettings.from_env({"PODEMBED_MODAL_MAX_CONTAINERS": " 3 ", "PODEMBED_MODAL_GPU": "",
                                       "PODEMBED_MODAL_TIMEOUT": "7200"})
    assert (settings.max_containers, settings.gpu, settings.timeout) == (3, "A10", 7200)
    assert ModalSettings.from_env(settings.to_env()) == settings
    assert all(key.startswith(PREFIX) for key in settings.to_env())
    with pytest.raises(ConfigError, match="PODEMBED_MODAL_MAX_CONTAINERS='ten' is not a valid int"):
        ModalSettings.from_env({"PODEMBED_MODAL_MAX_CONTAINERS": "ten"})
    with pytest.raises(ConfigError, match="DRAIN_BUDGET_S must be smaller"):
        ModalSettings(drain_budget_s=3600, timeout=3600)
    with pytest.raises(ConfigError, match="SCALEDOWN_WINDOW"):
        ModalSettings(scaledown_window=1)
    with pytest.raises(ConfigError, match="MIN_CONTAINERS"):
        ModalSettings(min_containers=11)
    assert container_task_id({"MODAL_TASK_ID": "ta-01"}) == "ta-01"
    assert container_task_id({}) == ""
    with pytest.raises(ConfigError, match="PODEMBED_MODAL_GPU_SNAPSHOT needs a GPU"):
        ModalSettings(gpu="cpu", gpu_snapshot=True)


def test_the_deploying_shells_model_is_baked_into_the_deployment() -> None:
    shell = {"PODEMBED_MODEL": "hkunlp/instructor-xl", "PODEMBED_MODEL_REVISION": "abc123"}
    deployed = ModalSettings.from_env(shell)
    assert (deployed.model, deployed.model_revision) == ("hkunlp/instructor-xl", "abc123")
    # In a container the image's variables give it back, whatever the secret names.
    container = ModalSettings.from_env({**deployed.to_env(), "PODEMBED_MODEL": "intfloat/e5-large-v2"})
    assert container == deployed
    secret = Settings.from_env(shell)
    assert deployed.deployed(secret) is secret
    with pytest.raises(ConfigError, match=r"names PODEMBED_MODEL=hkunlp/instructor-xl \(revision def456\) but this "
                                          r"deployment serves hkunlp/instructor-xl \(revision abc123\)"):
        deployed.deployed(secret.replace(model_revision="def456"))


def test_gpu_memory_snapshot_is_asked_for_only_when_set(tmp_path: Path) -> None:
    declared = _run(RECORD, tmp_path, {**OVERRIDES, "PODEMBED_MODAL_GPU_SNAPSHOT": "1"})
    [worker] = _declared(declared, "cls", "GpuWorker")
    assert worker["kwargs"]["experimental_options"] == {"enable_gpu_snapshot": True}
    assert ModalSettings(**declared["settings"]).snapshot == "gpu"


def test_container_logs_reach_stderr() -> None:
    """Modal shows a container's stderr (`modal app logs`); the project's INFO lines must reach it."""
    code = ("import logging; from modal_jobs.settings import log_to_stderr; log_to_stderr(); "
            "logging.getLogger('modal_jobs.weights').info('weights committed')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("INFO modal_jobs.weights: weights committed")


def _runbook() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Runbook: a first deploy on a fresh Modal account")
    return readme[start:readme.index("\n### ", start + 1)]


def test_the_runbook_keeps_the_token_runs_the_preflight_first_and_names_the_plan() -> None:
    runbook = _runbook()
    shell = [line for block in re.findall(r"```sh\n(.*?)```", runbook, re.S) for line in block.splitlines()]
    # Every variable a command reads was exported before it (a secret cannot be read back from Modal).
    exported: set[str] = set()
    for line in shell:
        used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", line))
        assert used <= exported, f"{line!r} reads {used - exported} before it is set"
        if line.startswith("export "):
            exported |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", line))
    written = next(i for i, line in enumerate(shell) if "> .podembed/api-token" in line)
    assert all(i > written for i, line in enumerate(shell) if "cat .podembed/api-token" in line)
    # The preflight runs before the first launch, and the logs are shown.
    preflight = shell.index("modal run -m modal_jobs.app::preflight                  # the doctor's checks on the "
                            "deployment's GPU")
    assert preflight < next(i for i, line in enumerate(shell) if line.startswith("podembed launch"))
    assert any(line.startswith("modal app logs podembed") for line in shell)
    # The reconcile's plan is named; snapshots are not promised to all but the first container.
    assert "Team and Enterprise plan" in runbook
    assert "on every container but the first after a deploy" not in runbook
