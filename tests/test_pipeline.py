"""The KFP DAG: compiled YAML kept in sync, thin components, a local run."""

import json
from pathlib import Path

import pytest
import yaml

from components.cli import main
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


def test_components_are_thin_and_run_the_project_image():
    spec, _ = load(COMPILED)
    params = load_params(REPO / "params.yaml")
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 6
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == params.pipeline.image
        text = json.dumps(container)
        assert "pip install" not in text and "pip3 install" not in text
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "base-model-op",
        "pack-op",
        "cache-op",
        "train-op",
        "evaluate-op",
        "condition-1",
    }
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-op"]


def test_publish_runs_under_the_gate_and_evaluate_shows_html_and_metrics():
    spec, _ = load(COMPILED)
    gate = spec["root"]["dag"]["tasks"]["condition-1"]
    assert gate["taskInfo"]["name"] == "gate-passed"
    channel = gate["inputs"]["parameters"]["pipelinechannel--evaluate-op-Output"]
    assert channel["taskOutputParameter"]["producerTask"] == "evaluate-op"
    assert gate["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-op-Output'] == true"
    )
    assert list(spec["components"]["comp-condition-1"]["dag"]["tasks"]) == ["publish-op"]
    outputs = spec["components"]["comp-evaluate-op"]["outputDefinitions"]
    kinds = {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()}
    assert kinds["report"] == "system.HTML" and kinds["eval_metrics"] == "system.Metrics"
    assert outputs["parameters"]["Output"]["parameterType"] == "BOOLEAN"


def test_cache_workers_compile_to_a_parallel_for_and_a_merge(tmp_path):
    params = load_params(REPO / "params.yaml", ["pipeline.cache_workers=4"])
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    tasks = spec["root"]["dag"]["tasks"]
    assert "cache-merge-op" in tasks and "cache-op" not in tasks
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2, 3]"
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-merge-op"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["train_params"]["defaultValue"]) == params.train.model_dump()
    worker = spec["deploymentSpec"]["executors"]["exec-cache-worker-op"]["container"]
    assert worker["resources"]["accelerator"]["resourceCount"] == "1"  # each worker: a GPU
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "exec-cache-worker-op" in executors


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
        ],
    )
    spec, platform = load(compile_pipeline(params, tmp_path / "p.yaml"))
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-op"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["accelerator"]["resourceCount"] == "4"
    assert train["resourceCpuLimit"] == "8" and train["resourceMemoryLimit"] == "32Gi"  # kept
    for stage in ("cache", "evaluate"):  # GPU stages by default
        assert executors[f"exec-{stage}-op"]["container"]["resources"]["accelerator"]
    for stage in ("base-model", "pack", "publish"):  # CPU stages
        assert "accelerator" not in executors[f"exec-{stage}-op"]["container"]["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-op"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
    }
    assert k8s["exec-train-op"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    for stage in ("cache", "train", "evaluate"):
        (shm,) = k8s[f"exec-{stage}-op"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    for name, task in spec["root"]["dag"]["tasks"].items():
        if name.endswith("-op"):
            assert task["retryPolicy"]["maxRetryCount"] == 3, name
    gated = spec["components"]["comp-condition-1"]["dag"]["tasks"]["publish-op"]
    assert gated["retryPolicy"]["maxRetryCount"] == 3


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
    parquet = _parquet(sample_source, tmp_path / "data.parquet")
    seen = {}
    monkeypatch.setattr(
        commands, "build_pipeline", lambda params: lambda **kw: seen.update(kw) or None
    )
    params = load_params(None, [f"data.source={parquet}"])
    run_local(params, tmp_path / "root")
    assert seen["source"] == str(parquet)
    assert seen["source_fingerprint"] == sha256_file(parquet)
    with pytest.raises(ConfigError, match="'nowhere.parquet': no such folder or file"):
        run_local(load_params(None, ["data.source=nowhere.parquet"]), tmp_path / "root")


@pytest.mark.slow
def test_run_local_completes_with_every_artifact(tmp_path, sample_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parquet = _parquet(sample_source, tmp_path / "data.parquet")  # a file source, as DVC's
    params = load_params(
        None,
        [
            f"data.source={parquet}",
            "model.tiny_vae_steps=8",
            "train.max_train_steps=4",
            "train.train_batch_size=4",
            "evaluate.num_inference_steps=1",
            "evaluate.prompts=[a red circle]",
            "evaluate.heldout_captions=4",
            "pack.val_fraction=0.2",
            "pack.shard_max_samples=8",
            "pipeline.cache_workers=2",  # the ParallelFor + merge path (default: one task)
            f"publish.registry={tmp_path / 'registry'}",
        ],
    )
    result = run_local(params, tmp_path / "root")
    run_dir = next(Path(result["root"]).iterdir())
    latents = json.loads((run_dir / "cache-merge-op" / "latents" / "manifest.json").read_text())
    packed = json.loads((run_dir / "pack-op" / "shards" / "manifest.json").read_text())
    assert [e["source_name"] for e in latents["shards"]] == [e["name"] for e in packed["shards"]]
    assert sum(latents["samples"].values()) == 48
    assert (run_dir / "train-op" / "model" / "unet").is_dir()
    assert (run_dir / "evaluate-op" / "evaluation" / "grid.png").is_file()
    assert (run_dir / "evaluate-op" / "report").read_text().startswith("<!doctype html>")
    executed = json.loads((run_dir / "evaluate-op" / "executor_output.json").read_text())
    logged = executed["artifacts"]["eval_metrics"]["artifacts"][0]["metadata"]
    assert {"base_val_loss", "tuned_val_loss", "val_loss_ratio"} <= set(logged)
    assert {"base_clip_score", "tuned_clip_score", "base_fd", "tuned_fd", "tuned_kid"} <= set(
        logged
    )
    assert executed["parameterValues"]["Output"] is True  # the gate decision
    receipt = json.loads((run_dir / "publish-op" / "receipt" / "receipt.json").read_text())
    # A local run is an experiment: evaluated and gated, not published by default.
    assert receipt["published"] is False and receipt["passed"] is True
    assert receipt["experiment"].startswith("run-local")
    assert "publish.from_experiments" in receipt["reason"]
    assert not (tmp_path / "registry").exists()


@pytest.mark.slow
def test_run_local_with_a_failed_gate_skips_publish(tmp_path, sample_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(
        None,
        [
            f"data.source={sample_source}",
            "model.tiny_vae_steps=8",
            "train.max_train_steps=2",
            "train.train_batch_size=4",
            "evaluate.num_inference_steps=1",
            "evaluate.prompts=[a red circle]",
            "evaluate.heldout_captions=4",
            "evaluate.gate.max_val_loss_ratio=1e-6",  # no model passes this
            "pack.val_fraction=0.2",
            "publish.from_experiments=true",
            f"publish.registry={tmp_path / 'registry'}",
        ],
    )
    result = run_local(params, tmp_path / "root")
    run_dir = next(Path(result["root"]).iterdir())
    executed = json.loads((run_dir / "evaluate-op" / "executor_output.json").read_text())
    assert executed["parameterValues"]["Output"] is False
    assert not (run_dir / "publish-op").exists()  # skipped by dsl.If
    assert not (tmp_path / "registry").exists()
