"""The fine-tuning DAG.

```
workspace (uncached) -> summary (exit handler, uncached, always) <- [ fingerprint (uncached)
    -> dsl.If(changed): base_model, pack -> cache -> train -> evaluate
    -> dsl.If(gate passed): publish (uncached) ]
```

Built from params (the same schema as params.yaml): each stage's section becomes a
JSON-string parameter with the params file's values as defaults, so KFP's cache key
changes with the config. **KFP's cache is a contract here**: a task whose outputs are a
pure function of its inputs (base_model, pack, cache, train, evaluate) is cached, and
its inputs are exactly what it reads (the fingerprint task hands pack the data's
fingerprint; later stages see their upstream artifacts and their own config), so a
change to evaluation re-runs evaluate and publish, not train. A task whose job is an
effect outside KFP (workspace, fingerprint, publish, summary: the PVC, the decision,
the registry or Hub, the webhook) never comes from the cache. Everything Kubernetes-
specific (resources, GPUs, node selectors, tolerations, /dev/shm, the workspace PVC,
secrets, retries, the run id) is applied in `place()` through kfp-kubernetes.
"""

import json

from kfp import dsl

from components.common.config import Params
from components.common.errors import ConfigError
from pipelines.ops import make_ops

# The stages that mount the workspace: state across runs, and the run notes.
WORKSPACE_STAGES = (
    "fingerprint", "pack", "pack_worker", "pack_merge", "cache", "cache_worker", "cache_merge",
    "check", "train",
    "evaluate", "publish", "summary",
)  # fmt: skip
# The stages that read data.source (a path on `pipeline.data_pvc`, or a URI).
DATA_STAGES = ("fingerprint", "pack", "pack_worker", "pack_merge")
# Who gets which secret (as environment variables): every stage that may read the Hub
# (a gated base model, dataset, CLIP or feature model, a non_ema_revision) gets HF_TOKEN.
HF_TOKEN_STAGES = (
    "fingerprint", "base_model", "pack", "pack_worker", "pack_merge", "cache", "cache_worker",
    "train", "evaluate", "publish",
)  # fmt: skip
STORAGE_STAGES = ("fingerprint", "pack", "pack_worker", "pack_merge", "publish")
# With pipeline.store: the stages that write shards there, and those that read them.
STORE_WRITERS = ("pack", "pack_worker", "pack_merge", "cache", "cache_worker", "cache_merge")
STORE_READERS = (*STORE_WRITERS, "check", "train", "evaluate")
# Tasks whose job is an effect outside KFP: never served from KFP's cache.
UNCACHED_STAGES = ("workspace", "fingerprint", "publish", "summary")
SCRATCH = "/scratch"  # a stage's local disk, with resources.<stage>.ephemeral_storage


def _json(section) -> str:
    return json.dumps(section.model_dump(), sort_keys=True)


