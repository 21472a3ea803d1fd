"""Single-file exports round-trip through diffusers' own loaders: the LDM checkpoint
through `from_single_file`, the kohya LoRA through `load_lora_weights`.

The models have SD 1.x's and SD 2.x's real topology (four levels of two layers,
attention in the first three; a VAE of four levels of two), scaled down in width to
run on CPU. Their text encoders are tiny CLIPs, which `from_single_file` loads with the
folder as `config` (it cannot tell a tiny CLIP's shape from the file alone)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.base_model.tiny import clip_config
from components.common.config import PublishConfig, TrainConfig
from components.common.tiny import build_tiny_tokenizer
from components.publish import exports, single_file


def sd_pipeline(v2: bool):
    """SD 1.x's topology (CLIP text encoder), or SD 2.x's (OpenCLIP's, converted:
    gelu, linear projections in the transformers), narrow."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextModel

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet(sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
                use_linear_projection=v2)  # fmt: skip
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=2,
                        norm_num_groups=8, latent_channels=4, sample_size=64)  # fmt: skip
    text = CLIPTextModel(clip_config(tok, 32, 2, "gelu" if v2 else "quick_gelu"))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)  # fmt: skip
    parts = dict(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def images(pipe):
    generator = torch.Generator().manual_seed(0)
    out = pipe(["a red square", "a blue circle"], num_inference_steps=2, height=64, width=64,
               generator=generator, output_type="np")  # fmt: skip
    return out.images


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_the_checkpoint_round_trips_through_from_single_file(v2, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "model"
    sd_pipeline(v2).save_pretrained(folder)
    path = single_file.export_checkpoint(folder, tmp_path / "m.safetensors")
    tensors = load_file(str(path))
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in tensors
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in tensors
    prefix = "cond_stage_model.model." if v2 else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(prefix) for k in tensors)
    original = StableDiffusionPipeline.from_pretrained(folder)
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )
    for part in ("unet", "vae", "text_encoder"):  # every weight, exactly
        mine, theirs = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert mine.keys() == theirs.keys(), part
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert np.array_equal(images(original), images(loaded))
    half = single_file.export_checkpoint(folder, tmp_path / "h.safetensors", half=True)
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.float16}


def test_a_topology_the_layout_cannot_express_is_one_line(tiny_model, tmp_path):
    with pytest.raises(single_file.Unsupported, match="topology is not SD 1.x/2.x's") as e:
        single_file.export_checkpoint(tiny_model, tmp_path / "m.safetensors")
    assert "layers_per_block 1, not 2" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()
    train = SimpleNamespace(adapter=None)
    assert exports(PublishConfig(name="m"), tiny_model, train, tmp_path) == {}
    off = PublishConfig(name="m", single_file=False)
    folder = tmp_path / "sd"
    sd_pipeline(False).save_pretrained(folder)
    assert exports(off, folder, train, tmp_path) == {}
    (name, (file, entry)), *_ = exports(PublishConfig(name="m"), folder, train, tmp_path).items()
    assert name == "m.safetensors" and entry["sha256"] and entry["bytes"] == file.stat().st_size


def test_the_kohya_lora_loads_as_the_diffusers_one_with_its_real_alpha(tmp_path):
    from diffusers import StableDiffusionPipeline

    from components.train_unet.lora import add_adapter, save_adapter

    folder = tmp_path / "model"
    sd_pipeline(False).save_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    add_adapter(pipe.unet, TrainConfig(lora_rank=4, lora_alpha=12.0))
    with torch.no_grad():  # a trained adapter (its up weights start at zero)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    adapter = tmp_path / "adapter"
    save_adapter(pipe.unet, adapter)
    weights = adapter / "pytorch_lora_weights.safetensors"
    kohya = single_file.export_kohya_lora(weights, adapter / "k.safetensors", alpha=12.0)
    keys = load_file(str(kohya))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert keys[f"{name}.alpha"].item() == 12.0 and keys[f"{name}.lora_down.weight"].shape[0] == 4
    # alpha = rank, as diffusers' own convert_state_dict_to_kohya writes it: not the model
    wrong = single_file.export_kohya_lora(weights, adapter / "w.safetensors", alpha=4.0)

    def with_lora(file):
        p = StableDiffusionPipeline.from_pretrained(folder)
        if file is not None:
            p.load_lora_weights(str(adapter), weight_name=file.name)
        return images(p)

    diffusers_format = with_lora(weights)
    assert np.array_equal(with_lora(kohya), diffusers_format)
    assert not np.allclose(with_lora(wrong), diffusers_format, atol=1e-3)
    assert not np.allclose(with_lora(None), diffusers_format, atol=1e-3)  # it does something
    with pytest.raises(Exception, match="not a LoRA weight this export knows"):
        single_file.export_kohya_lora(folder / "unet" / "diffusion_pytorch_model.safetensors",
                                      tmp_path / "x.safetensors", alpha=1.0)  # fmt: skip
    assert json.loads((folder / "unet" / "config.json").read_text())["layers_per_block"] == 2


def sdxl_pipeline():
    """SDXL's topology (three levels of two layers, attention in the last two,
    `text_time` embeddings; CLIP and CLIP-with-projection text encoders), narrow."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet(sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=64, norm_num_groups=8)  # fmt: skip
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=2,
                        norm_num_groups=8, latent_channels=4, sample_size=64)  # fmt: skip

    def clip(cls, act):
        return cls(clip_config(tok, 32, 2, act))

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1)  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(CLIPTextModel, "quick_gelu"),
        text_encoder_2=clip(CLIPTextModelWithProjection, "gelu"), tokenizer=tok,
        tokenizer_2=build_tiny_tokenizer(), unet=unet, scheduler=scheduler,
    )  # fmt: skip


def test_the_sdxl_checkpoint_round_trips_through_from_single_file(tmp_path):
    """The SGM layout: the XL pipeline's loader gives back every UNet and VAE weight and
    the same images. It does not recognise a 32-wide OpenCLIP from the file alone, so
    the text encoders are checked by mapping the file's keys back here and passed in."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "model"
    sdxl_pipeline().save_pretrained(folder)
    path = single_file.export_checkpoint(folder, tmp_path / "xl.safetensors")
    tensors = load_file(str(path))
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in tensors  # the upsampler
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors
    original = StableDiffusionXLPipeline.from_pretrained(folder)
    proj = tensors["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(proj.T, original.text_encoder_2.text_projection.weight)
    q = original.text_encoder_2.state_dict()["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    fused = tensors["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused[:32], q)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True,
        text_encoder=original.text_encoder, text_encoder_2=original.text_encoder_2,
    )  # fmt: skip
    for part in ("unet", "vae"):
        mine, theirs = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert mine.keys() == theirs.keys(), part
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert np.array_equal(images(original), images(loaded))


def test_the_tiny_sdxl_is_refused_in_one_line(tmp_path):
    from components.base_model.tiny import build_tiny_sdxl

    build_tiny_sdxl(0).save_pretrained(tmp_path / "tiny-xl")
    with pytest.raises(single_file.Unsupported, match="topology is not SDXL's") as e:
        single_file.export_checkpoint(tmp_path / "tiny-xl", tmp_path / "m.safetensors")
    assert "layers_per_block 1, not 2" in str(e.value) and "\n" not in str(e.value)
