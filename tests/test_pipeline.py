"""The KFP DAG: compiled YAML kept in sync, thin components, a local run."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from components.cli import main
from components.common import remote
from components.common.config import load_params
from components.common.errors import ConfigError
from components.common.io import sha256_file
from pipelines import commands
from pipelines.commands import compile_pipeline, run_local

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled" / "finetune.yaml"


def test_committed_yaml_matches_a_fresh_compile(tmp_path):
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "finetune.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/compiled/finetune.yaml is stale: run `t2i pipeline compile` and commit it"
    )


def load(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec) of a compiled package."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the compiled DAG, nested groups (exit handler, conditions, loops)
    included, by task name; each with `_in`, the DAG that holds it."""
    dags = {"root": spec["root"]["dag"]}
    dags |= {name: c["dag"] for name, c in spec["components"].items() if "dag" in c}
    return {t: {**task, "_in": d} for d, dag in dags.items() for t, task in dag["tasks"].items()}


def k8s_of(platform: dict) -> dict:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_components_are_thin_and_run_the_project_image():
    spec, _ = load(COMPILED)
    params = load_params(REPO / "params.yaml")
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 10
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == params.pipeline.image
        text = json.dumps(container)
        assert "pip install" not in text and "pip3 install" not in text
        # the body is the signature and one call: run_stage(<stage>, locals())
        body = container["command"][-1].split("\ndef ", 1)[1]
        assert body.count("run_stage(") == 1 and len(body.splitlines()) < 30
    tasks = all_tasks(spec)
    assert set(tasks) == {
        "workspace-op",
        "summary-op",
        "exit-handler-1",
        "fingerprint-op",
        "condition-2",
        "base-model-op",
        "pack-op",
        "cache-op",
        "check-op",
        "train-op",
        "evaluate-op",
        "condition-3",
        "publish-op",
    }
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-op", "check-op"]


# What the backend must never serve from its cache: their job is an effect outside KFP.
SIDE_EFFECTS = ("workspace-op", "fingerprint-op", "publish-op", "summary-op")
PURE = ("base-model-op", "pack-op", "cache-op", "check-op", "train-op", "evaluate-op")


def test_side_effect_tasks_are_never_cached_and_pure_ones_are():
    tasks = all_tasks(load(COMPILED)[0])
    for name in SIDE_EFFECTS:
        assert tasks[name]["cachingOptions"] == {}, name  # enableCache absent: off
    for name in PURE:
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name


def test_each_tasks_cache_key_is_what_it_reads():
    """KFP's cache key is a task's inputs: pack gets the data's fingerprint (it cannot
    see file content) and the data and pack configs; cache, train and evaluate their
    upstream artifacts and their own config; nothing gets the whole run's key, so one
    stage's config change misses only that stage and those after it."""
    spec, _ = load(COMPILED)
    tasks = all_tasks(spec)

    def inputs(name):
        task = tasks[name]["inputs"]
        return set(task.get("parameters", {})) | set(task.get("artifacts", {}))

    assert inputs("pack-op") == {"source", "data_key", "workspace", "data_params", "pack_params"}
    assert tasks["pack-op"]["inputs"]["parameters"]["data_key"] == {
        "componentInputParameter": "pipelinechannel--fingerprint-op-data_key"
    }
    assert inputs("base-model-op") == {"model_params"}
    assert inputs("cache-op") == {"workspace", "processes", "cache_params", "shards", "base_model"}
    assert inputs("check-op") == {
        "workspace", "processes", "train_params", "evaluate_params", "latents", "base_model"
    }  # fmt: skip
    assert inputs("train-op") == {
        "workspace", "train_key", "launch", "train_params", "latents", "base_model"
    }  # fmt: skip
    assert inputs("evaluate-op") == {
        "workspace", "evaluate_params", "model", "base_model", "latents", "shards"
    }  # fmt: skip
    assert "run_key" in inputs("publish-op")  # uncached: its lineage names the run
    for name in PURE:
        assert not {"run_key", "retrain"} & inputs(name), name


