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
    assert (
        "FlowMatchEulerDiscreteScheduler (the family"
        in (tmp_path / "e" / "report.html").read_text()
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "m")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)
    publish.run(PublishConfig(name="sd3", registry=str(tmp_path / "r")), tmp_path / "m",
                tmp_path / "e", tmp_path / "p")  # fmt: skip
    card = (tmp_path / "r" / "sd3" / "1" / "README.md").read_text()
    assert "- sd3" in card and "StableDiffusion3Pipeline.from_pretrained" in card
    assert not (tmp_path / "r" / "sd3" / "1" / "sd3.safetensors").exists()  # tiny: refused
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


# -- tiny-flux --------------------------------------------------------------------------

FLUX_LORA = TRAIN.model_copy(update={"lora_rank": 4, "lora_alpha": 8.0, "max_train_steps": 6,
                                     "checkpointing_steps": 2, "lora_dropout": 0.1})  # fmt: skip


@pytest.fixture(scope="module")
def flux(sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    base_model.run(ModelConfig(source="tiny-flux", tiny_vae_steps=8), root / "base")
    cache = CACHE.model_copy(update={"text_embeddings": True})  # the families' default
    cache_latents.run(cache, sd3 / "shards", root / "base", root / "latents")
    return root


def test_flux_lora_sigkill_then_resume_is_bit_exact(flux, sd3, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from .conftest import REPO
    from .test_train import _KILL_AFTER_CHECKPOINT

    straight = tmp_path / "straight"
    args = [flux / "latents", flux / "base"]
    train_unet.run(FLUX_LORA, *args, straight / "m", straight / "t", straight / "c")
    paths = [*args, tmp_path / "m", tmp_path / "t", tmp_path / "c"]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_CHECKPOINT, "4", FLUX_LORA.model_dump_json()]
        + [str(p) for p in paths],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    report = train_unet.run(FLUX_LORA, *paths)
    assert report.resumed_from_step == 4
    a = load_file(tmp_path / "m" / "pytorch_lora_weights.safetensors")
    b = load_file(straight / "m" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "t" / "loss.csv").read_text() == (straight / "t" / "loss.csv").read_text()
    # The adapter loads onto the base pipeline and is evaluated against it.
    out = evaluate.run(SD3_EVAL, tmp_path / "m", flux / "base", flux / "latents", tmp_path / "e",
                       shards=sd3 / "shards")  # fmt: skip
    assert out.base_val_loss > 0
    publish.run(PublishConfig(name="flux-lora", registry=str(tmp_path / "r")), tmp_path / "m",
                tmp_path / "e", tmp_path / "p")  # fmt: skip
    card = (tmp_path / "r" / "flux-lora" / "1" / "README.md").read_text()
    assert "- flux" in card and "FluxPipeline.from_pretrained" in card and "- lora" in card
    assert "offline tiny FLUX.1 model (t2i-pipeline's `tiny-flux`)" in card
    # Its kohya file names FLUX's original modules, as ComfyUI matches them.
    from components.publish.transformer_file import to_original

    kohya = load_file(tmp_path / "r" / "flux-lora" / "1" / "flux-lora.kohya.safetensors")
    base = load_file(flux / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
    names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
             for k in to_original(base, "flux")}  # fmt: skip
    assert {k.split(".")[0] for k in kohya} <= names
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in kohya
    assert "models/loras/" in card and "kohya" in card


def test_a_full_flux_fine_tune_on_buckets_loads_and_generates(flux, sd3, tmp_path):
    """Many aspect ratios (packed 2x2 whatever the bucket), gradient checkpointing, EMA."""
    from diffusers import FluxPipeline
    from PIL import Image

    make_sample(tmp_path / "src", 30)
    for i, path in enumerate(sorted((tmp_path / "src").glob("*.png"))):
        Image.open(path).convert("RGB").resize([(64, 64), (96, 48), (48, 96)][i % 3]).save(path)
    pack_shards.run(DataConfig(), PackConfig(val_fraction=0.2, shard_max_samples=8),
                    tmp_path / "src", tmp_path / "shards")  # fmt: skip
    cache = CACHE.model_copy(update={"buckets": True, "center_crop": False})
    cache_latents.run(cache, tmp_path / "shards", flux / "base", tmp_path / "latents")
    from components.common.records import read_latent_manifest

    used = {s for shard in read_latent_manifest(tmp_path / "latents").shards
            for s in shard.sample_buckets}  # fmt: skip
    assert len(used) == 3  # 64x64, 96x48 and 48x96: three aspect ratios
    cfg = TRAIN.model_copy(update={"guidance_scale": 3.5, "weighting_scheme": "logit_normal",
                                   "gradient_checkpointing": True, "use_ema": True})  # fmt: skip
    train_unet.run(cfg, tmp_path / "latents", flux / "base", tmp_path / "m", tmp_path / "t",
                   tmp_path / "c")  # fmt: skip
    assert len((tmp_path / "t" / "loss.csv").read_text().split()) == 1 + 4
    pipe = FluxPipeline.from_pretrained(tmp_path / "m")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=64, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 32)