def build_pipeline(params: Params, in_cluster: bool = True):
    """Return the KFP pipeline function for `params` (image and defaults baked in).
    `in_cluster=False` (a local run) leaves out the task that needs the Kubernetes API.
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
        claim = _workspace_task(ops, p) if in_cluster else None
        summary = ops.summary_op(workspace=workspace).set_display_name("summary")
        with dsl.ExitHandler(summary, name="run"):
            decision = ops.fingerprint_op(
                source=source, workspace=workspace, retrain=retrain, **parameters
            )
            decision.set_display_name("fingerprint")
            if claim is not None:
                decision.after(claim)
            with dsl.If(decision.outputs["Output"] == True, name="changed"):  # noqa: E712
                stages = _train_and_publish(ops, p, decision, source, workspace, parameters)
        placed = [("summary", summary), ("fingerprint", decision), *stages]
        if claim is not None:
            placed.append(("workspace", claim))
        for stage, task in placed:
            place(task, stage, params)

    return finetune


def _workspace_task(ops, p):
    """The task that makes sure the workspace PVC exists before anything mounts it, or
    None without a workspace. With `pipeline.workspace_create` it creates the PVC when
    it is missing (and reuses one that exists, whoever made it); without, a missing PVC
    fails the run at once in one line. It runs before the exit handler, whose summary
    mounts the PVC too and must never wait, Pending, for one that does not exist."""
    if not p.workspace_pvc:
        return None
    create = p.workspace_create.model_dump() if p.workspace_create is not None else None
    task = ops.workspace_op(
        pvc_name=p.workspace_pvc,
        create=json.dumps(create) if create else "",
        shared=p.shared_workspace,  # train nodes or cache workers mount it at once: RWX
    )
    return task.set_display_name("workspace")


def _train_and_publish(ops, p, decision, source, workspace, parameters) -> list[tuple]:
    """base_model, pack, cache, train, evaluate and (under the gate) publish; returns
    (stage, task) pairs for `place`. Each task's inputs are its cache key."""
    base = ops.base_model_op(model_params=parameters["model_params"])
    base.set_display_name("base-model")
    packing = dict(
        source=source,
        data_key=decision.outputs["data_key"],
        workspace=workspace,
        data_params=parameters["data_params"],
        pack_params=parameters["pack_params"],
    )
    pack_tasks = []
    if p.pack_workers <= 1:
        pack = ops.pack_op(**packing).set_display_name("pack")
        pack_tasks.append(("pack", pack))
    else:
        with dsl.ParallelFor(items=list(range(p.pack_workers)), name="pack-workers") as index:
            worker = ops.pack_worker_op(
                **packing, worker_index=index, num_workers=p.pack_workers
            ).set_display_name("pack-worker")
        pack = ops.pack_merge_op(
            **packing, num_workers=p.pack_workers, parts=dsl.Collected(worker.outputs["part"])
        ).set_display_name("pack-merge")
        pack_tasks += [("pack_worker", worker), ("pack_merge", pack)]
    inputs = dict(shards=pack.outputs["shards"], base_model=base.outputs["base_model"])
    cache_tasks = []
    if p.cache_workers <= 1:
        cache = ops.cache_op(
            workspace=workspace,
            processes=max(1, p.resources["cache"].gpus),
            cache_params=parameters["cache_params"],
            **inputs,
        ).set_display_name("cache")
        cache_tasks.append(("cache", cache))
    else:
        with dsl.ParallelFor(items=list(range(p.cache_workers)), name="cache-workers") as index:
            worker = ops.cache_worker_op(
                workspace=workspace,
                cache_params=parameters["cache_params"],
                worker_index=index,
                num_workers=p.cache_workers,
                **inputs,
            ).set_display_name("cache-worker")
        cache = ops.cache_merge_op(
            workspace=workspace,
            cache_params=parameters["cache_params"],
            num_workers=p.cache_workers,
            shards=pack.outputs["shards"],
            parts=dsl.Collected(worker.outputs["part"]),
        ).set_display_name("cache-merge")
        cache_tasks += [("cache_worker", worker), ("cache_merge", cache)]
    # What would fail later (streams, buckets, the base model, evaluate's validation
    # split) fails here, before a GPU trains a step; train waits for it (an ordering
    # only: train's cache key stays its own inputs).
    check = ops.check_op(
        workspace=workspace,
        processes=max(1, p.resources["train"].gpus) * p.resources["train"].nodes,
        train_params=parameters["train_params"],
        evaluate_params=parameters["evaluate_params"],
        latents=cache.outputs["latents"],
        base_model=base.outputs["base_model"],
    ).set_display_name("check")
    train = ops.train_op(
        workspace=workspace,
        train_key=decision.outputs["train_key"],
        launch=launch_spec(p),
        train_params=parameters["train_params"],
        latents=cache.outputs["latents"],
        base_model=base.outputs["base_model"],
    ).set_display_name("train")
    train.after(check)
    evaluation = ops.evaluate_op(
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
            run_key=decision.outputs["key"],
            workspace=workspace,
            publish_params=parameters["publish_params"],
            model=train.outputs["model"],
            evaluation=evaluation.outputs["evaluation"],
        ).set_display_name("publish")
    return [
        ("base_model", base),
        *pack_tasks,
        *cache_tasks,
        ("check", check),
        ("train", train),
        ("evaluate", evaluation),
        ("publish", publish),
    ]


