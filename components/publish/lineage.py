"""The whole lineage of a published model, assembled from publish's two inputs alone.

The trained model's record carries the data (pack), the cache keys, the base model and
the training run; the evaluation record carries the metrics and the gate. Publish adds
where and when it ran (code, DVC lock, image). The same document goes to the Hub repo,
the registry version folder and the receipt as `lineage.json`.
"""

from __future__ import annotations

from typing import Any

from components.common.records import (
    SCHEMA_VERSION,
    EvaluationRecord,
    TrainRecord,
    dvc_state,
    environment,
)


def build_lineage(
    name: str,
    train: TrainRecord,
    evaluation: EvaluationRecord,
    run_key: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage document (JSON-ready) of the model `train` describes. `run_key`: the
    pipeline run's data fingerprint and config hash (what a scheduled run compares)."""
    pack = train.pack
    return {
        "run_key": run_key,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "unet_sha256": train.unet_sha256,
        "source": {
            "source": pack.source,
            "dataset_name": pack.dataset_name,
            "fingerprint": pack.source_fingerprint,
        },
        "pack": {
            "manifest_sha256": pack.manifest_sha256,
            "shards": [s.model_dump() for s in pack.shards],
            "samples": pack.samples,
            "rejected_by_reason": pack.rejected_by_reason,
        },
        "cache": train.latents.model_dump(),
        "base_model": train.base_model.model_dump() if train.base_model else None,
        "train": {
            "config": train.config,
            "config_sha256": train.config_sha256,
            "steps": train.steps,
            "seed": train.seed,
            "resumed_from_step": train.resumed_from_step,
            "initial_loss": train.initial_loss,
            "final_loss": train.final_loss,
            "environment": train.environment,
        },
        "evaluate": {
            "metrics": evaluation.metrics,
            "checks": [c.model_dump() for c in evaluation.checks],
            "passed": evaluation.passed,
        },
        "code": {**environment(), "dvc": dvc_state()},
    }
