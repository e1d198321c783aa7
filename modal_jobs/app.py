"""The Modal app: GPU drains that restore the model from a memory snapshot, a backlog launcher,
a nightly cron, the HTTP API and a preflight. Deploy with `modal deploy -m modal_jobs.app`, from a
shell whose PODEMBED_MODEL and PODEMBED_MODEL_REVISION name the model: the deployment serves that one.

A thin shell: every function body calls plain code (`modal_jobs.drain`, `modal_jobs.launcher`,
`producer.*`) that the suite runs locally. Importing this module connects to nothing and
needs no credentials; torch and the project's heavy modules are imported inside the hooks,
so the memory snapshot taken after `load` holds them. Each entry point sends the project's INFO
lines to stderr first (`log_to_stderr`): that is what `modal app logs` and `modal run` show.
"""

from __future__ import annotations

import json
import logging

import modal

from config.settings import Settings
from config.versions import CONSTRAINTS, pinned, requirements
from modal_jobs.settings import (
    ModalSettings,
    container_task_id,
    drain_budget,
    log_to_stderr,
    process_started_at,
)

logger = logging.getLogger(__name__)

# Boot of a container that loads the model itself; a restored container starts at its restore.
PROCESS_STARTED = process_started_at()

MODAL = ModalSettings.from_env()
# The versions the suite runs with (config/constraints.txt), so vectors on Modal match vectors here.
PINS = pinned()

image = (
    modal.Image.debian_slim(python_version=MODAL.python_version)
    # torch from a CUDA 12 index: the build must run on the driver of Modal's hosts (README, "The torch wheel").
    .pip_install(f"torch=={PINS['torch']}", index_url=MODAL.torch_index_url)
    .pip_install(*requirements({name: pin for name, pin in PINS.items() if name != "torch"}))
    .env({
        "HF_HOME": MODAL.hf_cache_path,
        # instructor-xl ships only pytorch_model.bin: transformers would otherwise start a safetensors
        # conversion (a hub lookup and a 5 GB download) in a background thread of the snapshot hook.
        "DISABLE_SAFETENSORS_CONVERSION": "1",
        **MODAL.to_env(),
    })
    # The dashboard's page, script and stylesheet (producer/web/static) travel with the code.
    .add_local_python_source("config", "producer", "worker", "modal_jobs",
                             ignore=~modal.FilePatternMatcher("**/*.py", "**/static/*"))
    # Where the container's own `pinned()` reads it (packages are added under /root): the preflight compares.
    .add_local_file(CONSTRAINTS, f"/root/config/{CONSTRAINTS.name}")
)
weights = modal.Volume.from_name(MODAL.volume_name, create_if_missing=True)
# PODEMBED_MODEL: the model is fixed for a deployment (the deploying shell's, in the image), and the snapshot
# holds it; a container whose secret names another refuses (`ModalSettings.deployed`).
secret = modal.Secret.from_name(MODAL.secret_name, required_keys=[
    "PODEMBED_REDIS_URL", "PODEMBED_MONGO_URI", "PODEMBED_API_TOKEN", "PODEMBED_MODEL"])
# Everything but `download_weights` reads the weights from the volume only.
OFFLINE = {"HF_HUB_OFFLINE": "1"}

app = modal.App(MODAL.app_name)


def deployed_settings() -> Settings:
    """The secret's settings, refused if they name another model than this deployment serves."""
    return MODAL.deployed(Settings.from_env())


def container_settings() -> Settings:
    """The settings of a container: the model loads from the volume (refused if it is not there)."""
    from modal_jobs.weights import weights_path

    settings = deployed_settings()
    return settings.replace(model_path=weights_path(settings, MODAL.hub_cache))


# GPU memory snapshots are alpha and opt-in: https://modal.com/docs/guide/memory-snapshots.
GPU_SNAPSHOT = {"experimental_options": {"enable_gpu_snapshot": True}} if MODAL.gpu_snapshot else {}


