"""LoRA adapters (train.lora_rank > 0): trained, resumed, evaluated and published."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from components import evaluate, publish, train_unet
from components.common.config import PublishConfig, TrainConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import sha256_file
from components.common.models import ADAPTER_WEIGHTS, load_pipeline
from components.common.records import read_evaluation_record, read_train_record

from .conftest import EVAL, REPO, TRAIN, run_folder
from .test_train import _KILL_AFTER_CHECKPOINT, RESUME

LORA = TRAIN.model_copy(
    update={"lora_rank": 4, "lora_alpha": 8.0, "lora_merge": True, "report_to": "none"}
)
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def lora_trained(latents, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    report = train_unet.run(
        LORA, latents, tiny_model, root / "model", root / "train", root / "ckpt"
    )
    return root, report


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), h).sample


def test_lora_trains_an_adapter_that_diffusers_loads_onto_the_base(lora_trained, tiny_model):
    root, report = lora_trained
    model = root / "model"
    assert report.steps == LORA.max_train_steps and report.final_loss < report.initial_loss
    adapter = load_file(model / ADAPTER_WEIGHTS)
    # diffusers' LoRA format: unet-prefixed lora.down/lora.up of the attention projections
    assert adapter and all(k.startswith("unet.") and ".lora." in k for k in adapter)
    assert {k.split(".")[-4] for k in adapter} >= {"to_q", "to_k", "to_v"}
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for v in adapter.values())  # rank 4
    record = read_train_record(model)
    assert record.adapter.rank == 4 and record.adapter.alpha == 8.0 and record.adapter.merged
    # base + load_lora_weights == the merged pipeline; both differ from the base
    from diffusers import StableDiffusionPipeline

    loaded = _unet_out(load_pipeline(model, tiny_model).unet)
    merged = _unet_out(StableDiffusionPipeline.from_pretrained(model).unet)
    base = _unet_out(StableDiffusionPipeline.from_pretrained(tiny_model).unet)
    assert torch.allclose(loaded, merged, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-3
    # checkpoints hold the adapter alone, not a copy of the frozen UNet
    ckpt = run_folder(root / "ckpt") / "checkpoint-30"
    assert (ckpt / "lora_adapter.safetensors").is_file() and not (ckpt / "unet").exists()


def test_without_merge_the_output_is_the_adapter_alone(latents, tiny_model, tmp_path):
    cfg = LORA.model_copy(update={"lora_merge": False, "max_train_steps": 2})
    train_unet.run(cfg, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    names = {p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*")}
    assert names == {
        ADAPTER_WEIGHTS,
        "training_record.json",
        "scheduler",
        "scheduler/scheduler_config.json",
    }
    assert not read_train_record(tmp_path / "m").adapter.merged


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="need lora_rank > 0"):
        TrainConfig(lora_merge=True)
    with pytest.raises(ValueError, match="non_ema_revision picks"):
        TrainConfig(lora_rank=4, use_ema=True, non_ema_revision="main")


def test_unknown_target_module_is_one_line(latents, tiny_model, tmp_path):
    cfg = LORA.model_copy(update={"lora_target_modules": ["to_qq"]})
    with pytest.raises(ConfigError, match=r"train.lora_target_modules \['to_qq'\]: no such module"):
        train_unet.run(cfg, latents, tiny_model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# -- exact resume, with EMA and dropout -------------------------------------------------

RESUME_LORA = RESUME.model_copy(
    update={"lora_rank": 4, "lora_dropout": 0.1, "learning_rate": 1e-3, "lora_merge": False}
)


def test_lora_sigkill_then_resume_is_bit_exact(latents, tiny_model, tmp_path):
    straight = tmp_path / "straight"
    paths = [latents, tiny_model, straight / "model", straight / "train", straight / "ckpt"]
    train_unet.run(RESUME_LORA, *paths)
    paths = [latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_CHECKPOINT, "6", RESUME_LORA.model_dump_json()]
        + [str(p) for p in paths],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    report = train_unet.run(RESUME_LORA, *paths)
    assert report.resumed_from_step == 6 and report.steps == 12
    a, b = (
        load_file(tmp_path / "model" / ADAPTER_WEIGHTS),
        load_file(straight / "model" / ADAPTER_WEIGHTS),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)  # EMA weights
    sa, sb = (
        torch.load(run_folder(root / "ckpt") / "checkpoint-12/training_state.pt", weights_only=True)
        for root in (tmp_path, straight)
    )
    assert sa["ema"]["optimization_step"] == 12
    assert all(
        torch.equal(x, y)
        for x, y in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"], strict=True)
    )
    raw = "checkpoint-12/lora_adapter.safetensors"
    a, b = (load_file(run_folder(root / "ckpt") / raw) for root in (tmp_path, straight))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert (tmp_path / "train/loss.csv").read_text() == (straight / "train/loss.csv").read_text()


def test_a_full_checkpoint_is_not_resumed_into_a_lora_run(trained, latents, tiny_model, tmp_path):
    """Another config is another run fingerprint: `latest` starts afresh; naming the
    full run's checkpoint explicitly is refused in one line, and still is when the
    user asks to resume another run (its kind of checkpoint cannot be loaded)."""
    path = str(run_folder(trained[0] / "checkpoints") / "checkpoint-30")
    cfg = LORA.model_copy(update={"resume_from_checkpoint": path})
    with pytest.raises(ConfigError, match="another run's checkpoint .*lora_rank 0 -> 4"):
        train_unet.run(cfg, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    forced = cfg.model_copy(update={"resume_other_run": True})
    with pytest.raises(ConfigError, match="a full fine-tune's checkpoint; this run trains LoRA"):
        train_unet.run(forced, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")


# -- evaluate and publish ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_evaluation(lora_trained, tiny_model, latents, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-eval") / "eval"
    report = evaluate.run(EVAL, lora_trained[0] / "model", tiny_model, latents, out, shards=shards)
    return out, report


def test_evaluate_compares_the_base_with_base_plus_adapter(
    lora_evaluation, lora_trained, tiny_model, latents
):
    """The "tuned" numbers and samples are those of the base with the adapter loaded
    the way users load it (diffusers' load_lora_weights), the "base" ones the base's."""
    from diffusers import StableDiffusionPipeline

    from components.common.records import load_latent_split, read_latent_manifest
    from components.evaluate.sampling import generate, use_scheduler

    out, report = lora_evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    with_adapter = StableDiffusionPipeline.from_pretrained(tiny_model)
    with_adapter.load_lora_weights(lora_trained[0] / "model")
    val = load_latent_split(latents, "val")
    factor = read_latent_manifest(latents).vae_scaling_factor
    for name, pipe in (("base", base), ("tuned", with_adapter)):
        per_t = evaluate.held_out_loss(pipe, val, EVAL, factor)
        assert metrics[f"{name}_val_loss"] == pytest.approx(sum(per_t.values()) / len(per_t))
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"]
    use_scheduler(with_adapter, EVAL.scheduler)
    first = read_evaluation_record(out).samples[0]
    (image,) = generate(with_adapter, [(first.prompt, first.seed)], EVAL, 32)
    import numpy as np

    saved = np.asarray(Image.open(out / first.images["tuned"]), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2  # batched vs alone
    assert "LoRA adapter on the base" in (out / "report.html").read_text()


def test_evaluating_an_adapter_against_another_base_is_refused(
    lora_trained, latents, shards, tmp_path, tmp_path_factory
):
    from components import base_model
    from components.common.config import ModelConfig

    other = tmp_path / "other-base"
    base_model.run(ModelConfig(seed=1, tiny_vae_steps=0), other)
    with pytest.raises(T2IError, match="not the base model the LoRA adapter was trained on"):
        evaluate.run(EVAL, lora_trained[0] / "model", other, latents, tmp_path / "e")


def test_publish_uploads_the_adapter_with_an_adapter_card(lora_trained, lora_evaluation, tmp_path):
    import yaml

    from components.common.records import BaseModelRecord, read_evaluation_record
    from components.publish.card import render_card
    from components.publish.lineage import build_lineage

    from .hub_server import validate_card_yaml

    model = lora_trained[0] / "model"
    cfg = PublishConfig(name="lora", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, model, lora_evaluation[0], tmp_path / "out")
    version = tmp_path / "registry" / "lora" / "1"
    assert (version / ADAPTER_WEIGHTS).is_file() and receipt.published
    assert receipt.unet_sha256 == read_train_record(model).unet_sha256
    card = (version / "README.md").read_text()
    assert "- lora" in card and 'pipe.load_lora_weights("' in card
    assert "LoRA adapter (rank 4, alpha 8" in card and "| `lora_rank` | `4` |" in card
    # The kohya-format file, for ComfyUI and AUTOMATIC1111: in the version, card, lineage.
    kohya = version / "lora.kohya.safetensors"
    entry = json.loads((version / "lineage.json").read_text())["exports"][kohya.name]
    assert entry["sha256"] == sha256_file(kohya) and "kohya" in entry["format"]
    assert f"`{kohya.name}`: the LoRA in kohya's format (alpha 8, rank 4)" in card
    again = publish.run(cfg, model, lora_evaluation[0], tmp_path / "out")
    assert not again.local.new  # the same adapter makes no second version
    # with a Hub base model, the Hub's metadata says what the repo is
    train = read_train_record(model)
    base = BaseModelRecord(source="sd15/sd", hub_id="sd15/sd", unet_sha256="0" * 64)
    train = train.model_copy(update={"base_model": base})
    evaluation = read_evaluation_record(lora_evaluation[0])
    text = render_card(
        repo_id="acme/lora",
        name="lora",
        license_="mit",
        version=1,
        train=train,
        evaluation=evaluation,
        lineage=build_lineage("lora", train, evaluation),
    )
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "sd15/sd" and meta["base_model_relation"] == "adapter"
    assert "lora" in meta["tags"] and validate_card_yaml(text) == []
    assert 'from_pretrained("sd15/sd"' in text and 'load_lora_weights("acme/lora")' in text


def test_an_adapter_without_its_weights_is_refused(lora_trained, lora_evaluation, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(lora_trained[0] / "model", model)
    (model / UNET).unlink()  # a merged pipeline that lost its UNet
    cfg = PublishConfig(name="lora", registry=str(tmp_path / "registry"))
    with pytest.raises(T2IError, match="incomplete model folder"):
        publish.run(cfg, model, lora_evaluation[0], tmp_path / "out")


def test_a_lora_checkpoint_is_not_resumed_into_a_full_run(
    lora_trained, latents, tiny_model, tmp_path
):
    path = str(run_folder(lora_trained[0] / "ckpt") / "checkpoint-30")
    cfg = TRAIN.model_copy(
        update={"resume_from_checkpoint": path, "report_to": "none", "resume_other_run": True}
    )
    with pytest.raises(
        ConfigError, match="a LoRA run's checkpoint; this run trains the whole UNet"
    ):
        train_unet.run(cfg, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    assert not (tmp_path / "m").exists()
