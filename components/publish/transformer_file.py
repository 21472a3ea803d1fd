"""The original layouts of the flow-matching transformers, which ComfyUI and the
reference code load: SD3/SD3.5's MMDiT (`joint_blocks.N.x_block/context_block`) and
FLUX.1's (`double_blocks`, `single_blocks`), and their LoRAs in kohya's key format.

diffusers converts only from these layouts
(`convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_flux_transformer_checkpoint_to_diffusers`, `_convert_kohya_flux_lora_to_diffusers`
in `diffusers/loaders/`), so the mapping the other way is ours, and it is their inverse:

- q, k and v (FLUX's single blocks: and the MLP's input) are one fused `qkv` (`linear1`)
  weight, in that order;
- the final norm's modulation (and SD3's last block's context modulation, a
  continuous AdaLN) stores (shift, scale) where diffusers stores (scale, shift);
- FLUX's q/k RMS norms keep their weight as `scale`.

A module's LoRA on a fused weight is the parts' LoRAs stacked: the downs concatenated,
the ups block-diagonal (zero rows for a part without one), and alpha times the number of
parts, so that alpha / rank, the scale kohya's and ComfyUI's loaders apply, is unchanged
(FLUX's `final_layer`, where diffusers' reader ignores alpha: the scale baked into the
up weight, alpha = rank).

Only the sizes the loaders assume can be written as a checkpoint (FLUX: width 3072 in
24 heads, as diffusers' converter and ComfyUI's detection hard-code; SD3: 64-wide heads,
as many as blocks); the `tiny-*` demos are refused in one line (`Unsupported`). A LoRA's
keys do not depend on the width, and any is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.common.errors import T2IError
from components.publish import single_file

SD3_PREFIX = "model.diffusion_model."  # as sd3.5_medium.safetensors: the MMDiT and the VAE
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class Slot:
    """Where a diffusers module goes in the original layout: `target` (a module path),
    as part `part` of `parts` stacked along the rows (a part `ratio` times as tall as a
    q/k/v projection), its (scale, shift) halves swapped, its `weight` renamed."""

    target: str
    part: int = 0
    parts: int = 1
    ratio: int = 1
    swap: bool = False
    weight: str = "weight"


_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_NORMS = {"norm_q": "query_norm", "norm_k": "key_norm"}
_FLUX_ADDED_NORMS = {"norm_added_q": "query_norm", "norm_added_k": "key_norm"}
_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
_ADDED_QKV = {"add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}


def flux_slot(module: str) -> Slot | None:
    """The original place of FLUX.1 module `module` (a diffusers path), or None."""
    if module in _FLUX_TOP:
        return Slot(_FLUX_TOP[module])
    if module == "norm_out.linear":
        return Slot("final_layer.adaLN_modulation.1", swap=True)
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m:
        i, rest = m.groups()
        head = f"double_blocks.{i}."
        if rest in _FLUX_DOUBLE:
            return Slot(head + _FLUX_DOUBLE[rest])
        name = rest.removeprefix("attn.")
        if name in _QKV:
            return Slot(head + "img_attn.qkv", _QKV[name], 3)
        if name in _ADDED_QKV:
            return Slot(head + "txt_attn.qkv", _ADDED_QKV[name], 3)
        if name in _FLUX_NORMS:
            return Slot(f"{head}img_attn.norm.{_FLUX_NORMS[name]}", weight="scale")
        if name in _FLUX_ADDED_NORMS:
            return Slot(f"{head}txt_attn.norm.{_FLUX_ADDED_NORMS[name]}", weight="scale")
        return None
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m:
        i, rest = m.groups()
        head = f"single_blocks.{i}."
        name = rest.removeprefix("attn.")
        if rest == "norm.linear":
            return Slot(head + "modulation.lin")
        if rest == "proj_out":
            return Slot(head + "linear2")
        if rest == "proj_mlp":  # diffusers' FLUX: the MLP is 4x the width (mlp_ratio 4)
            return Slot(head + "linear1", 3, 4, ratio=4)
        if rest.startswith("attn.") and name in _QKV:
            return Slot(head + "linear1", _QKV[name], 4)
        if rest.startswith("attn.") and name in _FLUX_NORMS:
            return Slot(f"{head}norm.{_FLUX_NORMS[name]}", weight="scale")
    return None


def sd3_slot(module: str, last: int) -> Slot | None:
    """The original place of SD3 module `module`; `last`: the index of the last block
    (context-only: its context modulation is a continuous AdaLN, stored swapped)."""
    if module in _SD3_TOP:
        return Slot(_SD3_TOP[module])
    if module == "norm_out.linear":
        return Slot("final_layer.adaLN_modulation.1", swap=True)
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if not m:
        return None
    i, rest = m.groups()
    head = f"joint_blocks.{i}."
    if rest in _SD3_BLOCK:
        return Slot(head + _SD3_BLOCK[rest])
    if rest == "norm1_context.linear":
        return Slot(head + "context_block.adaLN_modulation.1", swap=int(i) == last)
    attn, _, name = rest.partition(".")
    if attn == "attn" and name in _QKV:
        return Slot(head + "x_block.attn.qkv", _QKV[name], 3)
    if attn == "attn" and name in _ADDED_QKV:
        return Slot(head + "context_block.attn.qkv", _ADDED_QKV[name], 3)
    if attn == "attn2" and name in _QKV:
        return Slot(head + "x_block.attn2.qkv", _QKV[name], 3)
    return None


def slots_for(family: str, modules) -> dict[str, Slot]:
    """{diffusers module: Slot} for every module of `family` ("sd3", "flux"); a module
    without one is a T2IError naming it."""
    modules = sorted(set(modules))
    if family == "flux":
        found = {m: flux_slot(m) for m in modules}
    elif family == "sd3":
        blocks = [int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")]
        last = max(blocks, default=-1)
        found = {m: sd3_slot(m, last) for m in modules}
    else:
        raise T2IError(f"no original transformer layout for the {family} family")
    missing = [m for m, s in found.items() if s is None]
    if missing:
        raise T2IError(
            f"{family} transformer: {', '.join(missing[:3])}: no place in the original "
            "layout (a module this export does not know)"
        )
    return found


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A diffusers SD3/FLUX transformer state dict in the original layout (no prefix)."""
    if family == "sd3" and "pos_embed.pos_embed" in state:
        state = dict(state)
        pos = state.pop("pos_embed.pos_embed")
    else:
        pos = None
    modules = {k.rsplit(".", 1)[0] for k in state}
    slots = slots_for(family, modules)
    fused: dict[str, dict[int, torch.Tensor]] = {}
    expected: dict[str, int] = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        slot = slots[module]
        name = f"{slot.target}.{slot.weight if param == 'weight' else param}"
        fused.setdefault(name, {})[slot.part] = _swap(value) if slot.swap else value
        expected[name] = slot.parts
    out = {}
    for name, parts in fused.items():
        if len(parts) != expected[name]:
            raise T2IError(f"{family} transformer: {name}: {len(parts)} of {expected[name]} parts")
        out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    if pos is not None:
        out["pos_embed"] = pos
    return out


