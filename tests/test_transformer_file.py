"""SD3's and FLUX's files in their original layouts read back through diffusers' own
readers (`from_single_file`, its FLUX converter, `FluxPipeline.lora_state_dict`), and
the kohya LoRA is the fine-tune's delta under ComfyUI's rule for applying one.

diffusers' FLUX readers hard-code FLUX.1's width (3072, an MLP of 12288) where they
split a fused weight; a transformer that wide does not fit a CPU test, so those checks
run the conversion on state dicts of FLUX's key set with FLUX's row counts and one
column. The SD3 reader takes its sizes from the file, so a narrow model with SD3's
topology (64-wide heads, as many as blocks, qk norms, a dual-attention block) and a
16-channel VAE of four levels goes the whole way: file, pipeline, image."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from components.publish import transformer_file as tf

FLUX_ROWS = {"to_q": 3072, "to_k": 3072, "to_v": 3072, "proj_mlp": 12288}


@pytest.fixture(scope="module")
def tiny_flux_state():
    from components.base_model.tiny import build_tiny_flux

    return {k: v.clone() for k, v in build_tiny_flux(0).transformer.state_dict().items()}


def flux_width(state: dict, seed: int = 0) -> dict:
    """`state` with its single blocks' fused parts as tall as FLUX.1's, one column wide."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        part = key.split(".")[-2]
        if key.startswith("single_transformer_blocks.") and part in FLUX_ROWS:
            value = torch.randn((FLUX_ROWS[part], *value.shape[1:2]), generator=g)
        out[key] = value
    return out


