import json

import pytest
from PIL import Image

from components import evaluate, publish
from components.common.config import EvaluateConfig, PublishConfig

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def evaluation(trained, tiny_model, latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    cfg = EvaluateConfig(prompts=PROMPTS, num_inference_steps=2)
    return out, evaluate.run(cfg, trained[0] / "model", tiny_model, latents, out)


def test_metrics_compare_base_and_tuned(evaluation):
    out, report = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"]  # training helped held-out loss
    assert metrics["gate_passed"] is True and report.gate_passed
    assert set(metrics["val_loss_by_timestep"]["base"]) == {"100", "300", "500", "700", "900"}


def test_grid_has_a_row_per_prompt_and_two_columns(evaluation):
    out, _ = evaluation
    grid = Image.open(out / "grid.png")
    assert grid.size == (220 + 2 * evaluate.CELL, 20 + len(PROMPTS) * evaluate.CELL)
    assert "grid.png" in (out / "report.html").read_text()


def test_held_out_loss_is_reproducible(trained, tiny_model, latents, tmp_path, evaluation):
    cfg = EvaluateConfig(prompts=PROMPTS[:1], num_inference_steps=1)
    evaluate.run(cfg, trained[0] / "model", tiny_model, latents, tmp_path)
    again = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((evaluation[0] / "metrics.json").read_text())
    assert again["tuned_val_loss"] == first["tuned_val_loss"]


def test_publish_versions_and_is_idempotent(trained, evaluation, tmp_path):
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    first = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert first["published"] and first["version"] == 1 and first["new"]
    version_dir = tmp_path / "registry" / "m" / "1"
    assert (version_dir / "unet").is_dir() and (version_dir / "receipt.json").is_file()
    again = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert again["version"] == 1 and not again["new"]
    receipt = json.loads((tmp_path / "out" / "receipt.json").read_text())
    assert receipt["unet_sha256"] == first["unet_sha256"]
    assert not [p for p in (tmp_path / "registry" / "m").iterdir() if p.name.startswith(".")]


def test_failed_gate_publishes_nothing(trained, evaluation, tmp_path):
    failed = tmp_path / "eval"
    failed.mkdir()
    metrics = json.loads((evaluation[0] / "metrics.json").read_text())
    metrics.update(gate_passed=False, val_loss_ratio=1.2)
    (failed / "metrics.json").write_text(json.dumps(metrics))
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, trained[0] / "model", failed, tmp_path / "out")
    assert receipt["published"] is False and "gate failed" in receipt["reason"]
    assert not (tmp_path / "registry" / "m").exists()


def test_version_folder_without_receipt_is_skipped_not_fatal(trained, evaluation, tmp_path):
    (tmp_path / "registry" / "m" / "1").mkdir(parents=True)  # someone copied a folder in
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert receipt["version"] == 2 and receipt["new"]