def test_fingerprint_decides_first_and_the_workspace_is_made_sure_of_before_the_run():
    spec, _ = load(COMPILED)
    tasks = all_tasks(spec)
    fingerprint = tasks["fingerprint-op"]
    assert fingerprint["_in"] == "comp-exit-handler-1"
    outputs = spec["components"]["comp-fingerprint-op"]["outputDefinitions"]["parameters"]
    assert set(outputs) == {"Output", "key", "reason", "data_key", "train_key"}
    # A missing PVC is one clear failure before anything mounts it (the summary too).
    assert tasks["workspace-op"]["_in"] == "root"
    assert tasks["exit-handler-1"]["dependentTasks"] == ["workspace-op"]
    changed = tasks["condition-2"]
    assert changed["taskInfo"]["name"] == "changed"
    assert changed["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--fingerprint-op-Output'] == true"
    )
    assert tasks["base-model-op"]["_in"] == "comp-condition-2"
    # No client-side fingerprint: the pipeline's parameters are the source and configs.
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert "source_fingerprint" not in parameters and "checkpoint_dir" not in parameters
    assert parameters["retrain"]["defaultValue"] == "on_change"


def test_exit_handler_always_runs_the_summary():
    spec, platform = load(COMPILED)
    tasks = all_tasks(spec)
    summary = tasks["summary-op"]
    assert summary["_in"] == "root"
    assert summary["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert summary["dependentTasks"] == ["exit-handler-1"]
    status = spec["components"]["comp-summary-op"]["inputDefinitions"]["parameters"]["status"]
    assert status["parameterType"] == "TASK_FINAL_STATUS"


def test_publish_runs_under_the_gate_and_evaluate_shows_html_and_metrics():
    spec, _ = load(COMPILED)
    tasks = all_tasks(spec)
    gate = tasks["condition-3"]
    assert gate["taskInfo"]["name"] == "gate-passed"
    channel = gate["inputs"]["parameters"]["pipelinechannel--evaluate-op-Output"]
    assert channel["taskOutputParameter"]["producerTask"] == "evaluate-op"
    assert gate["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-op-Output'] == true"
    )
    assert tasks["publish-op"]["_in"] == "comp-condition-3"
    outputs = spec["components"]["comp-evaluate-op"]["outputDefinitions"]
    kinds = {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()}
    assert kinds["report"] == "system.HTML" and kinds["eval_metrics"] == "system.Metrics"
    assert outputs["parameters"]["Output"]["parameterType"] == "BOOLEAN"


def test_cache_workers_compile_to_a_parallel_for_and_a_merge(tmp_path):
    params = load_params(REPO / "params.yaml", ["pipeline.cache_workers=4"])
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    tasks = all_tasks(spec)
    assert "cache-merge-op" in tasks and "cache-op" not in tasks
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2, 3]"
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-merge-op", "check-op"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["train_params"]["defaultValue"]) == params.train.model_dump()
    worker = spec["deploymentSpec"]["executors"]["exec-cache-worker-op"]["container"]
    assert worker["resources"]["accelerator"]["resourceCount"] == "1"  # each worker: a GPU
    k8s = k8s_of(platform)
    # Shards are by reference, and the workers write into the workspace's store.
    assert "pvcMount" in k8s["exec-cache-worker-op"]
    assert "pvcMount" in k8s["exec-cache-merge-op"]  # it merges there, and leaves a note
    with pytest.raises(ConfigError, match="cache_workers > 1 needs a ReadWriteMany"):
        load_params(
            REPO / "params.yaml",
            ["pipeline.cache_workers=4", "pipeline.workspace_create={storage_class: fast}"],
        )


def test_pack_workers_compile_to_a_parallel_for_and_a_merge(tmp_path):
    params = load_params(REPO / "params.yaml", ["pipeline.pack_workers=3"])
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    tasks = all_tasks(spec)
    assert "pack-merge-op" in tasks and "pack-op" not in tasks
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]"
    assert "pack-merge-op" in tasks["cache-op"]["dependentTasks"]
    executors = spec["deploymentSpec"]["executors"]
    worker = executors["exec-pack-worker-op"]["container"]["resources"]
    assert worker["resourceCpuLimit"] == "8"  # each worker: the pack stage's resources
    k8s = k8s_of(platform)
    assert "pvcMount" in k8s["exec-pack-worker-op"] and "pvcMount" in k8s["exec-pack-merge-op"]
    with pytest.raises(ConfigError, match="pack_workers > 1 needs pipeline.workspace_pvc"):
        load_params(
            REPO / "params.yaml",
            ["pipeline.pack_workers=2", "pipeline.workspace_pvc=null", "publish.registry=s3://m/r"],
        )
    with pytest.raises(ConfigError, match="pack_workers > 1 needs a ReadWriteMany"):
        load_params(
            REPO / "params.yaml",
            ["pipeline.pack_workers=2", "pipeline.workspace_create={storage_class: fast}"],
        )


