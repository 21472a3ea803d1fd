"""base-model: the frozen starting point, as a diffusers Stable Diffusion folder.

`model.source: tiny` builds a tiny SD pipeline offline from `model.seed` (`tiny-sdxl`,
`tiny-sd3`, `tiny-flux`: a tiny SDXL, SD3, FLUX.1); a local
folder is copied; a hub id is taken from the Hugging Face cache or downloaded at `model.revision`
(offline: the cache only; not cached, a config error).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from components.common.config import ModelConfig
from components.common.errors import ConfigError, T2IError
from components.common.families import family_of
from components.common.io import atomic_dir
from components.common.models import check_model_dir, denoiser_part, hub_offline, weights_sha256
from components.common.records import BASE_MODEL_RECORD, BaseModelRecord, write_record
from components.common.tiny import TINY_SOURCES

# Files worth downloading from a hub repo: configs, safetensors weights, tokenizer, and
# the card (README.md: its license is the fine-tune's default).
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "tokenizer/*", "README.md"]


@dataclass
class BaseModelReport:
    source: str
    revision: str | None
    unet_sha256: str
    out: str


def run(cfg: ModelConfig, out: Path) -> BaseModelReport:
    """Write the base model to `out` (atomically) and return what was written.

    Raises T2IError when a hub id cannot be fetched (offline, unknown id) or a local
    folder is not a diffusers SD model.
    """
    out = Path(out)
    revision, hub_id = cfg.revision, None
    with atomic_dir(out) as tmp:
        if cfg.source in TINY_SOURCES:
            _build_tiny(cfg).save_pretrained(tmp, safe_serialization=True)
        elif Path(cfg.source).exists():
            shutil.copytree(check_model_dir(Path(cfg.source)), tmp, dirs_exist_ok=True)
        else:
            revision, hub_id = _download(cfg.source, cfg.revision, tmp), cfg.source
        check_model_dir(tmp)
        family_of(tmp, f"model.source {cfg.source!r}")  # before anything trains on it
        record = BaseModelRecord(
            source=cfg.source,
            hub_id=hub_id,
            revision=revision,
            unet_sha256=weights_sha256(tmp, denoiser_part(tmp)),  # (SD3: the transformer's)
            license=card_license(tmp),
            license_name=card_license(tmp, "license_name"),
            license_link=card_license(tmp, "license_link"),
            seed=cfg.seed if cfg.source in TINY_SOURCES else None,
        )
        write_record(record, tmp / BASE_MODEL_RECORD)
    return BaseModelReport(cfg.source, revision, record.unet_sha256, str(out))


def _build_tiny(cfg: ModelConfig):
    """The tiny pipeline `model.source` names, built from `model.seed`."""
    from components.base_model import tiny

    steps = cfg.tiny_vae_steps
    if cfg.source == "tiny-sdxl":
        return tiny.build_tiny_sdxl(cfg.seed, steps, cfg.tiny_prediction_type)
    if cfg.source == "tiny-sd3":
        return tiny.build_tiny_sd3(cfg.seed, steps)
    if cfg.source == "tiny-flux":
        return tiny.build_tiny_flux(cfg.seed, steps)
    return tiny.build_tiny_pipeline(cfg.seed, steps, cfg.tiny_prediction_type)


def card_license(model: Path, key: str = "license") -> str | None:
    """The `license` (or `key`: license_name, license_link) of a model folder's card
    (README.md metadata), if it names one."""
    card = Path(model) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        license_ = (metadata_load(card) or {}).get(key)
    except ValueError:  # a card whose YAML header does not parse: no license to inherit
        return None
    return license_ if isinstance(license_, str) else None


def _download(repo_id: str, revision: str | None, dest: Path) -> str:
    """Copy a hub model's safetensors files from the Hugging Face cache, downloading
    what is missing unless offline; return the resolved commit.

    Offline (HF_HUB_OFFLINE), a model already in the cache is used as
    `from_pretrained` would use it; one that is not there is a ConfigError.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            raise ConfigError(
                f"model.source {repo_id!r}{at} is not in the Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it once online (`hf download "
                f"{repo_id}`), or set model.source to a local folder or 'tiny'"
            ) from None
        raise T2IError(
            f"model.source {repo_id!r}: cannot reach the Hugging Face Hub (offline?); "
            "set model.source to a local folder or 'tiny'"
        ) from None
    except (HfHubHTTPError, ValueError) as e:
        raise T2IError(f"model.source {repo_id!r}: download failed ({e})") from None
    shutil.copytree(path, dest, dirs_exist_ok=True)
    return Path(path).name  # snapshots/<commit>: the revision actually fetched