def launch_spec(p) -> str:
    """What the train task needs to know to train where it should (one process, one per
    GPU of its pod, or a TrainJob on several nodes): the train resources, the trainer
    settings, the image, the workspace and the HF token secret's name."""
    keep = ("name", "image", "workspace_pvc", "workspace_path", "hf_token_secret", "trainer")
    spec = {k: v for k, v in p.model_dump(mode="json").items() if k in keep}
    spec["resources"] = {"train": p.resources["train"].model_dump(mode="json")}
    return json.dumps(spec, sort_keys=True)


def place(task, stage: str, params: Params) -> None:
    """Everything Kubernetes about one task: caching (off for the tasks whose job is an
    effect outside KFP), retries (for the stages in `pipeline.retries.stages`), requests
    and limits, GPUs, node selector, tolerations, /dev/shm, the workspace PVC, secrets
    as environment variables, the run id and the image reference. (`cache_worker` gets
    the cache stage's resources; `cache_merge` no resources of its
    own; `workspace` a small request and no mounts.)"""
    from kfp import kubernetes

    p = params.pipeline
    task.set_caching_options(stage not in UNCACHED_STAGES)
    if stage in p.retries.stages and p.retries.count:
        task.set_retry(
            num_retries=p.retries.count,
            backoff_duration=f"{p.retries.backoff_s}s",
            backoff_factor=p.retries.factor,
        )
    task.set_env_variable("T2I_IMAGE", p.image)
    if "@" in p.image:
        task.set_env_variable("T2I_IMAGE_DIGEST", p.image.split("@", 1)[1])
    if stage in ("workspace", "check"):  # small: an API call, a manifest read
        task.set_cpu_request("100m").set_memory_request("512Mi").set_memory_limit("512Mi")
    if stage == "workspace":
        return
    # The run id (the notes' folder) from the label KFP puts on every pod of a run.
    kubernetes.use_field_path_as_env(
        task, env_name="T2I_RUN_ID", field_path="metadata.labels['pipeline/runid']"
    )
    if p.workspace_pvc and stage in WORKSPACE_STAGES:
        kubernetes.mount_pvc(task, pvc_name=p.workspace_pvc, mount_path=p.workspace_path)
        # Weights' sha256 by stat, kept across pods (a resume hashes nothing unchanged).
        task.set_env_variable("T2I_HASH_CACHE", f"{p.workspace_path}/.hashes")
    if p.data_pvc and stage in DATA_STAGES:
        kubernetes.mount_pvc(task, pvc_name=p.data_pvc, mount_path=p.data_path)
    if p.store and stage in STORE_WRITERS:
        task.set_env_variable("T2I_STORE", p.store)
    for secret_name, to_env in _secrets(p, stage):
        kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=to_env)
    resources = p.resources.get({"cache_worker": "cache", "pack_worker": "pack"}.get(stage, stage))
    if resources is None:
        return
    if stage == "train" and resources.nodes > 1:
        # The launcher: it creates and follows the TrainJob, whose nodes get the GPUs.
        task.set_cpu_request("500m").set_memory_request("2Gi").set_memory_limit("2Gi")
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
    if resources.ephemeral_storage:
        # KFP's IR has no ephemeral-storage request: the stage's local writes go to a
        # volume of that size instead of the node's disk (no eviction under pressure).
        kubernetes.add_ephemeral_volume(
            task,
            volume_name="scratch",
            mount_path=SCRATCH,
            access_modes=["ReadWriteOnce"],
            size=resources.ephemeral_storage,
            storage_class_name=p.scratch_storage_class,
        )
        task.set_env_variable("TMPDIR", SCRATCH)
        task.set_env_variable("HF_HOME", f"{SCRATCH}/huggingface")
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
    if p.storage_secret and (stage in STORAGE_STAGES or (p.store and stage in STORE_READERS)):
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