def test_stage_resources_gpus_node_selectors_tolerations_shm_and_retries(tmp_path):
    params = load_params(
        REPO / "params.yaml",
        [
            "pipeline.resources.train.gpus=4",
            "pipeline.resources.train.accelerator=nvidia.com/gpu",
            "pipeline.resources.train.node_selector="
            "{cloud.google.com/gke-accelerator: nvidia-h100-80gb}",
            "pipeline.resources.train.tolerations="
            "[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
            "pipeline.retries.count=3",
            "pipeline.resources.pack.ephemeral_storage=500Gi",
            "pipeline.scratch_storage_class=fast-local",
        ],
    )
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    executors = spec["deploymentSpec"]["executors"]
    # Local disk: a sized volume (KFP's IR has no ephemeral-storage request) as TMPDIR.
    (scratch,) = k8s_of(platform)["exec-pack-op"]["genericEphemeralVolume"]
    assert scratch["mountPath"] == "/scratch" and scratch["size"] == "500Gi"
    assert scratch["storageClassName"] == "fast-local"
    env = {e["name"]: e["value"] for e in executors["exec-pack-op"]["container"]["env"]}
    assert env["TMPDIR"] == "/scratch" and env["HF_HOME"] == "/scratch/huggingface"
    assert "genericEphemeralVolume" not in k8s_of(platform)["exec-cache-op"]
    train = executors["exec-train-op"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["accelerator"]["resourceCount"] == "4"
    assert train["resourceCpuLimit"] == "8" and train["resourceMemoryLimit"] == "32Gi"  # kept
    for stage in ("cache", "evaluate"):  # GPU stages by default
        assert executors[f"exec-{stage}-op"]["container"]["resources"]["accelerator"]
    for stage in ("fingerprint", "base-model", "pack", "publish", "summary"):  # CPU stages
        assert "accelerator" not in executors[f"exec-{stage}-op"]["container"]["resources"]
    k8s = k8s_of(platform)
    assert k8s["exec-train-op"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
    }
    assert k8s["exec-train-op"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    for stage in ("cache", "train", "evaluate"):
        (shm,) = k8s[f"exec-{stage}-op"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    ops = {n: t for n, t in all_tasks(spec).items() if n.endswith("-op")}
    assert len(ops) == 10
    # Retries are for pods a cluster loses: the GPU stages; a failure elsewhere (bad
    # config or data) must not be retried with back-off.
    retried = {n for n, t in ops.items() if "retryPolicy" in t}
    assert retried == {"cache-op", "train-op", "evaluate-op"}
    for name in retried:
        assert ops[name]["retryPolicy"]["maxRetryCount"] == 3, name
        assert ops[name]["retryPolicy"]["backoffDuration"] == "60s", name


def test_workspace_secrets_and_run_id_in_the_platform_spec(tmp_path):
    params = load_params(
        REPO / "params.yaml",
        [
            "pipeline.workspace_pvc=team-ws",
            "pipeline.workspace_path=/ws",
            "pipeline.hf_token_secret={name: hf-token, key: token}",
            "pipeline.storage_secret={name: s3-creds}",
            "pipeline.notify_secret={name: slack, key: url}",
            "pipeline.data_pvc=datasets",
            "data.source=/data/shapes",
        ],
    )
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    k8s = k8s_of(platform)
    for stage in ("fingerprint", "pack"):  # the data volume, where the source is read
        mounts = {m["constant"]: m["mountPath"] for m in k8s[f"exec-{stage}-op"]["pvcMount"]}
        assert mounts == {"team-ws": "/ws", "datasets": "/data"}, stage
        k8s[f"exec-{stage}-op"]["pvcMount"] = [
            m for m in k8s[f"exec-{stage}-op"]["pvcMount"] if m["constant"] == "team-ws"
        ]

    def env_from(stage: str) -> dict[str, tuple[str, str]]:
        return {
            e["envVar"]: (s["secretName"], e["secretKey"])
            for s in k8s[f"exec-{stage}-op"].get("secretAsEnv", [])
            for e in s["keyToEnv"]
        }

    for stage in ("fingerprint", "pack", "cache", "train", "evaluate", "publish", "summary"):
        (mount,) = k8s[f"exec-{stage}-op"]["pvcMount"]
        assert mount["constant"] == "team-ws" and mount["mountPath"] == "/ws", stage
    assert "pvcMount" not in k8s["exec-base-model-op"]
    # Every stage that may read the Hub (a gated base model, a CLIP or feature model, a
    # non_ema_revision) gets the token; the summary and the workspace task do not.
    for stage in ("fingerprint", "base-model", "pack", "cache", "train", "evaluate", "publish"):
        assert env_from(stage)["HF_TOKEN"] == ("hf-token", "token"), stage
    for stage in ("fingerprint", "pack", "publish"):
        assert env_from(stage)["AWS_ACCESS_KEY_ID"] == ("s3-creds", "AWS_ACCESS_KEY_ID")
        assert env_from(stage)["AWS_SECRET_ACCESS_KEY"][0] == "s3-creds"
    for stage in ("cache", "train", "evaluate"):  # no storage secret where none is needed
        assert set(env_from(stage)) == {"HF_TOKEN"}, stage
    assert env_from("summary") == {"T2I_NOTIFY_URL": ("slack", "url")}
    assert "exec-workspace-op" not in k8s or not k8s["exec-workspace-op"].get("pvcMount")
    for name, executor in k8s.items():
        if name == "exec-workspace-op":
            continue
        (run_id,) = executor["fieldPathAsEnv"]
        assert run_id == {"name": "T2I_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["workspace"]["defaultValue"] == "/ws"


def test_no_token_or_secret_value_in_the_compiled_yaml(tmp_path, monkeypatch):
    """Secrets are names of Kubernetes secrets; their values never reach the package."""
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETVALUE123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AWSSECRETVALUE456")
    params = load_params(
        REPO / "params.yaml",
        [
            "pipeline.hf_token_secret={name: hf-token, key: token}",
            "pipeline.storage_secret={name: s3}",
        ],
    )
    text = compile_pipeline(params, tmp_path / "p.yaml").read_text()
    assert "hf_SECRETVALUE123" not in text and "AWSSECRETVALUE456" not in text
    spec, _ = load(tmp_path / "p.yaml")
    for name, p in spec["root"]["inputDefinitions"]["parameters"].items():
        assert "token" not in name.lower() and "secret" not in name.lower(), name
        assert "hf_" not in str(p.get("defaultValue", "")), name
    with pytest.raises(ConfigError, match="publish.hub_token: refused"):
        load_params(None, ["publish.hub_token=hf_x"])


def test_a_registry_on_the_pods_own_disk_is_refused(tmp_path):
    params = load_params(REPO / "params.yaml", ["pipeline.workspace_pvc=null"])
    with pytest.raises(ConfigError, match="publish.registry 'artifacts/registry' would be written"):
        compile_pipeline(params, tmp_path / "p.yaml")
    for ok in ("publish.registry=s3://models/registry", "publish.target=hub"):
        extra = ["publish.hub_model_id=org/m"] if "hub" in ok else []
        compile_pipeline(
            load_params(REPO / "params.yaml", ["pipeline.workspace_pvc=null", ok, *extra]),
            tmp_path / "p.yaml",
        )
    assert not (tmp_path / "p.yaml.tmp").exists()


def test_bad_resources_name_the_key():
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        load_params(None, ["pipeline.resources.trian.gpus=1"])
    with pytest.raises(ConfigError, match="pipeline.resources.train.memory"):
        load_params(None, ["pipeline.resources.train.memory=lots"])


def test_compile_with_overrides_leaves_the_committed_yaml_alone(tmp_path, monkeypatch, capsys):
    (tmp_path / "pipelines" / "compiled").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    committed = tmp_path / "pipelines" / "compiled" / "finetune.yaml"
    committed.write_text("committed\n")
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "compile", "--set", "train.learning_rate=5e-4"]) == 0
    assert committed.read_text() == "committed\n"
    local = tmp_path / "artifacts" / "pipeline" / "finetune.yaml"
    assert "0.0005" in local.read_text()
    assert "artifacts/pipeline/finetune.yaml" in capsys.readouterr().out
    assert main(["pipeline", "compile", "--set", "train.seed=3", "--output", "x.yaml"]) == 0
    assert (tmp_path / "x.yaml").is_file() and committed.read_text() == "committed\n"
    assert main(["pipeline", "compile"]) == 0  # no overrides: the committed file
    assert committed.read_text() == COMPILED.read_text()


# A local DAG run in seconds: a few VAE and train steps, one sampling step, small shards.
SMALL_RUN = [
    "model.tiny_vae_steps=8",
    "model.tiny_prediction_type=epsilon",
    "train.max_train_steps=4",
    "train.train_batch_size=4",
    "evaluate.num_inference_steps=1",
    "evaluate.prompts=[a red circle]",
    "evaluate.heldout_captions=4",
    "pack.val_fraction=0.2",
    "pack.shard_max_samples=8",
]


def _parquet(sample: Path, out: Path) -> Path:
    """The sample folder as one parquet file (image bytes + text)."""
    import datasets

    rows = [json.loads(line) for line in (sample / "metadata.jsonl").read_text().splitlines()]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [str(sample / r["file_name"]) for r in rows], "text": [r["text"] for r in rows]},
        features=features,
    )
    ds.to_parquet(str(out))
    return out


