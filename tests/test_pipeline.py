"""The KFP DAG: compiled YAML kept in sync, thin components, a local run."""

import json
from pathlib import Path

import pytest
import yaml

from components.common.config import load_params
from pipelines.commands import compile_pipeline, run_local

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled" / "finetune.yaml"


def test_committed_yaml_matches_a_fresh_compile(tmp_path):
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "finetune.yaml")
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/compiled/finetune.yaml is stale: run `t2i pipeline compile` and commit it"
    )


def test_components_are_thin_and_run_the_project_image():
    spec = yaml.safe_load(COMPILED.read_text())
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
        "publish-op",
    }
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-op"]


def test_cache_workers_compile_to_a_parallel_for_and_a_merge(tmp_path):
    params = load_params(REPO / "params.yaml", ["pipeline.cache_workers=4"])
    spec = yaml.safe_load(compile_pipeline(params, tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert "cache-merge-op" in tasks and "cache-op" not in tasks
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2, 3]"
    assert tasks["train-op"]["dependentTasks"] == ["base-model-op", "cache-merge-op"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["train_params"]["defaultValue"]) == params.train.model_dump()


@pytest.mark.slow
def test_run_local_completes_with_every_artifact(tmp_path, sample_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(
        None,
        [
            f"data.source={sample_source}",
            "train.max_train_steps=4",
            "train.train_batch_size=4",
            "evaluate.num_inference_steps=1",
            "evaluate.prompts=[a red circle]",
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
    receipt = json.loads((run_dir / "publish-op" / "receipt" / "receipt.json").read_text())
    assert receipt["published"] is True
    assert (tmp_path / "registry" / "t2i-tiny" / "1" / "model_index.json").is_file()