@app.cls(
    image=image,
    secrets=[secret],
    env=OFFLINE,
    volumes={MODAL.hf_cache_path: weights},
    gpu=MODAL.modal_gpu,
    cpu=MODAL.cpu,
    memory=MODAL.memory_mib,
    enable_memory_snapshot=True,
    **GPU_SNAPSHOT,
    max_containers=MODAL.max_containers,
    min_containers=MODAL.min_containers,
    scaledown_window=MODAL.scaledown_window,
    timeout=MODAL.timeout,
    retries=MODAL.retries,
)
class GpuWorker:
    """One container: the model loaded once (restored from the snapshot), drains on demand."""

    @modal.enter(snap=True)
    def load(self) -> None:
        # Before the snapshot: no connection (sockets do not survive a restore), and no GPU unless the
        # deployment asked for GPU memory snapshots (then the weights go onto it here).
        from modal_jobs.drain import Container

        log_to_stderr()
        settings = container_settings()
        self.container = Container(settings, gpu=MODAL.gpu, host_price_per_hour=MODAL.host_price_per_hour(settings),
                                   snapshot=MODAL.snapshot, started_at=PROCESS_STARTED)
        self.container.load_weights(container_task_id())

    @modal.enter(snap=False)
    def start(self) -> None:
        log_to_stderr()
        self.container.start(container_task_id(), container_settings())

    @modal.method()
    def drain(self, time_budget_s: float | None = None, spawn_id: str | None = None) -> dict:
        """The loop of `podembed work --burst`, until the queue is empty or the budget is spent."""
        requested = MODAL.drain_budget_s if time_budget_s is None else time_budget_s
        budget = drain_budget(MODAL, requested, job_timeout=self.container.settings.job_timeout)
        return self.container.drain(budget, spawn_id).to_dict()

    @modal.exit()
    def stop(self) -> None:
        self.container.stop()


def _spawn_drain(time_budget_s: float, spawn_id: str) -> str:
    return GpuWorker().drain.spawn(time_budget_s, spawn_id).object_id


@app.function(image=image, secrets=[secret], timeout=300, schedule=modal.Period(seconds=MODAL.launcher_period_s))
def launcher() -> dict:
    """What `podembed launch` does, from inside Modal and every few minutes: spawn the drains the
    backlog needs, retries that fell due and abandoned batches included."""
    from modal_jobs.launcher import run_launcher
    from producer.connections import mongo_database, redis_client

    log_to_stderr()
    settings = deployed_settings()
    return run_launcher(settings, MODAL, redis_client(settings), mongo_database(settings), _spawn_drain)


@app.function(image=image, secrets=[secret], env=OFFLINE, volumes={MODAL.hf_cache_path: weights},
              schedule=modal.Cron(MODAL.nightly_cron), timeout=MODAL.timeout)
def nightly() -> dict:
    """New or changed transcripts in MongoDB `transcripts`, then the drains their backlog needs."""
    from modal_jobs.launcher import run_nightly
    from producer.connections import mongo_database, redis_client

    log_to_stderr()
    settings = container_settings()
    return run_nightly(settings, MODAL, redis_client(settings), mongo_database(settings), _spawn_drain)


@app.function(image=image, secrets=[secret], volumes={MODAL.hf_cache_path: weights}, timeout=3600)
def download_weights() -> str:
    """Run once per model revision, before the first deploy's drains: the weights into the volume, committed.
    `modal run -m modal_jobs.app::download_weights` (CPU only: no GPU is billed for the download). Its log line
    names the path and bytes; `modal run` drops a return value unless `--write-result FILE` (a str) is given
    (https://modal.com/docs/cli/latest/run)."""
    from modal_jobs.weights import download_weights as download

    log_to_stderr()
    return json.dumps(download(deployed_settings(), MODAL.hub_cache, weights.commit).to_dict())


@app.function(image=image, secrets=[secret], env=OFFLINE, volumes={MODAL.hf_cache_path: weights},
              gpu=MODAL.modal_gpu, cpu=MODAL.cpu, memory=MODAL.memory_mib, timeout=600)
def preflight() -> str:
    """`podembed doctor` in a container of this deployment, on its GPU, against the secret's services, with the
    weights from the volume: one log line per check, and an error if any failed (`modal run` then exits 1).
    `modal run -m modal_jobs.app::preflight` before the first launch."""
    from config.errors import PodembedError
    from modal_jobs.preflight import preflight_checks
    from worker.doctor import failed

    log_to_stderr()
    checks = preflight_checks(Settings.from_env(), MODAL)
    for check in checks:
        logger.info("preflight %s", check.line())
    bad = failed(checks)
    if bad:
        raise PodembedError(f"preflight: {len(bad)} check(s) failed: {'; '.join(c.name for c in bad)}")
    return "\n".join(c.line() for c in checks)


@app.function(image=image, secrets=[secret], env=OFFLINE, volumes={MODAL.hf_cache_path: weights})
@modal.concurrent(max_inputs=MODAL.web_max_inputs)
@modal.asgi_app()
def web():
    """The HTTP API of `podembed serve` (status by job id, enqueue), reachable from anywhere."""
    from producer.web.api import create_app

    log_to_stderr()
    # The tokenizer that chunks a POST /jobs body comes from the volume. Modal serves the endpoint
    # under *.modal.run (PODEMBED_ALLOWED_HOSTS adds a custom domain).
    settings = container_settings()
    return create_app(settings.replace(allowed_hosts=f"{settings.allowed_hosts},*.modal.run"))
