"""Thin KFP components: a signature (what KFP passes) and one call to
`pipelines.stages.run_stage`, which runs the stage from its JSON params and artifact
paths (the same `run()` as the CLI). A component's inputs are its KFP cache key: each
takes what its stage reads and nothing wider (pack: the data's fingerprint and the
data and pack configs; cache: the shards, the base model and its config; train: the
latents, the base model and its config; evaluate: the model, its inputs and its
config), so a change to one stage's config re-runs that stage and those after it.

No logic lives here and nothing is installed at run time: every component runs the
project image (`install_kfp_package=False`, no `packages_to_install`). Stage configs
arrive as JSON-string parameters (KFP dict parameters cannot hold nulls). The image is
a compile-time setting, so the components are made by `make_ops(image)`.
"""

from types import SimpleNamespace
from typing import List  # noqa: UP035 - KFP reads the annotation and wants typing.List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def workspace_op(pvc_name: str, create: str, shared: bool):
    # Ensures the workspace PVC exists (creating it when `create`, a JSON claim, is set)
    # before anything mounts it.
    from pipelines.stages import run_stage

    run_stage("workspace", locals())


def fingerprint_op(
    source: str,
    workspace: str,
    retrain: str,
    data_params: str,
    model_params: str,
    pack_params: str,
    cache_params: str,
    train_params: str,
    evaluate_params: str,
    publish_params: str,
    key: dsl.OutputPath(str),
    reason: dsl.OutputPath(str),
    data_key: dsl.OutputPath(str),
    train_key: dsl.OutputPath(str),
) -> bool:
    # Returns `changed`; the run key, the reason and each stage's cache key part are
    # output parameters. (kfp.local does not resolve a NamedTuple field in a dsl.If.)
    from pipelines.stages import run_stage

    return run_stage("fingerprint", locals())


def base_model_op(model_params: str, base_model: Output[Model]):
    from pipelines.stages import run_stage

    run_stage("base_model", locals())


def pack_op(
    source: str,
    data_key: str,
    workspace: str,
    data_params: str,
    pack_params: str,
    shards: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("pack", locals())


def pack_worker_op(
    source: str,
    data_key: str,
    workspace: str,
    data_params: str,
    pack_params: str,
    worker_index: int,
    num_workers: int,
    part: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("pack_worker", locals())


def pack_merge_op(
    source: str,
    data_key: str,
    workspace: str,
    data_params: str,
    pack_params: str,
    num_workers: int,
    parts: Input[List[Dataset]],  # noqa: UP006
    shards: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("pack_merge", locals())


def cache_op(
    workspace: str,
    processes: int,
    cache_params: str,
    shards: Input[Dataset],
    base_model: Input[Model],
    latents: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("cache", locals())


def cache_worker_op(
    workspace: str,
    cache_params: str,
    worker_index: int,
    num_workers: int,
    shards: Input[Dataset],
    base_model: Input[Model],
    part: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("cache_worker", locals())


def cache_merge_op(
    workspace: str,
    cache_params: str,
    num_workers: int,
    shards: Input[Dataset],
    parts: Input[List[Dataset]],  # noqa: UP006
    latents: Output[Dataset],
):
    from pipelines.stages import run_stage

    run_stage("cache_merge", locals())


def check_op(
    workspace: str,
    processes: int,
    train_params: str,
    evaluate_params: str,
    latents: Input[Dataset],
    base_model: Input[Model],
):
    from pipelines.stages import run_stage

    run_stage("check", locals())


def train_op(
    workspace: str,
    train_key: str,
    launch: str,
    train_params: str,
    latents: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    reports: Output[Artifact],
    train_metrics: Output[Metrics],
):
    from pipelines.stages import run_stage

    run_stage("train", locals())


def evaluate_op(
    workspace: str,
    evaluate_params: str,
    model: Input[Model],
    base_model: Input[Model],
    latents: Input[Dataset],
    shards: Input[Dataset],
    evaluation: Output[Artifact],
    eval_metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    from pipelines.stages import run_stage

    return run_stage("evaluate", locals())


def publish_op(
    run_key: str,
    workspace: str,
    publish_params: str,
    model: Input[Model],
    evaluation: Input[Artifact],
    receipt: Output[Artifact],
):
    from pipelines.stages import run_stage

    run_stage("publish", locals())


def summary_op(workspace: str, status: dsl.PipelineTaskFinalStatus, summary: Output[Artifact]):
    from pipelines.stages import run_stage

    run_stage("summary", locals())


def make_ops(image: str) -> SimpleNamespace:
    """The components above, bound to the project image `image`."""
    funcs = (
        workspace_op,
        fingerprint_op,
        base_model_op,
        pack_op,
        pack_worker_op,
        pack_merge_op,
        cache_op,
        cache_worker_op,
        cache_merge_op,
        check_op,
        train_op,
        evaluate_op,
        publish_op,
        summary_op,
    )
    return SimpleNamespace(
        **{f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in funcs}
    )
