"""Files that ComfyUI and AUTOMATIC1111 load: one `.safetensors` checkpoint in the
original (LDM; SDXL: SGM) layout, and a LoRA in kohya's key format.

diffusers converts only from these layouts (`from_single_file`,
`load_lora_weights`), so the mapping the other way is ours. It follows the layout
diffusers' loader reads (`diffusers/loaders/single_file_utils.py`) and its scripts
`scripts/convert_diffusers_to_original_stable_diffusion.py` document:

- the UNet under `model.diffusion_model.`: `input_blocks.N` (conv_in, then per down
  block its layers and its downsampler), `middle_block.0/1/2`, `output_blocks.N` (per
  up block its layers, the upsampler in the last); resnets as `in_layers`,
  `emb_layers`, `out_layers`, `skip_connection`;
- the VAE under `first_stage_model.` (`encoder.down.I.block.J`, `decoder.up` in
  reverse order, the mid attention as 1x1 convolutions `q`, `k`, `v`, `proj_out`);
- SD 1.x's CLIP text encoder under `cond_stage_model.transformer.`; SD 2.x's
  (OpenCLIP) under `cond_stage_model.model.` (`resblocks`, fused `in_proj`);
- SDXL (`convert_diffusers_to_original_sdxl.py`): the same UNet names (three levels;
  `add_embedding` as `label_emb.0`), CLIP ViT-L under
  `conditioner.embedders.0.transformer.`, OpenCLIP bigG under
  `conditioner.embedders.1.model.` with its `text_projection`.

Only the topology those checkpoints have (SD: four levels of two layers, attention in
the first three, a mid attention; SDXL: three levels of two, attention in the last
two; a VAE of four levels of two) can be written: anything else (the `tiny` and
`tiny-sdxl` demos) is refused in one line, by `Unsupported`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.common.errors import T2IError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class Unsupported(T2IError):
    """This model cannot be written in the single-file layout (the reason says why)."""


# -- the checkpoint --------------------------------------------------------------


def export_checkpoint(model: Path, out: Path, half: bool = False) -> Path:
    """Write the diffusers pipeline folder `model` as one LDM-layout (SD 1.x/2.x) or
    SGM-layout (SDXL) checkpoint `out`. `half`: fp16 tensors. Unsupported when the
    topology cannot be expressed."""
    from components.common.families import family_of

    model = Path(model)
    xl = family_of(model).micro_conditioning
    unet_cfg = _config(model / "unet")
    vae_cfg = _config(model / "vae")
    text_cfg = _config(model / "text_encoder")
    if xl:
        check_sdxl_topology(unet_cfg, vae_cfg)
    else:
        check_topology(unet_cfg, vae_cfg, text_cfg)
    tensors = {}
    unet = _weights(model / "unet", "diffusion_pytorch_model")
    tensors.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_cfg).items()})
    vae = _weights(model / "vae", "diffusion_pytorch_model")
    tensors.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, vae_cfg).items()})
    text = _text_weights(model / "text_encoder")
    if xl:  # SGM: CLIP ViT-L as embedder 0, OpenCLIP bigG (with its projection) as 1
        tensors.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
        text_2 = _text_weights(model / "text_encoder_2")
        cfg_2 = _config(model / "text_encoder_2")
        tensors.update(text_to_open_clip(text_2, cfg_2, "conditioner.embedders.1.model."))
    elif _is_open_clip(text_cfg):
        tensors.update(text_to_open_clip(text, text_cfg))
    else:
        tensors.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out


def check_topology(unet: dict, vae: dict, text: dict) -> None:
    """Unsupported, naming what differs, unless the model has SD 1.x/2.x's topology."""
    down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    layers, mid = unet.get("layers_per_block"), unet.get("mid_block_type")
    extra = unet.get("addition_embed_type") or unet.get("class_embed_type")
    vae_ok = four_by_two(vae)
    text_class = (text.get("architectures") or ["CLIPTextModel"])[0]
    checks = [
        (list(unet.get("down_block_types", [])) == down, "down blocks not SD's 3 attention + 1"),
        (list(unet.get("up_block_types", [])) == up, "up blocks not SD's 1 + 3 attention"),
        (layers == 2, f"layers_per_block {layers}, not 2"),
        (mid in (None, "UNetMidBlock2DCrossAttn"), f"mid block {mid}"),
        (_one(unet.get("transformer_layers_per_block", 1)), "transformer depth not 1"),
        (not extra, f"extra embeddings ({extra}: an SDXL-like UNet)"),
        (vae_ok, "the VAE is not SD's 4 levels of 2 layers"),
        (text_class == "CLIPTextModel", f"the text encoder is a {text_class}"),
    ]
    failed = [why for ok, why in checks if not ok]
    if failed:
        raise Unsupported(
            "single-file export skipped: the model's topology is not SD 1.x/2.x's, which "
            f"the single-file layout describes ({'; '.join(failed)})"
        )


def check_sdxl_topology(unet: dict, vae: dict) -> None:
    """Unsupported, naming what differs, unless the model has SDXL's topology (three
    levels of two layers, attention in the last two, `text_time` embeddings)."""
    down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    up = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    layers = unet.get("layers_per_block")
    vae_ok = four_by_two(vae)
    checks = [
        (list(unet.get("down_block_types", [])) == down, "down blocks not SDXL's 1 + 2 attention"),
        (list(unet.get("up_block_types", [])) == up, "up blocks not SDXL's 2 attention + 1"),
        (layers == 2, f"layers_per_block {layers}, not 2"),
        (unet.get("addition_embed_type") == "text_time", "no text_time embeddings"),
        (vae_ok, "the VAE is not SDXL's 4 levels of 2 layers"),
    ]
    failed = [why for ok, why in checks if not ok]
    if failed:
        raise Unsupported(
            "single-file export skipped: the model's topology is not SDXL's, which the "
            f"single-file layout describes ({'; '.join(failed)})"
        )


