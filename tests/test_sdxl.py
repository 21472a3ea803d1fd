"""SDXL through the same stages (`model.source: tiny-sdxl`, and an SDXL built otherwise):
two text encoders, the pooled embedding and the size/crop ids the cache took from its
own crop; full and LoRA training with buckets; the XL pipeline evaluates, loads and
generates; the card names the family."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load

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
from components.common.shapes import make_sample
from components.common.shards import read_shard

from .conftest import EVAL, cached_and_encoded_losses, train_then_resume

# Six steps on 32 samples: the gate is not what these tests judge.
XL_EVAL = EVAL.model_copy(update={"gate": GateConfig(max_val_loss_ratio=None)})

SHAPES = [(64, 64), (96, 48), (48, 96)]
CACHE = CacheConfig(resolution=32, buckets=True, random_flip=True, center_crop=False)
TRAIN = TrainConfig(
    train_batch_size=4,
    max_train_steps=6,
    checkpointing_steps=3,
    learning_rate=1e-3,
    shuffle_buffer=8,
    report_to="none",
    proportion_empty_prompts=0.25,
    snr_gamma=5.0,
)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base_model.run(ModelConfig(source="tiny-sdxl", tiny_vae_steps=8), root / "base")
    make_sample(root / "src", 40)
    for i, path in enumerate(sorted((root / "src").glob("*.png"))):
        Image.open(path).convert("RGB").resize(SHAPES[i % 3], Image.LANCZOS).save(path)
    pack = PackConfig(val_fraction=0.2, shard_max_samples=10)
    pack_shards.run(DataConfig(), pack, root / "src", root / "shards")
    cache_latents.run(CACHE, root / "shards", root / "base", root / "latents")
    return root


def _records(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in read_shard(folder / s["name"])]


def test_the_cache_holds_both_tokenizers_ids_and_the_crop_it_made(xl):
    for record in _records(xl / "latents"):
        meta, t = json.loads(record["json"]), st_load(record["safetensors"])
        assert {"input_ids", "input_ids_2", "time_ids", "time_ids_flip"} <= set(t)
        (h, w), (top, left) = meta["original_size"], meta["crop_coords_top_left"]
        th, tw = meta["target_size"]
        assert [tw, th] == meta["bucket"] and t["mean"].shape[1:] == (th // 4, tw // 4)
        assert t["time_ids"].tolist() == [h, w, top, left, th, tw]
        # The flipped latent's crop is the mirror of the crop, from its own left edge.
        scale = max(tw / w, th / h)
        resized_w = max(tw, round(w * scale))
        assert t["time_ids_flip"].tolist() == [h, w, top, resized_w - left - tw, th, tw]
    crops = {tuple(json.loads(r["json"])["crop_coords_top_left"]) for r in _records(xl / "latents")}
    assert len(crops) > 1  # random crops: the ids follow each one


def test_a_full_fine_tune_evaluates_publishes_and_loads_in_the_xl_pipeline(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = TRAIN.model_copy(update={"use_ema": True, "timestep_bias_strategy": "later",
                                   "timestep_bias_multiplier": 2.0})  # fmt: skip
    report = train_unet.run(cfg, xl / "latents", xl / "base", tmp_path / "m", tmp_path / "t",
                            tmp_path / "c")  # fmt: skip
    assert report.steps == 6 and report.final_loss == report.final_loss
    result = evaluate.run(XL_EVAL, tmp_path / "m", xl / "base", xl / "latents", tmp_path / "e",
                          shards=xl / "shards")  # fmt: skip
    assert result.base_val_loss > 0 and (tmp_path / "e" / "report.html").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)
    cfg = PublishConfig(name="xl", registry=str(tmp_path / "registry"))
    publish.run(cfg, tmp_path / "m", tmp_path / "e", tmp_path / "p")
    card = (tmp_path / "registry" / "xl" / "1" / "README.md").read_text()
    assert "- stable-diffusion-xl" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    assert "Stable Diffusion XL" in card
    record = json.loads((tmp_path / "m" / "training_record.json").read_text())
    assert record["family"] == "sdxl"


def test_a_lora_on_sdxl_loads_from_both_files_and_resumes_exactly(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from components.common.io import sha256_file

    cfg = TRAIN.model_copy(update={"lora_rank": 4, "lora_alpha": 8.0})
    straight, resumed = train_then_resume(cfg, xl / "latents", xl / "base", tmp_path,
                                          "checkpoint-6")  # fmt: skip
    assert resumed.resumed_from_step == 3
    adapter = "pytorch_lora_weights.safetensors"
    a, b = tmp_path / "a" / "m" / adapter, tmp_path / "b" / "m" / adapter
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # exact
    assert sha256_file(a) == sha256_file(b)  # and the same file: the registry dedupes it
    publish.run(PublishConfig(name="xl-lora", registry=str(tmp_path / "r")),
                tmp_path / "a" / "m", _eval(xl, tmp_path), tmp_path / "p")  # fmt: skip
    kohya = tmp_path / "r" / "xl-lora" / "1" / "xl-lora.kohya.safetensors"
    images = []
    for folder, weight in ((tmp_path / "a" / "m", adapter), (kohya.parent, kohya.name)):
        pipe = StableDiffusionXLPipeline.from_pretrained(xl / "base")
        pipe.load_lora_weights(folder, weight_name=weight)
        images.append(_generate(pipe))
    torch.testing.assert_close(images[0], images[1])
    base = _generate(StableDiffusionXLPipeline.from_pretrained(xl / "base"))
    assert not torch.allclose(base, images[0])  # the adapter does something


def _generate(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32,
                generator=generator, output_type="pt").images  # fmt: skip


def _eval(xl, tmp_path):
    out = tmp_path / "e"
    evaluate.run(
        XL_EVAL, tmp_path / "a" / "m", xl / "base", xl / "latents", out, shards=xl / "shards"
    )
    return out


def other_sdxl(folder):
    """An SDXL built without our builder, the way diffusers' own SDXL tests build one:
    two layers per block, one norm group, encoders 24 and 40 wide of five layers, a
    random VAE, and for the second encoder a fast tokenizer (tokenizer.json) with
    SDXL's own pad token "!", as the real tokenizer_2 has."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizerFast,
    )

    from components.common.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 40, cross_attention_dim=64,
        norm_num_groups=1,
    )  # fmt: skip
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        sample_size=128, force_upcast=True)  # fmt: skip

    def clip(cls, width):
        return cls(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=5, projection_dim=width,
            hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, layer_norm_eps=1e-5,
        ))  # fmt: skip

    tok.save_pretrained(folder / "slow")
    fast = CLIPTokenizerFast.from_pretrained(folder / "slow", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(CLIPTextModel, 24),
        text_encoder_2=clip(CLIPTextModelWithProjection, 40), tokenizer=tok,
        tokenizer_2=fast, unet=unet, scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            steps_offset=1, timestep_spacing="leading"),
    )  # fmt: skip
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def test_an_sdxl_built_otherwise_trains_with_cached_text_states(xl, tmp_path):
    """Cached text embeddings of an SDXL not made by `tiny-sdxl`: the loss from the
    cache equals the loss from running the encoders; it trains and evaluates."""

    other = other_sdxl(tmp_path)
    assert (other / "tokenizer_2" / "tokenizer.json").is_file()
    cache = CacheConfig(resolution=32, text_embeddings=True)
    cache_latents.run(cache, xl / "shards", other, tmp_path / "lat")
    tensors = st_load(_records(tmp_path / "lat")[0]["safetensors"])
    assert tensors["encoder_hidden_states"].shape[-1] == 64
    assert tensors["text_embeds"].shape == (40,) and tensors["mean"].shape == (4, 16, 16)
    cached, encoded = cached_and_encoded_losses(other, tensors, scaling_factor=0.5)
    assert cached == pytest.approx(encoded, rel=1e-4)
    train = TRAIN.model_copy(update={"max_train_steps": 2})
    train_unet.run(train, tmp_path / "lat", other, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    report = evaluate.run(XL_EVAL, tmp_path / "m", other, tmp_path / "lat", tmp_path / "e",
                          shards=xl / "shards")  # fmt: skip
    assert report.tuned_val_loss > 0


def test_the_fp16_fix_vae_makes_the_latents_and_is_saved_with_the_model(xl, tmp_path):
    """`cache.pretrained_vae_model_name_or_path`: that VAE encodes (its hash in the key),
    and a full fine-tune saves it in place of the base's; without it, SDXL's own VAE
    runs in fp32 whatever `vae_dtype` asks."""
    from diffusers import AutoencoderKL

    from components.cache_latents.encode import vae_compute_dtype
    from components.common.models import weights_sha256
    from components.common.records import read_latent_manifest

    torch.manual_seed(5)
    fixed = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3,
                          block_out_channels=(32, 64, 64), latent_channels=4,
                          force_upcast=False)  # fmt: skip
    fixed.save_pretrained(tmp_path / "fix")
    cache = CACHE.model_copy(update={"pretrained_vae_model_name_or_path": str(tmp_path / "fix")})
    cache_latents.run(cache, xl / "shards", xl / "base", tmp_path / "lat")
    key = read_latent_manifest(tmp_path / "lat").model["vae"]
    assert key == weights_sha256(tmp_path, "fix", check=False) != weights_sha256(xl / "base", "vae")
    train = TRAIN.model_copy(update={"max_train_steps": 1})
    train_unet.run(train, tmp_path / "lat", xl / "base", tmp_path / "m", tmp_path / "t",
                   tmp_path / "c")  # fmt: skip
    assert weights_sha256(tmp_path / "m", "vae") == key
    assert vae_compute_dtype(CACHE.model_copy(update={"vae_dtype": "bf16"}), "cuda", False, True)\
        == torch.float32  # fmt: skip
    with pytest.raises(ConfigError, match="pretrained_vae_model_name_or_path 'nowhere/vae'"):
        cache_latents.run(CACHE.model_copy(update={"pretrained_vae_model_name_or_path":
                                                   "nowhere/vae"}),
                          xl / "shards", xl / "base", tmp_path / "l2")  # fmt: skip
    assert not (tmp_path / "l2").exists()


