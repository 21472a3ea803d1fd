"""The newest published version of `publish.name` and its lineage: what a scheduled run
compares its data fingerprint and config with, to decide whether to train at all."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from components.common.config import PublishConfig
from components.common.errors import T2IError
from components.publish.hub import hub_token, read_lineage
from components.publish.registry import latest_version


@dataclass(frozen=True)
class Published:
    version: int
    where: str  # "registry <path or URI>" or "hub <repo id>"
    lineage: dict[str, Any]

    def describe(self) -> str:
        return f"v{self.version} ({self.where})"

    @property
    def run_key(self) -> dict[str, Any]:
        """The data fingerprint and config hash the version was trained from ({} when it
        was published outside a pipeline run, e.g. by `dvc repro`)."""
        key = self.lineage.get("run_key")
        return key if isinstance(key, dict) else {}


def latest_published(cfg: PublishConfig) -> Published | None:
    """The newest version in the registry (targets local and both) or on the Hub
    (target hub), or None when there is none yet. T2IError when the target cannot be
    read; ConfigError (from the Hub's token check) when the Hub is out of reach here."""
    if cfg.target in ("local", "both"):
        root = f"{cfg.registry.rstrip('/')}/{cfg.name}"
        found = latest_version(root)
        return Published(found[0], f"registry {root}", found[1]) if found else None
    return _latest_on_hub(cfg)


def _latest_on_hub(cfg: PublishConfig) -> Published | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    repo = cfg.hub_model_id
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=hub_token())
    try:
        lineage = read_lineage(api, repo, "main")
    except RepositoryNotFoundError:
        return None
    except HfHubHTTPError as e:
        raise T2IError(f"{repo}: cannot read the latest lineage.json from the Hub: {e}") from e
    if lineage is None:
        return None
    version = int((lineage.get("published_as") or {}).get("version") or 0)
    return Published(version, f"hub {repo}", lineage)
