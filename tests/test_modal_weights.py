"""Weights in the volume: downloaded once at a pinned revision and committed; containers read them only.

The volume is a directory here, laid out as the hub cache that `download_weights` fills on Modal
(`models--ORG--NAME/snapshots/REVISION/`), holding the real small model's files. The hub itself
cannot be reached from here (HF_HUB_OFFLINE=1), as in a GPU container.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import Settings
from modal_jobs.preflight import preflight_checks
from modal_jobs.settings import ModalSettings
from modal_jobs.weights import download_weights, weights_path
from producer.enqueue import vector_spec
from worker.doctor import Status

REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


def _volume(settings: Settings, root: Path, model: str = "hkunlp/instructor-xl") -> Path:
    """A hub cache holding `model` at REVISION (the bundled model's files under that name)."""
    snapshot = root / f"models--{model.replace('/', '--')}" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    model_dir = Path(settings.model_source())
    # As in the hub cache: real directories, each file a link (there, to a blob).
    for source in model_dir.rglob("*"):
        target = snapshot / source.relative_to(model_dir)
        if source.is_dir():
            target.mkdir()
        else:
            target.symlink_to(source)
    return snapshot


def test_containers_load_the_pinned_revision_from_the_volume_only(settings: Settings, tmp_path: Path) -> None:
    xl = settings.replace(model="hkunlp/instructor-xl", model_path=None)
    with pytest.raises(ConfigError, match="PODEMBED_MODEL_REVISION must pin a commit of hkunlp/instructor-xl"):
        weights_path(xl, tmp_path)
    pinned = xl.replace(model_revision=REVISION)
    with pytest.raises(ConfigError, match=rf"the weights of hkunlp/instructor-xl at revision {REVISION} are not in "
                                          r"the volume .*: run `modal run -m modal_jobs.app::download_weights` first"):
        weights_path(pinned, tmp_path)

    snapshot = _volume(settings, tmp_path)
    assert weights_path(pinned, tmp_path) == str(snapshot)
    # Another revision is another vector key, and is not in the volume.
    assert vector_spec(pinned).key != vector_spec(pinned.replace(model_revision="0" * 40)).key
    with pytest.raises(ConfigError, match="not in the volume"):
        weights_path(pinned.replace(model_revision="0" * 40), tmp_path)
    # The bundled model ships in its package: nothing to look up.
    assert weights_path(settings, tmp_path) == settings.model_source()


def test_download_weights_commits_the_volume(settings: Settings, tmp_path: Path) -> None:
    pinned = settings.replace(model="hkunlp/instructor-xl", model_path=None, model_revision=REVISION)
    commits: list[bool] = []
    with pytest.raises(ConfigError, match="PODEMBED_MODEL_REVISION must pin"):
        download_weights(pinned.replace(model_revision=None), tmp_path, lambda: commits.append(True))
    assert commits == []

    snapshot = _volume(settings, tmp_path)
    weights = download_weights(pinned, tmp_path, lambda: commits.append(True))
    assert commits == [True]
    assert (weights.model, weights.revision, weights.path) == ("hkunlp/instructor-xl", REVISION, str(snapshot))
    expected = sum(f.stat().st_size for f in Path(settings.model_source()).rglob("*") if f.is_file())
    assert weights.bytes == expected > 10_000_000


def test_app_container_settings_point_at_the_volume(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modal_jobs import app as modal_app

    modal = ModalSettings(hf_cache_path=str(tmp_path), model="hkunlp/instructor-xl", model_revision=REVISION)
    snapshot = _volume(settings, Path(modal.hub_cache))
    monkeypatch.setattr(modal_app, "MODAL", modal)
    monkeypatch.setenv("PODEMBED_MODEL", "hkunlp/instructor-xl")
    monkeypatch.setenv("PODEMBED_MODEL_REVISION", REVISION)
    container = modal_app.container_settings()
    assert (container.model, container.model_revision, container.model_path) == (
        "hkunlp/instructor-xl", REVISION, str(snapshot))
    monkeypatch.setenv("PODEMBED_MODEL_REVISION", "0" * 40)
    with pytest.raises(ConfigError, match="names PODEMBED_MODEL=hkunlp/instructor-xl .* but this deployment serves"):
        modal_app.container_settings()
    monkeypatch.setattr(modal_app, "MODAL", replace(modal, model_revision="0" * 40))
    with pytest.raises(ConfigError, match="download_weights"):
        modal_app.container_settings()


def test_preflight_checks_the_deployment_with_the_weights_of_the_volume(settings: Settings, tmp_path: Path) -> None:
    modal = ModalSettings(gpu="cpu", hf_cache_path=str(tmp_path), model="hkunlp/instructor-xl",
                          model_revision=REVISION)
    secret = settings.replace(model="hkunlp/instructor-xl", model_path=None, model_revision=REVISION)
    missing = {c.name: c for c in preflight_checks(secret, modal)}
    assert missing["model weights"].status is Status.FAIL
    assert "run `modal run -m modal_jobs.app::download_weights` first" in missing["model weights"].detail
    assert missing["redis maxmemory-policy"].status is Status.OK

    snapshot = _volume(settings, Path(modal.hub_cache))
    checks = preflight_checks(secret, modal)
    assert {c.status for c in checks} <= {Status.OK, Status.NA}, [c.line() for c in checks]
    found = {c.name: c for c in checks}
    assert found["deployment model"].detail == f"hkunlp/instructor-xl (revision {REVISION}), weights snapshotted " \
                                               "in cpu memory"
    assert found["model weights"].detail.endswith(str(snapshot))
    assert found["model dimension"].detail.startswith("384-d on cpu")

    # A secret that names another model than the deployment's: nothing else is worth checking.
    assert [c.line() for c in preflight_checks(settings, modal)] == [
        f"FAIL  deployment model: the secret 'podembed' names PODEMBED_MODEL={settings.model} (revision None) but "
        f"this deployment serves hkunlp/instructor-xl (revision {REVISION}): deploy again from a shell with the "
        "secret's model and revision, or set the secret back"]
