"""The fine-tuning DAG.

```
summary (exit handler, always) <- [ fingerprint (uncached) -> dsl.If(changed):
    base_model, pack -> cache -> train -> evaluate -> dsl.If(gate passed): publish ]
```

Built from params (the same schema as params.yaml): each stage's section becomes a
JSON-string parameter with the params file's values as defaults, so KFP's cache key
changes with the config. The fingerprint task runs every time (caching off): it
fingerprints the source where it lives and compares it and the config with the newest
published version's lineage; its `run_key` output is an input of every later task, so
KFP's cache keys follow the data. Everything Kubernetes-specific (resources, GPUs,
node selectors, tolerations, /dev/shm, the workspace PVC, secrets, the run id) is
applied here, in `place()`, through kfp-kubernetes.
"""

import json

from kfp import dsl

from components.common.config import Params
from components.common.errors import ConfigError
from pipelines.ops import make_ops

# The stages that mount the workspace: state across runs, and the run notes.
WORKSPACE_STAGES = ("fingerprint", "pack", "cache", "train", "evaluate", "publish", "summary")
# The stages that read data.source (a path on `pipeline.data_pvc`, or a URI).
DATA_STAGES = ("fingerprint", "pack")
# Who gets which secret (as environment variables).
HF_TOKEN_STAGES = ("fingerprint", "base_model", "pack", "publish")
STORAGE_STAGES = ("fingerprint", "pack", "publish")


def _json(section) -> str:
    return json.dumps(section.model_dump(), sort_keys=True)


def build_pipeline(params: Params):
    """Return the KFP pipeline function for `params` (image and defaults baked in).
    ConfigError when the published model would not outlive its pod."""
    check_publish_target(params)
    ops = make_ops(params.pipeline.image)
    p = params.pipeline

    @dsl.pipeline(
        name=p.name,
        description="Fine-tune a text-to-image diffusion model (diffusers recipe)",
    )
    def finetune(
        source: str = params.data.source,
        workspace: str = p.workspace_path if p.workspace_pvc else "",
        retrain: str = p.retrain,
        data_params: str = _json(params.data),
        model_params: str = _json(params.model),
        pack_params: str = _json(params.pack),
        cache_params: str = _json(params.cache),
        train_params: str = _json(params.train),
        evaluate_params: str = _json(params.evaluate),
        publish_params: str = _json(params.publish),
    ):
        parameters = dict(
            data_params=data_params,
            model_params=model_params,
            pack_params=pack_params,
            cache_params=cache_params,
            train_params=train_params,
            evaluate_params=evaluate_params,
            publish_params=publish_params,
        )
        summary = ops.summary_op(workspace=workspace).set_display_name("summary")
        with dsl.ExitHandler(summary, name="run"):
            claim = _create_workspace(p)
            decision = ops.fingerprint_op(
                source=source, workspace=workspace, retrain=retrain, **parameters
            )
            decision.set_display_name("fingerprint").set_caching_options(False)
            if claim is not None:
                decision.after(claim)
            with dsl.If(decision.outputs["Output"] == True, name="changed"):  # noqa: E712
                key = decision.outputs["key"]
                stages = _train_and_publish(ops, p, key, source, workspace, parameters)
        for stage, task in [("summary", summary), ("fingerprint", decision), *stages]:
            place(task, stage, params)

    return finetune


def _create_workspace(p):
    """The CreatePVC task for `pipeline.workspace_create`, or None. It keeps KFP's cache
    on: its inputs (name, size, class) are the same every run, so the first run creates
    the PVC and later runs reuse that result instead of failing on "already exists"."""
    if p.workspace_create is None:
        return None
    from kfp import kubernetes

    claim = kubernetes.CreatePVC(
        pvc_name=p.workspace_pvc,
        access_modes=[p.workspace_create.access_mode],
        size=p.workspace_create.size,
        storage_class_name=p.workspace_create.storage_class,
    )
    return claim.set_display_name("workspace").set_caching_options(True)