def test_run_local_accepts_a_parquet_file_source(tmp_path, sample_source, monkeypatch):
    """`dvc repro` packs a .parquet file; run-local must accept the same source."""
    from pipelines.backend import LocalBackend, RunResult

    parquet = _parquet(sample_source, tmp_path / "data.parquet")
    seen, built = {}, []
    real_build = commands.build_pipeline
    monkeypatch.setattr(
        commands,
        "build_pipeline",
        lambda params, **kw: built.append(params) or real_build(params, **kw),
    )

    def run(self, package, parameters, run_id):
        seen.update(parameters, package=package)
        return RunResult(run_id, "COMPLETE", {})

    monkeypatch.setattr(LocalBackend, "run", run)
    claim = "pipeline.workspace_create={storage_class: fast}"
    params = load_params(None, [f"data.source={parquet}", claim])
    run_local(params, tmp_path / "root")
    # No PVC and no retries here: the workspace is a folder, a failure is not a lost pod.
    assert built[0].pipeline.workspace_create is None and built[0].pipeline.retries.count == 0
    assert "workspace-op" not in all_tasks(load(seen["package"])[0])
    assert seen["source"] == str(parquet)
    # The fingerprint is the DAG's first task's (in the cluster), never a client argument.
    assert "source_fingerprint" not in seen
    assert seen["workspace"] == str((tmp_path / "root" / "workspace").resolve())
    assert remote.fingerprint(str(parquet)) == sha256_file(parquet)
    with pytest.raises(ConfigError, match="'nowhere.parquet': no such folder or file"):
        run_local(load_params(None, ["data.source=nowhere.parquet"]), tmp_path / "root")