def lora_to_kohya(
    state: dict[str, torch.Tensor], family: str, alpha: float
) -> dict[str, torch.Tensor]:
    """The transformer's part of a diffusers LoRA (`<module>.lora_A/lora_B`, `lora.down/up`,
    without the `transformer.` head) as kohya keys on the original modules:
    `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for tail, kind in ((".lora_A.weight", "down"), (".lora.down.weight", "down"),
                           (".lora_B.weight", "up"), (".lora.up.weight", "up")):  # fmt: skip
            if key.endswith(tail):
                pairs.setdefault(key[: -len(tail)], {})[kind] = value
                break
        else:
            raise T2IError(f"{key}: not a LoRA weight this export knows")
    slots = slots_for(family, pairs)
    groups: dict[str, dict[int, tuple[Slot, dict]]] = {}
    for module, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise T2IError(f"{module}: a LoRA needs both its down and its up weight")
        if slots[module].weight != "weight" or pair["down"].ndim != 2:
            raise T2IError(f"{module}: a LoRA on it has no kohya form (not a linear layer)")
        groups.setdefault(slots[module].target, {})[slots[module].part] = (slots[module], pair)
    out = {}
    for target, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        fused = ordered[0][0]
        unit = ordered[0][1]["up"].shape[0] // ordered[0][0].ratio  # a q/k/v's rows
        rows = [unit * _ratio_of(fused, i, parts) for i in range(fused.parts)]
        ranks = {p["down"].shape[0] for _, p in ordered}
        if len(ranks) > 1:  # alpha times the parts keeps alpha / rank only at one rank
            raise T2IError(
                f"{target}: its parts' LoRAs have ranks {sorted(ranks)}; kohya's fused "
                "weight needs one rank (publish.single_file: false skips the export)"
            )
        rank = ranks.pop() * len(ordered)
        up = ordered[0][1]["up"].new_zeros(sum(rows), rank)
        column = 0
        for i, (slot, pair) in zip(sorted(parts), ordered, strict=True):
            start, r = sum(rows[:i]), pair["down"].shape[0]
            part_up = _swap(pair["up"]) if slot.swap else pair["up"]
            up[start : start + rows[i], column : column + r] = part_up
            column += r
        fused_alpha = float(alpha) * len(parts)
        if target.startswith("final_layer."):  # diffusers' kohya reader ignores alpha there:
            up, fused_alpha = up * (fused_alpha / rank), float(rank)  # bake it, for both readers
        name = "lora_unet_" + target.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.cat([p["down"] for _, p in ordered], dim=0)
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(fused_alpha)
    return out


def _ratio_of(slot: Slot, part: int, parts: dict) -> int:
    """How tall part `part` of a fused weight is, in q/k/v projections (FLUX's single
    blocks: the MLP's 4)."""
    if part in parts:
        return parts[part][0].ratio
    return 4 if slot.parts == 4 and part == 3 else 1


# -- the checkpoint --------------------------------------------------------------


def check_topology(family: str, cfg: dict, vae: dict | None = None) -> None:
    """Unsupported, naming what differs, unless the loaders can read this transformer
    from its file (they infer its sizes from the keys with these rules)."""
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if family == "flux":
        checks = [
            (heads == 24 and head_dim == 128, f"{heads} heads of {head_dim}, not 24 of 128"),
            (cfg.get("in_channels") == 64, f"in_channels {cfg.get('in_channels')}, not 64"),
            (cfg.get("joint_attention_dim") == 4096, "text states not T5-XXL's 4096"),
            (cfg.get("pooled_projection_dim") == 768, "pooled text not CLIP-L's 768"),
        ]
        what = "FLUX.1's (width 3072)"
    else:
        layers = cfg.get("num_layers")
        checks = [
            (head_dim == 64, f"heads of {head_dim}, not 64"),
            (heads == layers, f"{heads} heads in {layers} blocks (SD3: as many as blocks)"),
            (cfg.get("patch_size") == 2, f"patch size {cfg.get('patch_size')}, not 2"),
            (single_file.four_by_two(vae or {}), "the VAE is not SD3's 4 levels of 2 layers"),
        ]
        what = "SD3's"
    failed = [why for ok, why in checks if not ok]
    if failed:
        raise Unsupported(
            f"single-file export skipped: the transformer's sizes are not {what}, which the "
            f"single-file loaders assume ({'; '.join(failed)})"
        )


class Unsupported(T2IError):
    """This model cannot be written in the single-file layout (the reason says why)."""


def export_checkpoint(model: Path, out: Path, family: str, half: bool = False) -> Path:
    """SD3: `model.diffusion_model.` (the MMDiT) and `first_stage_model.` (the VAE, LDM
    layout), as Stability's `sd3.5_medium.safetensors`; the text encoders are the
    base's files. FLUX: the transformer alone, unprefixed, as BFL's `flux1-dev.safetensors`
    (ComfyUI's "Load Diffusion Model"; the VAE and encoders are the base's)."""
    model = Path(model)
    cfg = single_file._config(model / "transformer")
    vae_cfg = single_file._config(model / "vae") if family == "sd3" else None
    check_topology(family, cfg, vae_cfg)
    state = single_file._weights(model / "transformer", "diffusion_pytorch_model")
    tensors = to_original(state, family)
    if family == "sd3":
        tensors = {SD3_PREFIX + k: v for k, v in tensors.items()}
        vae = single_file._weights(model / "vae", "diffusion_pytorch_model")
        vae_state = single_file.vae_to_ldm(vae, vae_cfg)
        tensors.update({VAE_PREFIX + k: v for k, v in vae_state.items()})
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"format": "pt"})
    return out


def export_kohya_lora(adapter: Path, out: Path, family: str, alpha: float) -> Path:
    """diffusers' LoRA file of an SD3/FLUX fine-tune as kohya keys on the original
    modules (`lora_unet_double_blocks_0_img_attn_qkv`, ...). The text encoders are not
    trained, so it has no `lora_te` keys."""
    state = load_file(str(adapter))
    others = [k for k in state if not k.startswith("transformer.")]
    if others:
        raise T2IError(f"{adapter}: {others[0]}: not a transformer LoRA weight")
    mine = {k[len("transformer.") :]: v for k, v in state.items()}
    kohya = lora_to_kohya(mine, family, alpha)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata={"format": "pt"})
    return out
