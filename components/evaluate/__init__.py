"""evaluate: base vs fine-tuned, on held-out latents and on fixed-seed samples.

Writes `metrics.json` (top-level scalars: held-out loss of both models at fixed
timesteps and noise, by training's loss function, the gate decision),
`val_loss_by_timestep.csv`, `grid.png` (rows: prompts; columns: base, fine-tuned),
each sample as `samples/<row>-<model>.png`, a self-contained `report.html`
(`report.py`), and the decision record `evaluation.json` (every gate check with its
value, threshold and verdict), which publish reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from components.common.config import EvaluateConfig
from components.common.errors import T2IError
from components.common.io import atomic_path, write_bytes_atomic, write_json_atomic
from components.common.models import check_model_dir, default_device, weights_sha256
from components.common.objective import denoising_loss, text_conditioning
from components.common.records import (
    EVALUATION_RECORD,
    EvalSample,
    EvaluationRecord,
    GateCheck,
    load_latent_split,
    read_latent_manifest,
    read_train_record,
    write_record,
)
from components.evaluate.report import render_report

CELL = 128  # pixels per grid cell: tiny samples are upscaled to be seen


@dataclass
class EvalReport:
    base_val_loss: float
    tuned_val_loss: float
    gate_passed: bool

    def summary(self) -> str:
        verdict = "passed" if self.gate_passed else "FAILED"
        return (
            f"held-out loss base {self.base_val_loss:.4f} -> tuned "
            f"{self.tuned_val_loss:.4f}; gate {verdict}"
        )


def run(
    cfg: EvaluateConfig,
    model: Path,
    base_model: Path,
    latents: Path,
    out: Path,
    metrics_dir: Path | None = None,
) -> EvalReport:
    """Compare `model` with `base_model`; write metrics, grid and report under `out`,
    and `metrics.json` + `val_loss_by_timestep.csv` also to `metrics_dir` when given
    (under DVC a git-tracked folder: DVC metrics and plots).

    Raises T2IError when a model folder is missing or there are no validation samples.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    manifest = read_latent_manifest(latents)
    val = load_latent_split(latents, "val")
    if not val:
        raise T2IError(f"{latents}: no validation samples; raise pack.val_fraction")
    pipes = {
        name: StableDiffusionPipeline.from_pretrained(check_model_dir(path)).to(default_device())
        for name, path in (("base", base_model), ("tuned", model))
    }
    per_t = {
        name: held_out_loss(p, val, cfg, manifest.vae_scaling_factor) for name, p in pipes.items()
    }
    losses = {name: sum(v.values()) / len(v) for name, v in per_t.items()}
    ratio = losses["tuned"] / losses["base"]
    checks = [
        GateCheck(
            name="val_loss_ratio",
            value=ratio,
            threshold=cfg.max_val_loss_ratio,
            comparison="<=",
            passed=ratio <= cfg.max_val_loss_ratio,
        )
    ]
    report = EvalReport(losses["base"], losses["tuned"], all(c.passed for c in checks))
    # Top-level scalars only: `dvc metrics show` / `dvc exp show` stay readable; the
    # per-timestep curve is val_loss_by_timestep.csv (a DVC plot) and in the report.
    metrics = {
        "base_val_loss": losses["base"],
        "tuned_val_loss": losses["tuned"],
        "val_loss_ratio": ratio,
        "max_val_loss_ratio": cfg.max_val_loss_ratio,
        "gate_passed": report.gate_passed,
        "val_samples": len(val),
    }
    out.mkdir(parents=True, exist_ok=True)
    images = {
        name: [_sample(p, prompt, cfg, manifest.resolution) for prompt in cfg.prompts]
        for name, p in pipes.items()
    }
    samples = _save_samples(images, cfg, out)
    with atomic_path(out / "grid.png", ".png") as tmp:
        sample_grid(images, cfg).save(tmp, "PNG")
    train = read_train_record(model)
    page = render_report(
        title="Evaluation: base vs fine-tuned",
        details=[
            ("model", str(model)),
            ("steps", str(train.steps)),
            ("validation samples", str(len(val))),
            ("sampling", f"{cfg.num_inference_steps} steps, guidance {cfg.guidance_scale}"),
        ],
        metrics=[("held-out loss (mean over timesteps)", losses["base"], losses["tuned"])],
        checks=checks,
        passed=report.gate_passed,
        samples=samples,
        folder=out,
        val_loss=per_t,
        loss_curve=train.loss_curve,
    )
    write_bytes_atomic(out / "report.html", page.encode())
    for folder in {out, Path(metrics_dir or out)}:
        write_json_atomic(folder / "metrics.json", metrics)
        write_bytes_atomic(folder / "val_loss_by_timestep.csv", _by_timestep_csv(per_t))
    record = EvaluationRecord(
        unet_sha256=weights_sha256(model, "unet"),
        metrics={
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        checks=checks,
        passed=report.gate_passed,
        samples=samples,
        grid="grid.png",
        report="report.html",
    )
    write_record(record, out / EVALUATION_RECORD)
    return report


def _by_timestep_csv(per_t: dict[str, dict[int, float]]) -> bytes:
    """timestep,base,tuned: the held-out loss curves (a DVC plot)."""
    lines = ["timestep,base,tuned"]
    lines += [f"{t},{per_t['base'][t]!r},{per_t['tuned'][t]!r}" for t in sorted(per_t["base"])]
    return ("\n".join(lines) + "\n").encode()


def _save_samples(images: dict[str, list[Image.Image]], cfg: EvaluateConfig, out: Path):
    """Each sample as `samples/<row>-<model>.png`; their records, one per prompt."""
    samples = []
    for row, prompt in enumerate(cfg.prompts):
        files = {}
        for name, row_images in images.items():
            files[name] = f"samples/{row:02d}-{name}.png"
            with atomic_path(out / files[name], ".png") as tmp:
                row_images[row].save(tmp, "PNG")
        samples.append(EvalSample(prompt=prompt, seed=cfg.seed, images=files))
    return samples


@torch.inference_mode()
def held_out_loss(
    pipe, val: list[dict], cfg: EvaluateConfig, scaling_factor: float, batch_size: int = 64
) -> dict[int, float]:
    """Mean loss per timestep over the validation samples, by training's own
    `denoising_loss`, with the same ε and noise for every model. Min-SNR weighting is
    left off: at one timestep it is a constant factor, the same for both models."""
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    device = pipe.device
    losses = {}
    for t in cfg.val_timesteps:
        g = torch.Generator().manual_seed(cfg.seed * 1009 + t)
        total = 0.0
        for lo in range(0, len(val), batch_size):
            rows = val[lo : lo + batch_size]
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "__key__"}
            mean, logvar = batch["mean"], batch["logvar"]
            eps, noise = torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
            latents = ((mean + torch.exp(0.5 * logvar) * eps) * scaling_factor).to(device)
            timesteps = torch.full((len(rows),), t, dtype=torch.long, device=device)
            hidden = text_conditioning(pipe.text_encoder, batch, device, latents.dtype)
            per_sample = denoising_loss(
                pipe.unet,
                scheduler,
                latents,
                noise.to(device),
                timesteps,
                hidden,
                reduction="none",
            )
            total += per_sample.sum().item()
        losses[t] = total / len(val)
    return losses


def sample_grid(images: dict[str, list[Image.Image]], cfg: EvaluateConfig) -> Image.Image:
    """Rows: prompts; columns: the models' samples (each from the same seed)."""
    label_w = 220
    grid = Image.new("RGB", (label_w + CELL * len(images), 20 + CELL * len(cfg.prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(images):
        draw.text((label_w + col * CELL + 4, 4), name, fill="black")
    for row, prompt in enumerate(cfg.prompts):
        y = 20 + row * CELL
        draw.text((4, y + CELL // 2), prompt[:36], fill="black")
        for col, row_images in enumerate(images.values()):
            image = row_images[row]
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (label_w + col * CELL, y))
    return grid


def _sample(pipe, prompt: str, cfg: EvaluateConfig, resolution: int) -> Image.Image:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        height=resolution,
        width=resolution,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        generator=torch.Generator().manual_seed(cfg.seed),
    ).images[0]
