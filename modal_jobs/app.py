"""The Modal app: GPU drains that restore the model from a memory snapshot, a backlog launcher,
a nightly cron and the HTTP API. Deploy with `modal deploy modal_jobs/app.py`.

A thin shell: every function body calls plain code (`modal_jobs.drain`, `modal_jobs.launcher`,
`producer.*`) that the suite runs locally. Importing this module connects to nothing and
needs no credentials; torch and the project's heavy modules are imported inside the hooks,
so the memory snapshot taken after `load` holds them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import modal

from config.settings import Settings
from modal_jobs.settings import ModalSettings, container_task_id

# Process start of a container that loads the model itself; a restored container starts at its restore.
PROCESS_STARTED = datetime.now(UTC)

MODAL = ModalSettings.from_env()

image = (
    modal.Image.debian_slim(python_version=MODAL.python_version)
    .pip_install(*MODAL.image_packages())
    # Weights download once into the volume; containers see the deploy-time settings.
    .env({"HF_HOME": MODAL.hf_cache_path, **MODAL.to_env()})
    .add_local_python_source("config", "producer", "worker", "modal_jobs")
)
weights = modal.Volume.from_name(MODAL.volume_name, create_if_missing=True)
secret = modal.Secret.from_name(
    MODAL.secret_name, required_keys=["PODEMBED_REDIS_URL", "PODEMBED_MONGO_URI", "PODEMBED_API_TOKEN"]
)

app = modal.App(MODAL.app_name)


@app.cls(
    image=image,
    secrets=[secret],
    volumes={MODAL.hf_cache_path: weights},
    gpu=MODAL.gpu,
    enable_memory_snapshot=True,
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
        # Before the snapshot: no GPU, and no connection (sockets do not survive a restore).
        from modal_jobs.drain import Container

        self.container = Container(Settings.from_env(), gpu=MODAL.gpu, started_at=PROCESS_STARTED)
        self.container.load_weights(container_task_id())

    @modal.enter(snap=False)
    def start(self) -> None:
        self.container.start(container_task_id(), Settings.from_env())

    @modal.method()
    def drain(self, time_budget_s: float | None = None) -> dict:
        """The loop of `podembed work --burst`, until the queue is empty or the budget is spent."""
        budget = MODAL.drain_budget_s if time_budget_s is None else time_budget_s
        return self.container.drain(budget).to_dict()

    @modal.exit()
    def stop(self) -> None:
        self.container.stop()


def _spawn_drain(time_budget_s: float) -> str:
    return GpuWorker().drain.spawn(time_budget_s).object_id


@app.function(image=image, secrets=[secret], timeout=300)
def launcher() -> dict:
    """What `podembed launch` does, from inside Modal: spawn the drains the backlog needs."""
    from modal_jobs.launcher import run_launcher
    from producer.connections import mongo_database, redis_client

    settings = Settings.from_env()
    return run_launcher(settings, MODAL, redis_client(settings), mongo_database(settings), _spawn_drain)


@app.function(image=image, secrets=[secret], volumes={MODAL.hf_cache_path: weights},
              schedule=modal.Cron(MODAL.nightly_cron), timeout=MODAL.timeout)
def nightly() -> dict:
    """New or changed transcripts in MongoDB `transcripts`, then the drains their backlog needs."""
    from modal_jobs.launcher import run_nightly
    from producer.connections import mongo_database, redis_client

    settings = Settings.from_env()
    return run_nightly(settings, MODAL, redis_client(settings), mongo_database(settings), _spawn_drain)


@app.function(image=image, secrets=[secret])
@modal.concurrent(max_inputs=MODAL.web_max_inputs)
@modal.asgi_app()
def web():
    """The HTTP API of `podembed serve` (status by job id, enqueue), reachable from anywhere."""
    from producer.api import create_app

    return create_app(Settings.from_env())