def artifact(result: dict, task: str, output: str) -> Path:
    """Where a local run's task wrote (or, cached, had written) an output artifact."""
    return Path(result["tasks"][task].artifacts[output][0].uri)


def states(result: dict) -> dict[str, str]:
    return {n: t.state for n, t in result["tasks"].items() if n.endswith("-op")}


@pytest.mark.slow
def test_run_local_completes_with_every_artifact(tmp_path, sample_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parquet = _parquet(sample_source, tmp_path / "data.parquet")  # a file source, as DVC's
    params = load_params(
        None,
        [
            f"data.source={parquet}",
            *SMALL_RUN,
            "pipeline.cache_workers=2",  # the ParallelFor + merge paths (default: one task)
            "pipeline.pack_workers=3",
            f"publish.registry={tmp_path / 'registry'}",
        ],
    )
    lines = []
    result = run_local(params, tmp_path / "root", log=lines.append)
    latents = json.loads(
        (artifact(result, "cache-merge-op", "latents") / "manifest.json").read_text()
    )
    shards = artifact(result, "pack-merge-op", "shards")
    packed = json.loads((shards / "manifest.json").read_text())
    assert not list(shards.glob("*.tar"))  # by reference: the shards are in the store
    assert [e["source_name"] for e in latents["shards"]] == [e["name"] for e in packed["shards"]]
    assert sum(latents["samples"].values()) == 48
    assert (artifact(result, "train-op", "model") / "unet").is_dir()
    assert (artifact(result, "evaluate-op", "evaluation") / "grid.png").is_file()
    assert artifact(result, "evaluate-op", "report").read_text().startswith("<!doctype html>")
    logged = result["tasks"]["evaluate-op"].artifacts["eval_metrics"][0].metadata
    assert {"base_val_loss", "tuned_val_loss", "val_loss_ratio"} <= set(logged)
    assert {"base_clip_score", "tuned_clip_score", "base_fd", "tuned_fd", "tuned_kid"} <= set(
        logged
    )
    assert result["tasks"]["evaluate-op"].parameters["Output"] is True  # the gate decision
    receipt = json.loads((artifact(result, "publish-op", "receipt") / "receipt.json").read_text())
    # A local run is an experiment: evaluated and gated, not published by default.
    assert receipt["published"] is False and receipt["passed"] is True
    assert receipt["experiment"].startswith("run-local")
    assert "publish.from_experiments" in receipt["reason"]
    assert not (tmp_path / "registry").exists()
    # One line per task, with the stage's own line; the full logs are files.
    assert any(line.split()[:2] == ["pack-merge", "complete"] and "packed 48 samples" in line
               for line in lines), lines  # fmt: skip
    assert len(lines) == len([t for t in result["tasks"].values() if t.log])


@pytest.mark.slow
def test_run_local_with_a_failed_gate_skips_publish(tmp_path, sample_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(
        None,
        [
            f"data.source={sample_source}",
            *SMALL_RUN,
            "train.max_train_steps=2",
            "evaluate.gate.max_val_loss_ratio=1e-6",  # no model passes this
            "publish.from_experiments=true",
            f"publish.registry={tmp_path / 'registry'}",
        ],
    )
    result = run_local(params, tmp_path / "root")
    assert result["tasks"]["evaluate-op"].parameters["Output"] is False
    assert result["tasks"]["publish-op"].state == "SKIPPED"  # by dsl.If
    summary = result["summary"]
    assert summary["state"] == "COMPLETE"  # the backend's word, not kfp.local's
    assert summary["text"] == "run succeeded: the evaluation gate failed, nothing published"
    assert summary["stages"]["publish"] == {
        "status": "skipped",
        "summary": "the evaluation gate failed",
    }
    assert not (tmp_path / "registry").exists()


@pytest.mark.slow
def test_scheduled_runs_train_only_when_the_data_changed(tmp_path, s3, monkeypatch):
    """Three runs of the DAG with the backend's cache over one workspace, with the data
    in S3 (a local moto server): the first trains and publishes v1; the second, with
    nothing changed, trains nothing; the third, after images were added, trains and
    publishes v2, and pack and cache redo only the new shards; their artifacts are
    manifests, and the model equals one trained from copies of the store's shards."""
    from make_sample import make_sample

    from tests.conftest import upload_folder

    monkeypatch.chdir(tmp_path)
    s3.create_bucket(Bucket="data")
    make_sample(tmp_path / "v1", count=48)
    upload_folder(s3, "data", tmp_path / "v1", "shapes")
    params = load_params(
        None,
        [
            "data.source=s3://data/shapes",
            *SMALL_RUN,
            "publish.from_experiments=true",
            f"publish.registry={tmp_path / 'registry'}",
        ],
    )
    root = tmp_path / "root"

    first = run_local(params, root)["summary"]
    assert first["text"] == "run succeeded: published v1"
    assert first["stages"]["fingerprint"]["summary"] == "nothing trained or published yet"
    assert first["stages"]["train"]["status"] == "done"
    shards_v1 = first["stages"]["pack"]["shards"]
    assert first["stages"]["pack"]["written"] == shards_v1

    second = run_local(params, root)
    assert second["summary"]["text"].startswith("run succeeded: data and config unchanged")
    assert second["summary"]["text"].endswith("nothing trained")
    assert states(second) == {"fingerprint-op": "COMPLETE", "summary-op": "COMPLETE",
                              **{n: "SKIPPED" for n in states(second) if n not in
                                 ("fingerprint-op", "summary-op")}}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "registry" / "t2i-tiny").iterdir()) == [
        "1",
        "latest.json",
    ]

    make_sample(tmp_path / "v2", count=64)  # the same 48 pictures, and 16 new ones
    upload_folder(s3, "data", tmp_path / "v2", "shapes")
    result = run_local(params, root)
    third = result["summary"]
    assert third["stages"]["fingerprint"]["summary"].startswith("data changed since the last run")
    assert third["text"] == "run succeeded: published v2"
    pack = third["stages"]["pack"]
    assert pack["shards"] > shards_v1 and 0 < pack["written"] < pack["shards"]
    assert 0 < third["stages"]["cache"]["encoded"] < pack["shards"]
    lineage = json.loads((tmp_path / "registry" / "t2i-tiny" / "2" / "lineage.json").read_text())
    assert lineage["run_key"]["source"] == "s3://data/shapes"
    assert lineage["source"]["source"] == "s3://data/shapes"
    assert sum(lineage["pack"]["samples"].values()) == 64
    # By reference: the artifacts are the manifest and where the shards are (kilobytes).
    for task, output in (("pack-op", "shards"), ("cache-op", "latents")):
        folder = artifact(result, task, output)
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".jsonl") == [
            "manifest.json",
            "store.json",
        ]
        assert sum(p.stat().st_size for p in folder.iterdir()) < 64_000
    # The model equals one trained from copies of those shards (no reference).
    latents = artifact(result, "cache-op", "latents")
    store = Path(json.loads((latents / "store.json").read_text())["store"])
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copyfile(latents / "manifest.json", copied / "manifest.json")
    for entry in json.loads((latents / "manifest.json").read_text())["shards"]:
        shutil.copyfile(store / entry["name"], copied / entry["name"])
    from components import train_unet

    base = artifact(result, "base-model-op", "base_model")
    train_unet.run(params.train, copied, base, tmp_path / "model", tmp_path / "reports")
    name = "unet/diffusion_pytorch_model.safetensors"
    trained = artifact(result, "train-op", "model") / name
    assert sha256_file(trained) == sha256_file(tmp_path / "model" / name)


