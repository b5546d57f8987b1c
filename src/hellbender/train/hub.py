"""Pushing a run to the Hugging Face Hub: ``hub_model_id``, ``hub_strategy``, ``push_to_hub``,
``hub_private_repo`` and ``push_dataset_to_hub``, through ``huggingface_hub``.

The repository is created (or found) before the first step, so a run that cannot push — no
network, ``HF_HUB_OFFLINE``, no token — fails at once with an error naming the key, not hours later.
What goes up, per ``hub_strategy`` (the HF Trainer's meanings):

- ``end``: the final outputs (weights, tokenizer, config, metrics, plot), once, at the end;
- ``every_save``: also, at each checkpoint, its weights and configs to the repository's root;
- ``checkpoint``: as ``every_save``, plus the whole latest checkpoint under ``last-checkpoint/``;
- ``all_checkpoints``: as ``every_save``, plus every checkpoint under its own folder name.

``push_dataset_to_hub: <repo id>`` uploads the prepared (tokenized) dataset folder to a dataset
repository once it is prepared. The endpoint is ``HF_ENDPOINT`` (default huggingface.co); only the
main rank pushes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hellbender.config.schema import ResolvedConfig
from hellbender.errors import HellbenderError
from hellbender.hub import hub_offline

logger = logging.getLogger(__name__)

# Files of a checkpoint that make up the model (what every_save puts at the repository's root).
_MODEL_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
# Never uploaded with the final outputs: the checkpoints have their own strategy.
_FINAL_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**"]


class HubError(HellbenderError, RuntimeError):
    """The Hub could not be reached or refused the upload."""


def pushes_model(cfg: ResolvedConfig) -> bool:
    """The run pushes its model: ``hub_model_id`` set and ``push_to_hub`` not false (Axolotl pushes
    whenever ``hub_model_id`` is set)."""
    return cfg.hub_model_id is not None and cfg.push_to_hub is not False


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint())


class HubPusher:
    """Uploads of one run to ``repo_id``; every call raises :class:`HubError` naming ``key``."""

    def __init__(self, repo_id: str, *, private: bool, key: str, repo_type: str = "model") -> None:
        self.repo_id, self.key, self.repo_type = repo_id, key, repo_type
        self.api = _api()
        if hub_offline():
            raise HubError(
                f"`{key}: {repo_id}` pushes to the Hugging Face Hub, but the Hub is switched off here "
                "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE). Unset it, or remove "
                f"`{key}`."
            )
        self._call("create the repository", self.api.create_repo, repo_id, private=private, exist_ok=True,
                   repo_type=repo_type)  # fmt: skip

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # network, auth and HTTP errors alike: one clear message
            raise HubError(
                f"`{self.key}: {self.repo_id}`: could not {what} on the Hub at {_endpoint()} "
                f"({type(exc).__name__}: {str(exc)[:300]}). Check the network and your token "
                f"(`hf auth login` / HF_TOKEN), or remove `{self.key}`."
            ) from exc

    def upload(self, folder: Path, *, path_in_repo: str = "", message: str, **patterns: Any) -> None:
        self._call(
            f"upload {folder.name}",
            self.api.upload_folder,
            repo_id=self.repo_id,
            repo_type=self.repo_type,
            folder_path=str(folder),
            path_in_repo=path_in_repo or None,
            commit_message=message,
            **patterns,
        )
        logger.info("pushed %s to %s/%s", folder, self.repo_id, path_in_repo)


class ModelPusher(HubPusher):
    """The model repository of a run, with its ``hub_strategy``."""

    def __init__(self, cfg: ResolvedConfig) -> None:
        assert cfg.hub_model_id is not None
        self.strategy = cfg.hub_strategy
        super().__init__(cfg.hub_model_id, private=cfg.hub_private_repo, key="hub_model_id")

    def checkpoint_saved(self, checkpoint: Path, step: int) -> None:
        """Push what ``hub_strategy`` asks for at a save."""
        if self.strategy == "end":
            return
        self.upload(checkpoint, message=f"step {step}: model", allow_patterns=_MODEL_PATTERNS)
        if self.strategy == "checkpoint":
            self.upload(checkpoint, path_in_repo="last-checkpoint", message=f"step {step}: checkpoint")
        elif self.strategy == "all_checkpoints":
            self.upload(checkpoint, path_in_repo=checkpoint.name, message=f"step {step}: checkpoint")

    def final(self, output_dir: Path) -> None:
        """Push the final outputs (everything in ``output_dir`` but checkpoints and hidden files)."""
        self.upload(output_dir, message="final model", ignore_patterns=_FINAL_IGNORE)


def push_dataset(cfg: ResolvedConfig, prepared_folder: Path) -> None:
    """Upload the prepared dataset folder to the ``push_dataset_to_hub`` dataset repository."""
    if cfg.push_dataset_to_hub is None:
        return
    pusher = HubPusher(
        cfg.push_dataset_to_hub, private=cfg.hub_private_repo, key="push_dataset_to_hub", repo_type="dataset"
    )
    pusher.upload(prepared_folder, message="prepared dataset")
