"""`podembed doctor` inside a container of the deployed image: `modal run -m modal_jobs.app::preflight`.

The same checks, against the secret's services, on the deployment's GPU, with the model read from
the volume as the drains read it. Run it before the first `launch`.
"""

from __future__ import annotations

from config.errors import ConfigError
from config.settings import Settings
from modal_jobs.settings import ModalSettings
from modal_jobs.weights import weights_path
from worker.doctor import Check, Status, model_checks, run_checks


def preflight_checks(secret: Settings, modal: ModalSettings) -> list[Check]:
    """Every check of `podembed doctor` for this deployment; a secret naming another model than the
    deployment's, or weights missing from the volume, are failures that name what to do."""
    try:
        settings = modal.deployed(secret)
    except ConfigError as exc:
        return [Check("deployment model", Status.FAIL, str(exc))]

    def from_volume(settings: Settings) -> list[Check]:
        try:
            path = weights_path(settings, modal.hub_cache)
        except ConfigError as exc:
            return [Check("model weights", Status.FAIL, str(exc))]
        return model_checks(settings.replace(model_path=path))

    return [Check("deployment model", Status.OK, f"{modal.model} (revision {modal.model_revision}), weights "
                                                 f"snapshotted in {modal.snapshot} memory"),
            *run_checks(settings, want_gpu=not modal.wants_cpu, model=from_volume)]