@pytest.mark.slow
def test_backend_caching_a_revert_a_retrain_and_an_evaluation_change(tmp_path, monkeypatch):
    """Under the backend's cache semantics, over one workspace and one cache:
    D1 -> v1; D2 -> v2; back to D1 -> pack, cache, train and evaluate come from KFP's
    cache and publish runs: v1 is the latest again; D1 again -> nothing; only
    evaluate.prompts changed -> pack, cache and train cached, evaluate and publish run;
    retrain: always on unchanged data -> train runs again, and publish."""
    from make_sample import make_sample

    monkeypatch.chdir(tmp_path)
    make_sample(tmp_path / "d1", count=48)
    make_sample(tmp_path / "d2", count=48, seed=1)
    registry = tmp_path / "registry"

    def run(data: str, *sets: str) -> dict:
        params = load_params(
            None,
            [f"data.source={tmp_path / data}", *SMALL_RUN, "publish.from_experiments=true",
             f"publish.registry={registry}", *sets],
        )  # fmt: skip
        return run_local(params, tmp_path / "root")

    def latest() -> int:
        return json.loads((registry / "t2i-tiny" / "latest.json").read_text())["version"]

    assert run("d1")["summary"]["text"] == "run succeeded: published v1"
    assert run("d2")["summary"]["text"] == "run succeeded: published v2" and latest() == 2
    back = run("d1")
    assert back["summary"]["stages"]["fingerprint"]["summary"].startswith(
        "data changed since the last run"
    )
    for name in ("base-model-op", "pack-op", "cache-op", "train-op", "evaluate-op"):
        assert back["tasks"][name].state == "CACHED", name
    assert back["tasks"]["publish-op"].state == "COMPLETE"  # never from the cache
    assert back["summary"]["text"] == "run succeeded: published v1" and latest() == 1
    again = run("d1")
    assert again["summary"]["text"].endswith("nothing trained")
    assert again["tasks"]["publish-op"].state == "SKIPPED"

    prompts = run("d1", "evaluate.prompts=[a blue square]")
    for name in ("pack-op", "cache-op", "train-op"):
        assert prompts["tasks"][name].state == "CACHED", name
    for name in ("evaluate-op", "publish-op"):
        assert prompts["tasks"][name].state == "COMPLETE", name

    always = run("d1", "evaluate.prompts=[a blue square]", "pipeline.retrain=always")
    assert always["summary"]["stages"]["fingerprint"]["summary"].startswith(
        "pipeline.retrain: always"
    )
    assert always["tasks"]["pack-op"].state == "CACHED"  # the data did not change
    assert always["tasks"]["train-op"].state == "COMPLETE"  # trained, from step 0
    assert always["summary"]["stages"]["train"]["resumed_from_step"] == 0
    assert always["tasks"]["publish-op"].state == "COMPLETE"
    assert always["summary"]["published_version"] == 1  # the same weights: v1, the latest


