"""The Modal app imports offline without credentials and declares what its settings say.

Both run the import in a fresh process with an empty HOME, no MODAL_* variables, and the
socket layer replaced by one that refuses: any connection or DNS lookup fails the import.
The declarations are recorded by wrapping Modal's own decorators and constructors, which
still receive (and validate) every argument.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import ConfigError
from modal_jobs.settings import PINNED_PACKAGES, PREFIX, ModalSettings, container_task_id
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
                    (modal.Image, "pip_install"), (modal.Image, "env"), (modal.Image, "add_local_python_source")]:
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
    assert ModalSettings(**result["settings"]) == ModalSettings()
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
    assert not any("gpu" in kwargs for kwargs in functions.values())
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
    # A CUDA 12 build of torch, from PyTorch's index, runs on the driver of Modal's hosts.
    assert torch == {"call": "pip_install", "args": [f"torch=={expected.torch_version}"],
                     "kwargs": {"index_url": "https://download.pytorch.org/whl/cu128"}}
    assert packages["args"] == list(PINNED_PACKAGES)
    [env] = _declared(recorded, "env")
    assert env["args"] == [{"HF_HOME": expected.hf_cache_path, "DISABLE_SAFETENSORS_CONVERSION": "1",
                            **expected.to_env()}]
    [sources] = _declared(recorded, "add_local_python_source")
    assert sources["args"] == ["config", "producer", "worker", "modal_jobs"]

    used = {key for d in recorded["declared"] for key in d["kwargs"]}
    assert not used & DEPRECATED


def test_modal_settings_from_env_round_trip_and_errors() -> None:
    settings = ModalSettings.from_env({"PODEMBED_MODAL_MAX_CONTAINERS": " 3 ", "PODEMBED_MODAL_GPU": "",
                                       "PODEMBED_MODAL_TIMEOUT": "7200"})
    assert (settings.max_containers, settings.gpu, settings.timeout) == (3, "A10G", 7200)
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
