"""Thin KFP components: each body imports the project and calls one stage's `run()`.

No logic lives here and nothing is installed at run time: every component runs the
project image (`install_kfp_package=False`, no `packages_to_install`). Stage configs
arrive as JSON-string parameters (KFP dict parameters cannot hold nulls) and are
validated by the same schema as params.yaml.
The image is a compile-time setting, so the components are made by `make_ops(image)`.
"""

from types import SimpleNamespace
from typing import List  # noqa: UP035 - KFP reads the annotation and wants typing.List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def base_model_op(model_params: str, base_model: Output[Model]):
    import json
    from pathlib import Path

    from components import base_model as stage
    from components.common.config import ModelConfig, validate_section

    stage.run(
        validate_section(ModelConfig, json.loads(model_params), "model"), Path(base_model.path)
    )


def pack_op(
    source: str,
    source_fingerprint: str,
    data_params: str,
    pack_params: str,
    shards: Output[Dataset],
):
    import json
    from pathlib import Path

    from components import pack_shards as stage
    from components.common.config import DataConfig, PackConfig, validate_section

    report = stage.run(
        validate_section(DataConfig, json.loads(data_params), "data"),
        validate_section(PackConfig, json.loads(pack_params), "pack"),
        Path(source),
        Path(shards.path),
    )
    shards.metadata.update(source_fingerprint=source_fingerprint, samples=report.kept)
    print(report.summary())


def cache_op(
    cache_params: str, shards: Input[Dataset], base_model: Input[Model], latents: Output[Dataset]
):
    import json
    from pathlib import Path

    from components import cache_latents as stage
    from components.common.config import CacheConfig, validate_section

    report = stage.run(
        validate_section(CacheConfig, json.loads(cache_params), "cache"),
        Path(shards.path),
        Path(base_model.path),
        Path(latents.path),
    )
    print(report.summary())


def cache_worker_op(
    cache_params: str,
    worker_index: int,
    num_workers: int,
    shards: Input[Dataset],
    base_model: Input[Model],
    part: Output[Dataset],
):
    import json
    from pathlib import Path

    from components import cache_latents as stage
    from components.common.config import CacheConfig, validate_section

    report = stage.run(
        validate_section(CacheConfig, json.loads(cache_params), "cache"),
        Path(shards.path),
        Path(base_model.path),
        Path(part.path),
        worker_index=worker_index,
        num_workers=num_workers,
    )
    print(report.summary())


def cache_merge_op(
    num_workers: int,
    shards: Input[Dataset],
    parts: Input[List[Dataset]],  # noqa: UP006
    latents: Output[Dataset],
):
    import shutil
    from pathlib import Path

    from components import cache_latents as stage

    out = Path(latents.path)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        for path in Path(part.path).iterdir():
            shutil.copy2(path, out / path.name)
    manifest = stage.merge(Path(shards.path), out, count=num_workers)
    print(f"merged {len(manifest.shards)} latent shards from {num_workers} workers")


def train_op(
    train_params: str,
    checkpoint_dir: str,
    latents: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    reports: Output[Artifact],
    train_metrics: Output[Metrics],
):
    import json
    from pathlib import Path

    from components import train_unet as stage
    from components.common.config import TrainConfig, validate_section

    report = stage.run(
        validate_section(TrainConfig, json.loads(train_params), "train"),
        Path(latents.path),
        Path(base_model.path),
        Path(model.path),
        Path(reports.path),
        Path(checkpoint_dir or Path(reports.path) / "checkpoints"),
    )
    for key in ("initial_loss", "final_loss", "images_per_second", "steps"):
        train_metrics.log_metric(key, getattr(report, key))
    print(report.summary())


def evaluate_op(
    evaluate_params: str,
    model: Input[Model],
    base_model: Input[Model],
    latents: Input[Dataset],
    shards: Input[Dataset],
    evaluation: Output[Artifact],
    eval_metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    import json
    import shutil
    from pathlib import Path

    from components import evaluate as stage
    from components.common.config import EvaluateConfig, validate_section

    result = stage.run(
        validate_section(EvaluateConfig, json.loads(evaluate_params), "evaluate"),
        Path(model.path),
        Path(base_model.path),
        Path(latents.path),
        Path(evaluation.path),
        shards=Path(shards.path),
    )
    metrics = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            eval_metrics.log_metric(key, float(value))
    # The self-contained report, shown by the KFP UI's HTML visualisation.
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    print(result.summary())
    return result.gate_passed


def publish_op(
    publish_params: str,
    model: Input[Model],
    evaluation: Input[Artifact],
    receipt: Output[Artifact],
):
    import json
    from pathlib import Path

    from components import publish as stage
    from components.common.config import PublishConfig, validate_section

    result = stage.run(
        validate_section(PublishConfig, json.loads(publish_params), "publish"),
        Path(model.path),
        Path(evaluation.path),
        Path(receipt.path),
    )
    print(result.summary())


def make_ops(image: str) -> SimpleNamespace:
    """The components above, bound to the project image `image`."""
    funcs = (
        base_model_op,
        pack_op,
        cache_op,
        cache_worker_op,
        cache_merge_op,
        train_op,
        evaluate_op,
        publish_op,
    )
    return SimpleNamespace(
        **{f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in funcs}
    )