def test_a_config_error_fails_the_run_at_once_and_the_summary_names_it(tmp_path, sample_source):
    """A bad pack setting (as a user might give in the KFP UI): the fingerprint task,
    which validates every section before anything runs, fails once (it is not
    retried), nothing else runs, and the summary names the stage and the key."""
    from kfp import compiler

    from pipelines.backend import LocalBackend
    from pipelines.finetune import build_pipeline

    params = load_params(None, [f"data.source={sample_source}", *SMALL_RUN])
    package = tmp_path / "p.yaml"  # as compiled for a cluster, less the PVC task
    compiler.Compiler().compile(build_pipeline(params, in_cluster=False), str(package))
    bad = json.dumps({**params.pack.model_dump(), "shard_max_samples": 0})
    result = LocalBackend(tmp_path / "root").run(
        package,
        {"workspace": str(tmp_path / "ws"), "pack_params": bad, "source": str(sample_source)},
        "run-1",
    )
    assert result.state == "FAILED"
    fingerprint = result.tasks["fingerprint-op"]
    assert fingerprint.state == "FAILED" and fingerprint.attempts == 1
    assert result.tasks["pack-op"].state == "SKIPPED"
    summary = json.loads((tmp_path / "ws" / "runs" / "run-1" / "summary.json").read_text())
    assert summary["state"] == "FAILED" and summary["failed_stage"] == "fingerprint"
    assert summary["text"].startswith("run failed: fingerprint: pipeline parameter pack_params")
    assert "pack.shard_max_samples" in summary["text"]