def _train_and_publish(ops, p, key, source, workspace, parameters) -> list[tuple[str, object]]:
    """base_model, pack, cache, train, evaluate and (under the gate) publish; returns
    (stage, task) pairs for `place`."""
    base = ops.base_model_op(model_params=parameters["model_params"])
    base.set_display_name("base-model")
    pack = ops.pack_op(
        source=source,
        run_key=key,
        workspace=workspace,
        data_params=parameters["data_params"],
        pack_params=parameters["pack_params"],
    ).set_display_name("pack")
    inputs = dict(shards=pack.outputs["shards"], base_model=base.outputs["base_model"])
    cache_tasks = []
    if p.cache_workers <= 1:
        cache = ops.cache_op(
            run_key=key, workspace=workspace, cache_params=parameters["cache_params"], **inputs
        ).set_display_name("cache")
        cache_tasks.append(("cache", cache))
    else:
        with dsl.ParallelFor(items=list(range(p.cache_workers)), name="cache-workers") as index:
            worker = ops.cache_worker_op(
                run_key=key,
                cache_params=parameters["cache_params"],
                worker_index=index,
                num_workers=p.cache_workers,
                **inputs,
            ).set_display_name("cache-worker")
        cache = ops.cache_merge_op(
            run_key=key,
            workspace=workspace,
            num_workers=p.cache_workers,
            shards=pack.outputs["shards"],
            parts=dsl.Collected(worker.outputs["part"]),
        ).set_display_name("cache-merge")
        cache_tasks += [("cache_worker", worker), ("cache_merge", cache)]
    train = ops.train_op(
        run_key=key,
        workspace=workspace,
        train_params=parameters["train_params"],
        latents=cache.outputs["latents"],
        base_model=base.outputs["base_model"],
    ).set_display_name("train")
    evaluation = ops.evaluate_op(
        run_key=key,
        workspace=workspace,
        evaluate_params=parameters["evaluate_params"],
        model=train.outputs["model"],
        base_model=base.outputs["base_model"],
        latents=cache.outputs["latents"],
        shards=pack.outputs["shards"],
    ).set_display_name("evaluate")
    # The gate: publish runs only when evaluate's decision passed; otherwise the UI
    # shows it skipped (evaluate's report and Metrics say which check failed).
    with dsl.If(evaluation.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
        publish = ops.publish_op(
            run_key=key,
            workspace=workspace,
            publish_params=parameters["publish_params"],
            model=train.outputs["model"],
            evaluation=evaluation.outputs["evaluation"],
        ).set_display_name("publish")
    return [
        ("base_model", base),
        ("pack", pack),
        *cache_tasks,
        ("train", train),
        ("evaluate", evaluation),
        ("publish", publish),
    ]


def place(task, stage: str, params: Params) -> None:
    """Everything Kubernetes about one task: retries, requests and limits, GPUs, node
    selector, tolerations, /dev/shm, the workspace PVC, secrets as environment
    variables, the run id and the image reference. (`cache_worker` gets the cache
    stage's resources and no workspace; `cache_merge` no resources of its own.)"""
    from kfp import kubernetes

    p = params.pipeline
    task.set_retry(
        num_retries=p.retries.count,
        backoff_duration=f"{p.retries.backoff_s}s",
        backoff_factor=p.retries.factor,
    )
    task.set_env_variable("T2I_IMAGE", p.image)
    if "@" in p.image:
        task.set_env_variable("T2I_IMAGE_DIGEST", p.image.split("@", 1)[1])
    # The run id (the notes' folder) from the label KFP puts on every pod of a run.
    kubernetes.use_field_path_as_env(
        task, env_name="T2I_RUN_ID", field_path="metadata.labels['pipeline/runid']"
    )
    if p.workspace_pvc and stage in (*WORKSPACE_STAGES, "cache_merge"):
        kubernetes.mount_pvc(task, pvc_name=p.workspace_pvc, mount_path=p.workspace_path)
    if p.data_pvc and stage in DATA_STAGES:
        kubernetes.mount_pvc(task, pvc_name=p.data_pvc, mount_path=p.data_path)
    for secret_name, to_env in _secrets(p, stage):
        kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=to_env)
    resources = p.resources.get("cache" if stage == "cache_worker" else stage)
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


def _secrets(p, stage: str) -> list[tuple[str, dict[str, str]]]:
    """(secret name, {key: environment variable}) for the secrets `stage` gets."""
    found = []
    if p.hf_token_secret and stage in HF_TOKEN_STAGES:
        found.append((p.hf_token_secret.name, {p.hf_token_secret.key: "HF_TOKEN"}))
    if p.storage_secret and stage in STORAGE_STAGES:
        found.append((p.storage_secret.name, {k: k for k in p.storage_secret.keys}))
    if p.notify_secret and stage == "summary":
        found.append((p.notify_secret.name, {p.notify_secret.key: "T2I_NOTIFY_URL"}))
    return found


def check_publish_target(params: Params) -> None:
    """A registry that is a plain path needs the workspace: a pod's own disk is gone
    when the pod is."""
    pub, p = params.publish, params.pipeline
    if pub.target == "hub" or "://" in pub.registry or p.workspace_pvc:
        return
    raise ConfigError(
        f"publish.registry {pub.registry!r} would be written inside the publish pod and lost: "
        "set pipeline.workspace_pvc (the registry then lives on it), a registry URI "
        "(s3://bucket/registry), or publish.target: hub"
    )