def unet_to_ldm(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM/SGM `UNetModel` keys (without prefix)."""
    layers = cfg["layers_per_block"]
    renames = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's pooled text + size ids
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    levels = len(cfg["block_out_channels"])
    for i in range(levels):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            renames += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1."),
            ]
        renames.append(
            (
                f"down_blocks.{i}.downsamplers.0.conv.",
                f"input_blocks.{(i + 1) * (layers + 1)}.0.op.",
            )
        )
        has_attention = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            renames += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1."),
            ]
        last = i * (layers + 1) + layers
        renames.append(
            (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}.")
        )
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ]
    out = {}
    for key, value in state.items():
        new = _rename(key, renames)
        if ".resnets." in key:  # a resnet's own names, after its block's prefix
            tail = key.split(".resnets.", 1)[1].split(".", 1)[1]
            new = new[: len(new) - len(tail)] + _rename(tail, resnet)
        out[new] = value
    if len(out) != len(state):
        raise T2IError("single-file export: two UNet weights mapped to one name")
    return out


def four_by_two(vae: dict) -> bool:
    """The VAE config has the released VAEs' layout (SD, SDXL, SD3: four levels of two
    layers), the one single-file loaders assume."""
    return len(vae.get("block_out_channels", [])) == 4 and vae.get("layers_per_block") == 2


def vae_to_ldm(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM `AutoencoderKL` keys (without prefix), for the
    VAE config `cfg`'s levels and layers."""
    levels, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    renames = [("encoder.conv_norm_out.", "encoder.norm_out."),
               ("decoder.conv_norm_out.", "decoder.norm_out.")]  # fmt: skip
    for i in range(levels):
        top = levels - 1 - i  # the decoder's up blocks run the other way
        for j in range(layers):
            renames.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            )
        renames.append(
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        )
        for j in range(layers + 1):
            renames.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{top}.block.{j}."))
        renames.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{top}.upsample."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            renames.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        renames.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]  # fmt: skip
    out = {}
    for key, value in state.items():
        new = _rename(key, renames).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.", 1)
            tail = _rename(tail, attention)
            if tail.endswith("weight") and not tail.startswith("norm.") and value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 convolution
            new = f"{head}.mid.attn_1.{tail}"
        out[new] = value
    return out


def text_to_open_clip(
    state: dict[str, torch.Tensor], cfg: dict, prefix: str = "cond_stage_model.model."
) -> dict[str, torch.Tensor]:
    """SD 2.x's text encoder (a CLIPTextModel converted from OpenCLIP), or SDXL's second
    (a CLIPTextModelWithProjection), back to OpenCLIP keys under `prefix` (q, k, v fused
    into `in_proj`; the projection transposed, as OpenCLIP multiplies by it)."""
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    width = cfg["hidden_size"]
    if "text_projection.weight" in state:  # SDXL's: the pooled embedding's projection
        out[prefix + "text_projection"] = state["text_projection.weight"].T
    else:  # diffusers drops OpenCLIP's last layer; the loader wants the projection present.
        out[prefix + "text_projection"] = torch.eye(width)
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


# -- the LoRA ----------------------------------------------------------------------


def export_kohya_lora(adapter: Path, out: Path, alpha: float) -> Path:
    """diffusers' LoRA file `adapter` (`unet.<module>.lora.down.weight`, or PEFT's
    `lora_A`) as a
    kohya file: `lora_unet_<module with _>.lora_down/lora_up.weight` and `.alpha`, the
    real `lora_alpha` (not the rank)."""
    state = load_file(str(adapter))
    kohya: dict[str, torch.Tensor] = {}
    heads = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
    kinds = {".lora.down.weight": "lora_down", ".lora_A.weight": "lora_down",
             ".lora.up.weight": "lora_up", ".lora_B.weight": "lora_up"}  # fmt: skip
    for key, value in state.items():
        head = next((h for h in heads if key.startswith(h)), None)
        kind = next((k for k in kinds if key.endswith(k)), None)
        if head is None or kind is None:
            raise T2IError(f"{adapter}: {key}: not a LoRA weight this export knows")
        name = heads[head] + key[len(head) : -len(kind)].replace(".", "_")
        kohya[f"{name}.{kinds[kind]}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata={"format": "pt"})
    return out


# -- helpers -----------------------------------------------------------------------


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise T2IError(f"{folder}/config.json: unreadable ({e}); re-run `t2i train`") from None


def _weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    if not files:
        raise T2IError(f"{folder}: no {stem}*.safetensors; re-run `t2i train`")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _text_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A text encoder's weights under `text_model.` (transformers >= 5.6 saves them
    flattened), its projection (`text_projection.`) as it is."""
    state = _weights(folder, "model")
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in state.items()
    }


def _rename(key: str, pairs) -> str:
    """`key` with the first matching prefix of `pairs` (old, new) replaced."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _one(depth) -> bool:
    return all(d == 1 for d in depth) if isinstance(depth, list | tuple) else depth == 1


def _is_open_clip(text_cfg: dict) -> bool:
    """SD 2.x's text encoder: OpenCLIP's, converted (gelu; SD 1.x's CLIP: quick_gelu)."""
    return text_cfg.get("hidden_act") == "gelu"