def test_compile_warns_when_the_image_is_pinned_by_a_tag(tmp_path, capsys):
    tagged = ["pipeline", "compile", "--output", str(tmp_path / "a.yaml")]
    assert main(tagged) == 0
    err = capsys.readouterr().err
    assert (
        "warning: pipeline.image ghcr.io/t2i-pipeline/t2i-pipeline:0.1.0 is pinned by a tag" in err
    )
    digest = "ghcr.io/t2i-pipeline/t2i-pipeline@sha256:" + "ab" * 32
    pinned = [*tagged[:-1], str(tmp_path / "b.yaml"), "--set", f"pipeline.image={digest}"]
    assert main([*pinned, "--set", "data.source=s3://data/shapes"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*pinned, "--set", "data.source=data/sample"]) == 0
    assert "warning: data.source data/sample is a path on this machine" in capsys.readouterr().err
    spec, _ = load(tmp_path / "b.yaml")
    for executor in spec["deploymentSpec"]["executors"].values():
        env = {e["name"]: e["value"] for e in executor["container"]["env"]}
        assert executor["container"]["image"] == digest
        assert env["T2I_IMAGE"] == digest and env["T2I_IMAGE_DIGEST"] == "sha256:" + "ab" * 32


def test_the_run_makes_sure_of_its_workspace_pvc_before_anything_mounts_it(tmp_path):
    """pipeline.workspace_create: the uncached workspace task creates the PVC when it is
    missing and reuses one that exists; without it, it checks that the PVC exists. It
    runs before the exit handler (whose summary mounts the PVC), so a PVC that cannot be
    made is one failed task, not a summary pod Pending forever."""
    params = load_params(
        REPO / "params.yaml",
        ["pipeline.workspace_create={size: 50Gi, storage_class: premium-rwo}"],
    )
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    tasks = all_tasks(spec)
    claim = tasks["workspace-op"]
    assert claim["_in"] == "root" and claim["taskInfo"]["name"] == "workspace"
    assert claim["cachingOptions"] == {} and "retryPolicy" not in claim
    inputs = {k: v["runtimeValue"]["constant"] for k, v in claim["inputs"]["parameters"].items()}
    assert inputs["pvc_name"] == "t2i-workspace"
    assert json.loads(inputs["create"]) == {
        "size": "50Gi",
        "storage_class": "premium-rwo",
        "access_mode": "ReadWriteOnce",
    }
    assert tasks["exit-handler-1"]["dependentTasks"] == ["workspace-op"]
    (mount,) = k8s_of(platform)["exec-train-op"]["pvcMount"]
    assert mount["constant"] == "t2i-workspace"
    default = all_tasks(load(COMPILED)[0])["workspace-op"]  # an existing PVC: checked
    assert default["inputs"]["parameters"]["create"]["runtimeValue"]["constant"] == ""
    without = load_params(None, ["pipeline.workspace_pvc=null", "publish.registry=s3://m/r"])
    assert "workspace-op" not in all_tasks(load(compile_pipeline(without, tmp_path / "n.yaml"))[0])
    with pytest.raises(ConfigError, match="storage_class: Field required"):
        load_params(None, ["pipeline.workspace_create={size: 50Gi}"])
    with pytest.raises(ConfigError, match="workspace_create needs workspace_pvc"):
        load_params(
            None,
            ["pipeline.workspace_create={storage_class: fast}", "pipeline.workspace_pvc=null"],
        )


def test_run_local_prints_one_line_per_task_and_a_failures_last_lines(tmp_path):
    from pipelines.backend import TaskResult

    lines = []
    show = commands._task_line(lines.append)
    log = tmp_path / "log.txt"
    log.write_text("Loading...\ntrain: trained 4 steps: loss 1.0 -> 0.9\nWrote executor output\n")
    show(TaskResult("train-op", "COMPLETE", seconds=3.2, log=log, display_name="train"))
    assert lines == ["  train         complete   3.2s  trained 4 steps: loss 1.0 -> 0.9"]
    lines.clear()
    log.write_text("a\\nb\npack: data.source 'x': no such folder\n")
    show(TaskResult("pack-op", "FAILED", seconds=1.0, attempts=1, log=log, display_name="pack"))
    assert lines[0].startswith("  pack          failed") and "no such folder" in lines[0]
    assert "pack: data.source 'x': no such folder" in lines[1]  # the log's last lines
    assert lines[-1] == f"    full log: {log}"
