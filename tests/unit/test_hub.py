"""One answer to "may the hub be reached?" for models and datasets alike (hellbender.hub)."""

from __future__ import annotations

import huggingface_hub
import pytest

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import DataError
from hellbender.data.sources import resolve_source
from hellbender.hub import OFFLINE_VARIABLES, hub_offline
from hellbender.models.load import ModelNotLocalError, resolve_model_path
from hellbender.testing.configs import resolved_config


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline variable set, and huggingface_hub's own (import-time) flag off."""
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)


@pytest.mark.usefixtures("online")
def test_no_variable_means_online() -> None:
    assert not hub_offline()


@pytest.mark.usefixtures("online")
@pytest.mark.parametrize("name", OFFLINE_VARIABLES)
@pytest.mark.parametrize("value", ["1", "true", "ON", " yes "])
def test_any_one_variable_means_offline(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert hub_offline()
    monkeypatch.setenv(name, "0")
    assert not hub_offline()


@pytest.mark.usefixtures("online")
@pytest.mark.parametrize("name", OFFLINE_VARIABLES)
def test_models_and_datasets_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: object, name: str) -> None:
    """Each variable alone makes *both* a hub model and a hub dataset local-only (they used to
    disagree: TRANSFORMERS_OFFLINE alone loaded models offline but sent datasets to the hub)."""
    monkeypatch.setenv(name, "1")
    monkeypatch.chdir(str(tmp_path))  # so "org/name" is not accidentally a local folder
    with pytest.raises(DataError, match="offline"):
        resolve_source(DatasetConfig(path="hellbender-test-org/never-downloaded-data"))
    with pytest.raises(ModelNotLocalError, match="must be local"):
        resolve_model_path(resolved_config(base_model="hellbender-test-org/never-downloaded-model"))