def test_flux_cached_text_states_and_packing(flux, sd3, tmp_path):
    """The cached CLIP-pooled and T5 states give the loss of running the encoders; the
    2x2 packing round-trips (an identity transformer returns its input)."""
    from types import SimpleNamespace

    from safetensors.torch import load as st_load

    from components.common.conditioning import predict
    from components.common.families import FLUX
    from components.common.shards import read_shard

    shard = json.loads((flux / "latents" / "manifest.json").read_text())["shards"][0]["name"]
    tensors = st_load(next(iter(read_shard(flux / "latents" / shard)))["safetensors"])
    assert tensors["encoder_hidden_states"].shape == (512, 32) and tensors["text_embeds"].shape == (
        32,
    )
    cached, encoded = cached_and_encoded_losses(flux / "base", tensors, scaling_factor=1.0,
                                                shift_factor=0.1)  # fmt: skip
    assert cached == pytest.approx(encoded, rel=1e-4)

    class Identity:
        config = SimpleNamespace(guidance_embeds=True)

        def __call__(self, hidden_states, **kw):
            assert kw["img_ids"].shape == (hidden_states.shape[1], 3) and kw["guidance"][0] == 2.0
            return (hidden_states,)

    x = torch.randn(2, 4, 8, 6)
    out = predict(FLUX, Identity(), x, torch.tensor([500.0, 500.0]), torch.zeros(2, 5, 32),
                  {"pooled_projections": torch.zeros(2, 32)}, guidance=2.0)  # fmt: skip
    assert torch.equal(out, x)


def test_a_non_commercial_base_license_binds_the_card_and_is_not_overridden_silently(
    flux, sd3, tmp_path
):
    import shutil

    import yaml

    dev = tmp_path / "dev"
    shutil.copytree(flux / "base", dev)
    (dev / "README.md").write_text(
        "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n"
        "license_link: LICENSE.md\n---\n# a FLUX.1 dev stand-in\n"
    )
    base_model.run(ModelConfig(source=str(dev)), tmp_path / "base")
    train = TRAIN.model_copy(update={"lora_rank": 4, "max_train_steps": 1})
    train_unet.run(train, flux / "latents", tmp_path / "base", tmp_path / "m", tmp_path / "t",
                   tmp_path / "c")  # fmt: skip
    evaluate.run(SD3_EVAL, tmp_path / "m", tmp_path / "base", flux / "latents", tmp_path / "e",
                 shards=sd3 / "shards")  # fmt: skip
    with pytest.raises(ConfigError, match="publish.license 'mit' contradicts the base model's"):
        publish.run(PublishConfig(name="dev", registry=str(tmp_path / "r"), license="mit"),
                    tmp_path / "m", tmp_path / "e", tmp_path / "p")  # fmt: skip
    assert not (tmp_path / "r" / "dev").exists()
    publish.run(PublishConfig(name="dev", registry=str(tmp_path / "r")), tmp_path / "m",
                tmp_path / "e", tmp_path / "p")  # fmt: skip
    card = (tmp_path / "r" / "dev" / "1" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert (
        meta["license"] == "other" and meta["license_name"] == "flux-1-dev-non-commercial-license"
    )
    assert "**non-commercial use only**" in card
    override = PublishConfig(name="dev2", registry=str(tmp_path / "r"), license="mit",
                             license_override=True)  # fmt: skip
    publish.run(override, tmp_path / "m", tmp_path / "e", tmp_path / "p2")
    card = (tmp_path / "r" / "dev2" / "1" / "README.md").read_text()
    assert "license: mit" in card and "non-commercial use only" not in card


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_two_gloo_processes_equal_one_with_twice_the_batch(family, request, tmp_path):
    """DDP on FLUX with a LoRA (packed latents, cached text, the guidance embedding) and
    on SD3 in full (preconditioned outputs): the per-rank σ draws and the gradient
    average give the single process's losses."""
    from components.cli import main

    root = request.getfixturevalue(family)  # its base and latents
    adapter = {"lora_rank": 4, "lora_alpha": 8.0} if family == "flux" else {}
    common = {"max_train_steps": 2, "data_streams": 2, "shuffle_buffer": 8, **adapter,
              "proportion_empty_prompts": 0.0, "lr_scheduler": "constant",
              "checkpointing_steps": 3, "weighting_scheme": "logit_normal"}  # fmt: skip
    one = TRAIN.model_copy(update={**common, "train_batch_size": 4})
    train_unet.run(one, root / "latents", root / "base", tmp_path / "one", tmp_path / "r1",
                   tmp_path / "c1")  # fmt: skip
    argv = ["train", "--num-processes", "2", "--latents", str(root / "latents"), "--model",
            str(root / "base"), "--out", str(tmp_path / "two"), "--reports",
            str(tmp_path / "r2"), "--checkpoints", str(tmp_path / "c2"), "--set",
            "evaluate.heldout_captions=4"]  # fmt: skip
    sets = {**common, "train_batch_size": 2, "learning_rate": 0.001, "report_to": "none"}
    for k, v in sets.items():
        argv += ["--set", f"train.{k}={v}"]
    assert main(argv) == 0
    losses = [
        [float(line.split(",")[1]) for line in (tmp_path / r / "loss.csv").read_text().split()[1:]]
        for r in ("r1", "r2")
    ]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
