"""Model families: which kinds of base model the pipeline trains, read from the model.

A diffusers folder says what it is in `model_index.json` (`_class_name`, the pipeline
class). Stages ask `family_of(model)` and never branch on model names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.common.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    label: str


SD = Family("sd", "StableDiffusionPipeline", "Stable Diffusion 1.x/2.x")
FAMILIES = {f.pipeline_class: f for f in (SD,)}


def pipeline_class(model: Path) -> str | None:
    """The pipeline class a diffusers folder names, or None without model_index.json."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except ValueError:
        return None


def family_of(model: Path, key: str = "model.source") -> Family:
    """The family of the diffusers folder `model`. ConfigError naming `key`, the
    pipeline class and what is supported, for a model this pipeline cannot train."""
    name = pipeline_class(model)
    found = FAMILIES.get(name or "")
    if found is None:
        supported = ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES.values())
        raise ConfigError(
            f"{key}: {model} is a {name or 'model without a pipeline class'}; this pipeline "
            f"trains {supported}"
        )
    return found