@pytest.mark.slow
def test_two_gloo_processes_on_sdxl_equal_one_with_twice_the_batch(xl, tmp_path):
    """DDP on SDXL with buckets (the added conditioning is sliced per rank like the rest)."""
    from components.cli import main

    common = {"max_train_steps": 2, "data_streams": 2, "report_to": "none", "shuffle_buffer": 8,
              "proportion_empty_prompts": 0.0, "snr_gamma": None}  # fmt: skip
    one = TRAIN.model_copy(update={**common, "train_batch_size": 4})
    train_unet.run(one, xl / "latents", xl / "base", tmp_path / "one", tmp_path / "r1",
                   tmp_path / "c1")  # fmt: skip
    argv = [
        "train",
        "--num-processes",
        "2",
        "--latents",
        str(xl / "latents"),
        "--model",
        str(xl / "base"),
        "--out",
        str(tmp_path / "two"),
        "--reports",
        str(tmp_path / "r2"),
        "--checkpoints",
        str(tmp_path / "c2"),
        "--set",
        "evaluate.heldout_captions=4",
    ]
    sets = {**common, "train_batch_size": 2, "learning_rate": 0.001, "shuffle_buffer": 8,
            "lr_scheduler": "constant", "checkpointing_steps": 3}  # fmt: skip
    for k, v in sets.items():
        argv += ["--set", f"train.{k}={'null' if v is None else v}"]
    assert main(argv) == 0
    losses = [
        [float(line.split(",")[1]) for line in (tmp_path / r / "loss.csv").read_text().split()[1:]]
        for r in ("r1", "r2")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_timestep_bias_is_the_sdxl_scripts_and_family_errors_are_one_line(xl, tmp_path):
    from components.common.families import family_of
    from components.train_unet.objective import timestep_weights

    def upstream(strategy, multiplier, begin, end, portion, n=1000):  # the script's formula
        w = torch.ones(n)
        k = int(portion * n)
        idx = {"later": slice(n - k, n), "earlier": slice(0, k), "range": slice(begin, end)}
        w[idx[strategy]] *= multiplier
        return w / w.sum()

    for strategy in ("later", "earlier", "range"):
        cfg = TrainConfig(timestep_bias_strategy=strategy, timestep_bias_multiplier=3.0,
                          timestep_bias_begin=200, timestep_bias_end=300)  # fmt: skip
        torch.testing.assert_close(
            timestep_weights(cfg, 1000), upstream(strategy, 3.0, 200, 300, 0.25)
        )
    assert timestep_weights(TrainConfig(), 1000) is None
    with pytest.raises(ConfigError, match="timestep_bias_end 2000: beyond"):
        timestep_weights(TrainConfig(timestep_bias_strategy="range", timestep_bias_end=2000), 1000)
    with pytest.raises(ConfigError, match="dream_training: not for Stable Diffusion XL"):
        train_unet.run(TRAIN.model_copy(update={"dream_training": True}), xl / "latents",
                       xl / "base", tmp_path / "m", tmp_path / "t", tmp_path / "c")  # fmt: skip
    assert not (tmp_path / "m").exists()
    broken = tmp_path / "broken"
    shutil.copytree(xl / "base", broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="lacks text_encoder_2; it is not a complete Stable"):
        family_of(broken)
