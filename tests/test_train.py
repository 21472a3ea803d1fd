import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from components import train_unet
from components.common.errors import ConfigError

from .conftest import TRAIN

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_loss_falls_on_sample_data(trained):
    root, report = trained
    assert report.steps == TRAIN.max_train_steps
    assert report.final_loss < 0.7 * report.initial_loss
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    assert metrics["final_loss"] == pytest.approx(report.final_loss)
    assert (root / "train" / "loss.csv").read_text().count("\n") == TRAIN.max_train_steps + 1


def test_output_is_a_loadable_pipeline_that_generates(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained[0] / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    assert not list((trained[0] / "model").rglob("*.bin"))


def test_checkpoints_are_committed_and_pruned(trained):
    names = sorted(p.name for p in (trained[0] / "checkpoints").iterdir())
    assert names == ["checkpoint-20", "checkpoint-30"]  # limit 2: checkpoint-10 pruned
    assert all((trained[0] / "checkpoints" / n / "COMMITTED").is_file() for n in names)


def test_resume_latest_is_bit_exact(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-30")  # "crashed" after step 20
    (tmp_path / "checkpoints" / "checkpoint-25.tmp").mkdir()  # a half-written one is ignored
    report = train_unet.run(
        TRAIN, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 20
    resumed, straight = load_file(tmp_path / "model" / UNET), load_file(root / "model" / UNET)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    a = torch.load(tmp_path / "checkpoints/checkpoint-30/training_state.pt", weights_only=True)
    b = torch.load(root / "checkpoints/checkpoint-30/training_state.pt", weights_only=True)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for k, state in b["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], a["optimizer"]["state"][k]["exp_avg_sq"])


def test_latest_ignores_checkpoints_of_another_run(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    other = TRAIN.model_copy(update={"learning_rate": 5e-4, "max_train_steps": 2})
    report = train_unet.run(
        other, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 0 and report.steps == 2


def test_v_prediction_and_accumulation_run(latents, tiny_model, tmp_path):
    cfg = TRAIN.model_copy(
        update={
            "prediction_type": "v_prediction",
            "max_train_steps": 2,
            "gradient_accumulation_steps": 2,
        }
    )
    report = train_unet.run(
        cfg, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"
    )
    assert report.samples_seen == 2 * 2 * cfg.train_batch_size
    saved = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_impossible_settings_fail_before_work(latents, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train_unet.run(
            TRAIN.model_copy(update={"mixed_precision": "fp16"}),
            latents,
            tiny_model,
            tmp_path / "m",
        )
    with pytest.raises(ConfigError, match="more than the"):
        train_unet.run(
            TRAIN.model_copy(update={"train_batch_size": 1000}), latents, tiny_model, tmp_path / "m"
        )
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        train_unet.run(
            TRAIN.model_copy(update={"resume_from_checkpoint": str(tmp_path / "no")}),
            latents,
            tiny_model,
            tmp_path / "m",
        )
    assert not (tmp_path / "m").exists()