def sd3_pipeline():
    """tiny-sd3's encoders and scheduler on an MMDiT of SD3's topology (two blocks of
    two 64-wide heads, patch 2, rms qk norms, dual attention in block 0) and a
    16-channel VAE of four levels of two layers, narrow."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from components.base_model.tiny import build_tiny_sd3

    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=16,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    )  # fmt: skip
    torch.manual_seed(2)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8,
        latent_channels=16, sample_size=64, shift_factor=0.06, scaling_factor=1.5,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    parts = {**build_tiny_sd3(0).components, "transformer": transformer, "vae": vae}
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # built, not loaded: no dropout
    return StableDiffusion3Pipeline(**parts)


def test_sd3_single_file_round_trips_through_from_single_file(tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    from components.common.config import PublishConfig
    from components.publish import exports
    from components.publish.card import _export_lines

    pipe = sd3_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    train = SimpleNamespace(family="sd3", adapter=None, config={})
    found = exports(PublishConfig(name="sd3"), tmp_path / "m", train, tmp_path / "x")
    (name, (out, entry)), *more = found.items()
    assert name == "sd3.safetensors" and not more
    assert "3.5 original layout, MMDiT + VAE" in entry["format"]
    lines = "\n".join(_export_lines({name: entry}, train))
    assert "models/checkpoints/" in lines and "TripleCLIPLoader" in lines
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model"}
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.proj.weight" not in keys

    config = str(tmp_path / "m")
    for part, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        back = cls.from_single_file(str(out), config=config, subfolder=part).state_dict()
        mine = getattr(pipe, part).state_dict()
        assert back.keys() == mine.keys() and all(torch.equal(back[k], mine[k]) for k in mine)

    loaded = StableDiffusion3Pipeline.from_single_file(
        str(out), config=config, **{k: getattr(pipe, k) for k in
        ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
         "tokenizer_3")},
    )  # fmt: skip

    def image(p):
        return p("a red square", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    assert torch.allclose(image(loaded), image(pipe), atol=1e-6)


def test_flux_single_file_reads_back_through_diffusers_converter(tiny_flux_state):
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    state = flux_width(tiny_flux_state)
    original = tf.to_original(state, "flux")
    assert "single_blocks.0.linear1.weight" in original
    assert original["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (16,)
    left = dict(original)
    back = convert_flux_transformer_checkpoint_to_diffusers(left)
    assert not left  # the reader consumed every key we wrote
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _lora(state: dict, modules, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for m in modules:
        out_rows, in_cols = state[f"{m}.weight"].shape
        lora[f"{m}.lora_A.weight"] = torch.randn(rank, in_cols, generator=g)
        lora[f"{m}.lora_B.weight"] = torch.randn(out_rows, rank, generator=g)
    return lora


def _delta(lora: dict, module: str, scale: float) -> torch.Tensor:
    return scale * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]


def test_flux_kohya_lora_reads_back_through_diffusers(tiny_flux_state, tmp_path):
    """Every linear module, the single blocks' q/k/v without the MLP (zero rows for it),
    and the final layer (diffusers ignores alpha there: it is baked in)."""
    from diffusers import FluxPipeline

    state = flux_width(tiny_flux_state)
    modules = [k[: -len(".weight")] for k, v in state.items()
               if k.endswith(".weight") and v.ndim == 2 and "proj_mlp" not in k]  # fmt: skip
    lora = _lora(state, modules, rank=4, seed=1)
    kohya = tf.lora_to_kohya(lora, "flux", alpha=8.0)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 24.0  # 3 parts of rank 4
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 12)
    save_file(kohya, str(tmp_path / "k.safetensors"))
    back = FluxPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    for m in modules:
        a = back.get(f"transformer.{m}.lora_A.weight", back.get(f"{m}.lora_A.weight"))
        b = back.get(f"transformer.{m}.lora_B.weight", back.get(f"{m}.lora_B.weight"))
        assert a is not None, m
        assert torch.allclose(b @ a, _delta(lora, m, 8.0 / 4), atol=1e-4), m
    mlp = back["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    assert not mlp.any()  # the MLP had no LoRA


def _comfy_apply(base: dict, kohya: dict) -> dict:
    """ComfyUI's rule: `lora_unet_<key with _>` names the original weight `key`, and
    it gains alpha / rank * up @ down."""
    names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in base}
    out = dict(base)
    for key in kohya:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = kohya[key], kohya[f"{name}.lora_up.weight"]
            weight = names[name]  # a KeyError: a LoRA on no weight of the checkpoint
            out[weight] = out[weight] + kohya[f"{name}.alpha"] / down.shape[0] * up @ down
    return out


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_kohya_lora_is_the_fine_tunes_delta_under_comfyuis_rule(family, tiny_flux_state):
    """Merged in diffusers' layout, then written out, equals written out, then the kohya
    LoRA applied: partial q/k/v groups, FLUX's MLP in a fused weight, the swapped
    (shift, scale) modulations."""
    if family == "flux":
        state = tiny_flux_state
        modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
                   "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
                   "single_transformer_blocks.0.attn.to_k",
                   "single_transformer_blocks.0.proj_mlp", "norm_out.linear",
                   "single_transformer_blocks.0.proj_out"]  # fmt: skip
    else:
        state = {k: v.clone() for k, v in sd3_pipeline().transformer.state_dict().items()}
        modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                   "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn2.to_v",
                   "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                   "transformer_blocks.1.norm1_context.linear", "norm_out.linear",
                   "transformer_blocks.1.ff.net.0.proj"]  # fmt: skip
    lora = _lora(state, modules, rank=2, seed=3)
    merged = dict(state)
    for m in modules:
        merged[f"{m}.weight"] = state[f"{m}.weight"] + _delta(lora, m, 3.0 / 2)
    applied = _comfy_apply(tf.to_original(state, family), tf.lora_to_kohya(lora, family, 3.0))
    want = tf.to_original(merged, family)
    assert applied.keys() == want.keys()
    assert all(torch.allclose(applied[k], want[k], atol=1e-5) for k in want)
    assert any(not torch.equal(applied[k], tf.to_original(state, family)[k]) for k in want)


def test_sizes_the_loaders_cannot_read_are_refused_in_one_line(tmp_path):
    from components.base_model.tiny import build_tiny_flux

    build_tiny_flux(0).save_pretrained(tmp_path / "flux")
    with pytest.raises(tf.Unsupported, match=r"not FLUX.1's \(width 3072\).*2 heads of 16"):
        tf.export_checkpoint(tmp_path / "flux", tmp_path / "f.safetensors", "flux")
    assert not (tmp_path / "f.safetensors").exists()
    with pytest.raises(Exception, match="transformer_blocks.0.attn.to_r: no place"):
        tf.to_original({"transformer_blocks.0.attn.to_r.weight": torch.zeros(1)}, "flux")
