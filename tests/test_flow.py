"""Flow matching (SD3): the loss against an independent computation of the diffusers
scripts' formulas on fixed inputs, for every weighting scheme; and `tiny-sd3` through
cache, train (full and LoRA), evaluate and publish, loading in StableDiffusion3Pipeline."""

import json
import math

import pytest
import torch

from components import base_model, cache_latents, evaluate, pack_shards, publish, train_unet
from components.common.config import (
    CacheConfig,
    DataConfig,
    GateConfig,
    ModelConfig,
    PackConfig,
    PublishConfig,
    TrainConfig,
)
from components.common.errors import ConfigError
from components.common.flow import (
    FlowObjective,
    flow_matching_loss,
    sigma_timesteps,
    timestep_density,
    timesteps_and_sigmas,
)
from components.common.shapes import make_sample

from .conftest import EVAL, cached_and_encoded_losses, train_then_resume


def _by_hand(scheme, x0, noise, sigmas, pred_fn, precondition):
    """The SD3 script's step, written out: no helper of ours or of diffusers."""
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    pred = pred_fn(noisy)
    if precondition:
        pred = pred * (-s) + noisy
    target = x0 if precondition else noise - x0
    if scheme == "sigma_sqrt":
        w = s**-2.0
    elif scheme == "cosmap":
        w = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    else:
        w = torch.ones_like(s)
    return torch.mean((w * (pred - target) ** 2).reshape(len(x0), -1), 1).mean()


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
@pytest.mark.parametrize("precondition", [True, False])
def test_the_loss_is_the_scripts_formula(scheme, precondition):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g)

    def model(x):  # any function of the noisy input stands in for the transformer
        return torch.einsum("oc,bchw->bohw", weight, x)

    sigmas = torch.tensor([0.2, 0.5, 0.9])
    objective = FlowObjective(weighting_scheme=scheme, precondition_outputs=precondition)
    ours = flow_matching_loss(lambda x, t: model(x), x0, noise, sigmas * 1000, sigmas, objective)
    expected = _by_hand(scheme, x0, noise, sigmas, model, precondition)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_timestep_densities_and_the_schedules_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 20_000
    u = timestep_density(FlowObjective("logit_normal"), n, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(u, torch.sigmoid(torch.normal(0.0, 1.0, (n,), generator=g)))
    mode = FlowObjective("mode", mode_scale=1.29)
    u = timestep_density(mode, n, torch.Generator().manual_seed(1))
    r = torch.rand(n, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(u, 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t, s = timesteps_and_sigmas(scheduler, torch.tensor([0.0, 0.5, 0.9999]))
    index = torch.tensor([0, 500, 999])
    assert torch.equal(t, scheduler.timesteps[index]) and torch.equal(s, scheduler.sigmas[index])
    assert torch.allclose(t, s * 1000)  # the script's timestep is 1000·σ
    t, s = sigma_timesteps(scheduler, 0.5, 3)
    assert len(t) == 3 and abs(s[0].item() - 0.5) < 2e-3


# -- tiny-sd3 through the stages ----------------------------------------------------------

CACHE = CacheConfig(resolution=32, random_flip=True)
TRAIN = TrainConfig(train_batch_size=4, max_train_steps=4, checkpointing_steps=2,
                    learning_rate=1e-3, shuffle_buffer=8, report_to="none",
                    proportion_empty_prompts=0.25)  # fmt: skip
SD3_EVAL = EVAL.model_copy(update={"gate": GateConfig(max_val_loss_ratio=None)})


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    base_model.run(ModelConfig(source="tiny-sd3", tiny_vae_steps=8), root / "base")
    make_sample(root / "src", 30)
    pack_shards.run(DataConfig(), PackConfig(val_fraction=0.2, shard_max_samples=8),
                    root / "src", root / "shards")  # fmt: skip
    cache_latents.run(CACHE, root / "shards", root / "base", root / "latents")
    return root


def test_sd3_trains_evaluates_publishes_and_loads(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from components.common.records import read_latent_manifest

    manifest = read_latent_manifest(sd3 / "latents")
    assert manifest.vae_shift_factor == pytest.approx(0.1)
    train_unet.run(TRAIN.model_copy(update={"use_ema": True, "weighting_scheme": "cosmap"}),
                   sd3 / "latents", sd3 / "base", tmp_path / "m", tmp_path / "t",
                   tmp_path / "c")  # fmt: skip
    assert (tmp_path / "m" / "transformer" / "config.json").is_file()
    assert not (tmp_path / "m" / "unet").exists()
    report = evaluate.run(SD3_EVAL, tmp_path / "m", sd3 / "base", sd3 / "latents",
                          tmp_path / "e", shards=sd3 / "shards")  # fmt: skip
    assert report.base_val_loss > 0 and report.base_val_loss != report.tuned_val_loss
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "m")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)
    publish.run(PublishConfig(name="sd3", registry=str(tmp_path / "r")), tmp_path / "m",
                tmp_path / "e", tmp_path / "p")  # fmt: skip
    card = (tmp_path / "r" / "sd3" / "1" / "README.md").read_text()
    assert "- sd3" in card and "StableDiffusion3Pipeline.from_pretrained" in card
    assert json.loads((tmp_path / "m" / "training_record.json").read_text())["family"] == "sd3"


def test_a_lora_on_sd3_resumes_exactly_and_loads(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    cfg = TRAIN.model_copy(update={"lora_rank": 4, "lora_alpha": 8.0})
    train_then_resume(cfg, sd3 / "latents", sd3 / "base", tmp_path, "checkpoint-4")
    a = load_file(tmp_path / "a" / "m" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "m" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.") for k in a)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3 / "base")
    pipe.load_lora_weights(tmp_path / "a" / "m")
    evaluate.run(SD3_EVAL, tmp_path / "a" / "m", sd3 / "base", sd3 / "latents", tmp_path / "e",
                 shards=sd3 / "shards")  # fmt: skip


def test_cached_text_states_give_the_loss_of_running_the_encoders(sd3, tmp_path):
    from safetensors.torch import load as st_load

    from components.common.shards import read_shard

    cache_latents.run(CACHE.model_copy(update={"text_embeddings": True}), sd3 / "shards",
                      sd3 / "base", tmp_path / "lat")  # fmt: skip
    shard = json.loads((tmp_path / "lat" / "manifest.json").read_text())["shards"][0]["name"]
    tensors = st_load(next(iter(read_shard(tmp_path / "lat" / shard)))["safetensors"])
    assert tensors["encoder_hidden_states"].shape == (77 + 77, 64)  # CLIPs' 77, T5's 77
    assert tensors["text_embeds"].shape == (64,) and "input_ids_3" in tensors
    cached, encoded = cached_and_encoded_losses(sd3 / "base", tensors, scaling_factor=1.0,
                                                shift_factor=0.1)  # fmt: skip
    assert cached == pytest.approx(encoded, rel=1e-4)


def test_denoising_flags_are_refused_for_flow_matching(sd3, tmp_path):
    for key, value in (("snr_gamma", 5.0), ("prediction_type", "epsilon"),
                       ("timestep_bias_strategy", "later")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"train.{key}: not used by flow matching"):
            train_unet.run(TRAIN.model_copy(update={key: value}), sd3 / "latents", sd3 / "base",
                           tmp_path / "m", tmp_path / "t", tmp_path / "c")  # fmt: skip
    assert not (tmp_path / "m").exists()
