"""The fine-tuning DAG: base_model, pack -> cache -> train -> evaluate -> publish (under
`dsl.If` on evaluate's gate decision).

Built from params (the same schema as params.yaml): each stage's section becomes a
JSON-string parameter with the params file's values as defaults, so KFP's cache key changes
with the config. `source_fingerprint` (a hash of the source data) is a parameter too,
since KFP's cache key does not see file content.
"""

import json

from kfp import dsl

from components.common.config import Params
from pipelines.ops import make_ops


def _json(section) -> str:
    return json.dumps(section.model_dump(), sort_keys=True)


def build_pipeline(params: Params):
    """Return the KFP pipeline function for `params` (image and defaults baked in)."""
    ops = make_ops(params.pipeline.image)

    @dsl.pipeline(
        name=params.pipeline.name,
        description="Fine-tune a text-to-image diffusion model (diffusers recipe)",
    )
    def finetune(
        source: str = params.data.source,
        source_fingerprint: str = "",
        checkpoint_dir: str = "",
        data_params: str = _json(params.data),
        model_params: str = _json(params.model),
        pack_params: str = _json(params.pack),
        cache_params: str = _json(params.cache),
        train_params: str = _json(params.train),
        evaluate_params: str = _json(params.evaluate),
        publish_params: str = _json(params.publish),
    ):
        base = ops.base_model_op(model_params=model_params).set_display_name("base-model")
        pack = ops.pack_op(
            source=source,
            source_fingerprint=source_fingerprint,
            data_params=data_params,
            pack_params=pack_params,
        )
        pack.set_display_name("pack")
        cache = _cache(
            ops,
            params.pipeline.cache_workers,
            cache_params,
            pack,
            base,
            params.pipeline.resources["cache"],
            params.pipeline.retries,
            params.pipeline.image,
        )
        train = ops.train_op(
            train_params=train_params,
            checkpoint_dir=checkpoint_dir,
            latents=cache.outputs["latents"],
            base_model=base.outputs["base_model"],
        ).set_display_name("train")
        evaluation = ops.evaluate_op(
            evaluate_params=evaluate_params,
            model=train.outputs["model"],
            base_model=base.outputs["base_model"],
            latents=cache.outputs["latents"],
            shards=pack.outputs["shards"],
        )
        evaluation.set_display_name("evaluate")
        # The gate: publish runs only when evaluate's decision passed; otherwise the UI
        # shows it skipped (evaluate's report and Metrics say which check failed).
        with dsl.If(evaluation.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
            publish = ops.publish_op(
                publish_params=publish_params,
                model=train.outputs["model"],
                evaluation=evaluation.outputs["evaluation"],
            ).set_display_name("publish")
        stages = dict(base_model=base, pack=pack, train=train, evaluate=evaluation, publish=publish)
        if params.pipeline.cache_workers <= 1:
            stages["cache"] = cache
        for stage, task in stages.items():
            _name_image(task, params.pipeline.image)
            place(task, params.pipeline.resources[stage], params.pipeline.retries)
        if params.pipeline.cache_workers > 1:
            _name_image(cache, params.pipeline.image)
            place(cache, None, params.pipeline.retries)

    return finetune


def place(task, resources, retries) -> None:
    """Requests and limits, GPUs, node selector, tolerations and /dev/shm for one task
    (kfp-kubernetes for the Kubernetes-only parts), and its retry policy."""
    from kfp import kubernetes

    task.set_retry(
        num_retries=retries.count,
        backoff_duration=f"{retries.backoff_s}s",
        backoff_factor=retries.factor,
    )
    if resources is None:
        return
    if resources.cpu:
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
    if resources.memory:
        task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator)
        task.set_accelerator_limit(resources.gpus)
    for key, value in resources.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in resources.tolerations:
        kubernetes.add_toleration(
            task, key=t.key, operator=t.operator, value=t.value, effect=t.effect
        )
    if resources.shm_size:
        kubernetes.empty_dir_mount(
            task,
            volume_name="shm",
            mount_path="/dev/shm",
            medium="Memory",
            size_limit=resources.shm_size,
        )


def _name_image(task, image: str) -> None:
    """The image reference (and digest, when pinned by one) reach the component's
    environment, for the lineage the stage records."""
    task.set_env_variable("T2I_IMAGE", image)
    if "@" in image:
        task.set_env_variable("T2I_IMAGE_DIGEST", image.split("@", 1)[1])


def _cache(ops, workers: int, cache_params, pack, base, resources=None, retries=None, image=""):
    """One cache task, or `workers` in a ParallelFor (disjoint shards) and a merge."""
    inputs = dict(shards=pack.outputs["shards"], base_model=base.outputs["base_model"])
    if workers <= 1:
        return ops.cache_op(cache_params=cache_params, **inputs).set_display_name("cache")
    with dsl.ParallelFor(items=list(range(workers)), name="cache-workers") as index:
        worker = ops.cache_worker_op(
            cache_params=cache_params, worker_index=index, num_workers=workers, **inputs
        ).set_display_name("cache-worker")
        place(worker, resources, retries)
        _name_image(worker, image)
    merge = ops.cache_merge_op(
        num_workers=workers,
        shards=pack.outputs["shards"],
        parts=dsl.Collected(worker.outputs["part"]),
    )
    return merge.set_display_name("cache-merge")
