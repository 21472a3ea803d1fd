"""evaluate: base vs fine-tuned, on held-out latents and on fixed-seed samples.

Writes `metrics.json` (top-level scalars: held-out loss of both models at fixed
timesteps and noise, by training's loss function, the gate decision),
`val_loss_by_timestep.csv`, `grid.png` (rows: prompts; columns: base, fine-tuned),
each sample as `samples/<row>-<model>.png`, a self-contained `report.html`
(`report.py`), and the decision record `evaluation.json` (every gate check with its
value, threshold and verdict), which publish reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from components.common.config import EvaluateConfig, GateConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import atomic_path, write_bytes_atomic, write_json_atomic
from components.common.models import (
    default_device,
    denoiser_part,
    load_pipeline,
    trained_weights_sha256,
    weights_sha256,
)
from components.common.objective import denoising_loss, text_conditioning
from components.common.records import (
    EVALUATION_RECORD,
    Comparison,
    EvalSample,
    EvaluationRecord,
    GateCheck,
    TrainRecord,
    load_latent_split,
    read_latent_manifest,
    read_train_record,
    write_record,
)
from components.evaluate.report import render_report
from components.evaluate.sampling import (
    generate,
    heldout_images,
    heldout_shortfall,
    to_uint8,
    use_scheduler,
)
from components.evaluate.scores import clip_scores, distances, load_scorers

CELL = 128  # pixels per grid cell: tiny samples are upscaled to be seen


@dataclass
class EvalReport:
    base_val_loss: float
    tuned_val_loss: float
    gate_passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "passed" if self.gate_passed else "FAILED"
        checks = "; ".join(c.describe() for c in self.checks)
        return (
            f"held-out loss base {self.base_val_loss:.4f} -> tuned "
            f"{self.tuned_val_loss:.4f}; gate {verdict} ({checks})"
        )


def run(
    cfg: EvaluateConfig,
    model: Path,
    base_model: Path,
    latents: Path,
    out: Path,
    metrics_dir: Path | None = None,
    shards: Path | None = None,
) -> EvalReport:
    """Compare `model` with `base_model`; write metrics, grid and report under `out`,
    and the DVC metrics and plots also to `metrics_dir` when given.

    `shards` (the pack output) gives the real held-out images and captions of the
    distribution metrics (default: the folder the latent manifest names). Raises
    ConfigError for bad settings (models that do not load, too few held-out samples)
    before any sampling, T2IError for missing inputs.
    """
    out = Path(out)
    train = read_train_record(model)
    check_adapter_base(train, base_model)
    manifest = read_latent_manifest(latents)
    val = load_latent_split(latents, "val")
    if not val:
        raise ConfigError(f"{latents}: no validation samples; raise pack.val_fraction and re-run")
    heldout = heldout_images(Path(shards) if shards else None, cfg, manifest.resolution)
    device = default_device()
    scorers = load_scorers(cfg, device)
    pipes = {
        "base": load_pipeline(base_model).to(device),
        "tuned": load_pipeline(model, base_model).to(device),  # an adapter: base + adapter
    }
    target = training_scheduler_of(pipes["tuned"])
    per_t = {
        name: held_out_loss(
            p, val, cfg, manifest.vae_scaling_factor, target, shift_factor=manifest.vae_shift_factor
        )
        for name, p in pipes.items()
    }
    jobs = [(p, cfg.seed + i) for p in cfg.prompts for i in range(cfg.images_per_prompt)]
    held_jobs = [(c, cfg.seed + 100_000 + j) for j, c in enumerate(heldout.captions)]
    images, clip, dist = {}, {}, {}
    for name, pipe in pipes.items():
        if _family(pipe).objective == "flow":  # its own flow-matching Euler sampler
            pipe.set_progress_bar_config(disable=True)
        else:
            use_scheduler(pipe, cfg.scheduler)
        images[name] = generate(pipe, jobs, cfg, manifest.resolution)
        clip[name] = clip_scores(scorers, [to_uint8(i) for i in images[name]], [p for p, _ in jobs])
        fake = torch.stack(
            [to_uint8(i) for i in generate(pipe, held_jobs, cfg, manifest.resolution)]
        )
        dist[name] = distances(scorers, heldout.images, fake, cfg.seed)
    losses = {name: sum(v.values()) / len(v) for name, v in per_t.items()}
    comparisons = _comparisons(losses, clip, dist)
    metrics = _metrics(comparisons, len(val), len(held_jobs))
    checks = gate_checks(cfg.gate, metrics)
    metrics["gate_passed"] = all(c.passed for c in checks)
    report = EvalReport(losses["base"], losses["tuned"], metrics["gate_passed"], checks)
    out.mkdir(parents=True, exist_ok=True)
    samples = _save_samples(images, jobs, out)
    grid = sample_grid(images, jobs, cfg)
    with atomic_path(out / "grid.png", ".png") as tmp:
        grid.save(tmp, "PNG")
    by_prompt = _clip_by_prompt(cfg, jobs, clip)
    page = render_report(
        title="Evaluation: base vs fine-tuned",
        details=[
            ("model", str(model) + (" (LoRA adapter on the base)" if train.adapter else "")),
            ("steps", str(train.steps)),
            ("held-out latents", str(len(val))),
            ("held-out images", str(len(held_jobs))),
            ("sampling", _sampling(pipes["tuned"], cfg)),
            ("held-out loss", loss_basis(pipes, target)),
            ("CLIP", cfg.clip_model),
            ("features", cfg.fd_model),
        ],
        comparisons=comparisons,
        checks=checks,
        passed=report.gate_passed,
        samples=samples,
        folder=out,
        val_loss=per_t,
        clip_by_prompt=by_prompt,
        loss_curve=train.loss_curve,
    )
    write_bytes_atomic(out / "report.html", page.encode())
    for folder in {out, Path(metrics_dir or out)}:
        write_json_atomic(folder / "metrics.json", metrics)
        write_bytes_atomic(folder / "val_loss_by_timestep.csv", _by_timestep_csv(per_t))
        write_bytes_atomic(folder / "clip_score_by_prompt.csv", _by_prompt_csv(by_prompt))
    if metrics_dir:
        with atomic_path(Path(metrics_dir) / "grid.png", ".png") as tmp:
            grid.save(tmp, "PNG")
    record = EvaluationRecord(
        unet_sha256=trained_weights_sha256(model),
        metrics={k: float(v) for k, v in metrics.items() if not isinstance(v, bool)},
        comparisons=comparisons,
        checks=checks,
        passed=report.gate_passed,
        samples=samples,
        grid="grid.png",
        report="report.html",
    )
    write_record(record, out / EVALUATION_RECORD)
    return report


def check_inputs(cfg: EvaluateConfig, latents: Path) -> None:
    """ConfigError, before anything is trained or sampled, when the data cannot serve
    these settings: no validation samples, or fewer than `heldout_captions`."""
    val = read_latent_manifest(latents).samples.get("val", 0)
    if not val:
        raise ConfigError(f"{latents}: no validation samples; raise pack.val_fraction and re-run")
    if val < cfg.heldout_captions:
        raise ConfigError(heldout_shortfall(cfg, val))


def check_adapter_base(train: TrainRecord, base_model: Path) -> None:
    """T2IError when `train` is a LoRA adapter made for another UNet than `base_model`'s
    (its numbers would describe a model nobody can load)."""
    part = denoiser_part(base_model)
    if train.adapter and weights_sha256(base_model, part) != train.adapter.base_unet_sha256:
        raise T2IError(
            f"{base_model}: not the base model the LoRA adapter was trained on (its UNet "
            "differs); evaluate with the train stage's --model"
        )


def _comparisons(losses, clip, dist) -> list[Comparison]:
    """The metric pairs: (key, label, base, tuned, which is better)."""
    mean = {m: sum(v) / len(v) for m, v in clip.items()}
    rows = [
        ("val_loss", "held-out loss (mean over timesteps)", losses, "lower"),
        ("clip_score", "CLIP score (prompt alignment)", mean, "higher"),
        ("fd", "FD on feature-model embeddings (vs held-out images)", _of(dist, "fd"), "lower"),
        ("kid", "KID (vs held-out images)", _of(dist, "kid"), "lower"),
        ("kid_std", "KID std over subsets", _of(dist, "kid_std"), "lower"),
    ]
    if dist["base"].fid is not None:
        rows.append(
            ("fid", "FID (Inception 2015-12-05, vs held-out images)", _of(dist, "fid"), "lower")
        )
    return [
        Comparison(key=key, label=label, base=v["base"], tuned=v["tuned"], better=better)
        for key, label, v, better in rows
    ]


def _of(dist: dict, name: str) -> dict[str, float]:
    return {model: getattr(d, name) for model, d in dist.items()}


def _metrics(comparisons: list[Comparison], val_samples: int, heldout: int) -> dict:
    """Top-level scalars only: `dvc metrics show` / `dvc exp show` stay readable."""
    metrics: dict = {}
    for c in comparisons:
        metrics[f"base_{c.key}"], metrics[f"tuned_{c.key}"] = c.base, c.tuned
    m = metrics
    metrics["val_loss_ratio"] = m["tuned_val_loss"] / m["base_val_loss"]
    metrics["clip_score_delta"] = m["tuned_clip_score"] - m["base_clip_score"]
    metrics["fd_ratio"] = m["tuned_fd"] / m["base_fd"] if m["base_fd"] > 0 else float("inf")
    if "base_fid" in m:
        metrics["fid_ratio"] = m["tuned_fid"] / m["base_fid"] if m["base_fid"] > 0 else float("inf")
    metrics["val_samples"] = val_samples
    metrics["heldout_images"] = heldout
    return metrics


def gate_checks(gate: GateConfig, metrics: dict) -> list[GateCheck]:
    """Every check the gate sets, with its value, threshold and verdict."""
    spec = [
        ("val_loss_ratio", gate.max_val_loss_ratio, "<="),
        ("clip_score_delta", gate.min_clip_score_delta, ">="),
        ("fd_ratio", gate.max_fd_ratio, "<="),
        ("fid_ratio", gate.max_fid_ratio, "<="),
    ]
    checks = []
    for name, threshold, comparison in spec:
        if threshold is None:
            continue
        value = metrics[name]
        passed = value <= threshold if comparison == "<=" else value >= threshold
        checks.append(
            GateCheck(
                name=name, value=value, threshold=threshold, comparison=comparison, passed=passed
            )
        )
    return checks


def _clip_by_prompt(cfg: EvaluateConfig, jobs, clip) -> list[tuple[str, float, float]]:
    rows = []
    for prompt in cfg.prompts:
        idx = [i for i, (p, _) in enumerate(jobs) if p == prompt]
        mean = {m: sum(clip[m][i] for i in idx) / len(idx) for m in clip}
        rows.append((prompt, mean["base"], mean["tuned"]))
    return rows


def _by_prompt_csv(rows: list[tuple[str, float, float]]) -> bytes:
    """row,prompt,base,tuned: CLIP score per prompt (a DVC plot)."""
    lines = ["row,prompt,base,tuned"]
    for i, (prompt, base, tuned) in enumerate(rows):
        quoted = '"' + prompt.replace('"', '""') + '"'
        lines.append(f"{i},{quoted},{base!r},{tuned!r}")
    return ("\n".join(lines) + "\n").encode()


def _by_timestep_csv(per_t: dict[str, dict[int, float]]) -> bytes:
    """timestep,base,tuned: the held-out loss curves (a DVC plot)."""
    lines = ["timestep,base,tuned"]
    lines += [f"{t},{per_t['base'][t]!r},{per_t['tuned'][t]!r}" for t in sorted(per_t["base"])]
    return ("\n".join(lines) + "\n").encode()


def _save_samples(images: dict[str, list[Image.Image]], jobs, out: Path) -> list[EvalSample]:
    """Each sample as `samples/<prompt row>-<image>-<model>.png`; one record per
    (prompt, seed)."""
    samples, rows = [], {}
    for n, (prompt, seed) in enumerate(jobs):
        row = rows.setdefault(prompt, len(rows))
        files = {}
        for name, model_images in images.items():
            files[name] = f"samples/{row:02d}-{seed}-{name}.png"
            with atomic_path(out / files[name], ".png") as tmp:
                model_images[n].save(tmp, "PNG")
        samples.append(EvalSample(prompt=prompt, seed=seed, images=files))
    return samples


def _sampling(pipe, cfg: EvaluateConfig) -> str:
    """The sampler the images came from: `evaluate.scheduler` for the UNet families, a
    flow family's own flow-matching Euler sampler otherwise."""
    if _family(pipe).objective == "flow":
        name = (
            f"{type(pipe.scheduler).__name__} (the family's own; evaluate.scheduler is for SD/SDXL)"
        )
    else:
        name = cfg.scheduler
    return f"{name}, {cfg.num_inference_steps} steps, guidance {cfg.guidance_scale}"


def training_scheduler_of(pipe):
    """The DDPM training scheduler of a pipeline's config: its prediction type is the
    fine-tune's objective (a flow family's: its flow-matching scheduler)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if _family(pipe).objective == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


def loss_basis(pipes: dict, target) -> str:
    """How the held-out losses were made comparable, for the report."""
    family = _family(next(iter(pipes.values())))
    if family.objective == "flow":
        kind = "x0 (preconditioned)" if family.precondition_outputs else "velocity (ε - x)"
        return (
            f"both models scored by flow matching on the {kind} target at fixed σ = t/1000, "
            "with the same noise, unweighted"
        )
    kind = target.config.prediction_type
    own = {name: p.scheduler.config.prediction_type for name, p in pipes.items()}
    text = f"both models scored on the fine-tune's {kind} target (what training minimised)"
    converted = [f"the {name} model's {k} output" for name, k in own.items() if k != kind]
    if converted:
        text += f"; {', '.join(converted)} converted to {kind} before scoring"
    return text


@torch.inference_mode()
def held_out_loss(
    pipe,
    val: list[dict],
    cfg: EvaluateConfig,
    scaling_factor: float,
    target_scheduler=None,
    batch_size: int = 64,
    shift_factor: float | None = None,
) -> dict[int, float]:
    """Mean loss per timestep over the validation samples, by training's own
    `denoising_loss`, with the same ε and noise for every model. The target is
    `target_scheduler`'s kind (the fine-tune's; default the pipeline's own): a model
    that predicts another kind has its output converted, so base and fine-tuned are
    scored on one quantity. Min-SNR weighting is left off: at one timestep it is a
    constant factor, the same for both models."""
    scheduler = target_scheduler or training_scheduler_of(pipe)
    if _family(pipe).objective == "flow":
        return _flow_held_out_loss(pipe, val, cfg, scaling_factor, shift_factor, scheduler,
                                   batch_size)  # fmt: skip
    own = pipe.scheduler.config.prediction_type
    device = pipe.device
    text = pipe_text(pipe)
    losses = {}
    for t in cfg.val_timesteps:
        g = torch.Generator().manual_seed(cfg.seed * 1009 + t)
        total = 0.0
        for rows in _same_shape_batches(val, batch_size):  # aspect-ratio buckets: many shapes
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "__key__"}
            mean, logvar = batch["mean"], batch["logvar"]
            eps, noise = torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
            latents = ((mean + torch.exp(0.5 * logvar) * eps) * scaling_factor).to(device)
            timesteps = torch.full((len(rows),), t, dtype=torch.long, device=device)
            hidden, added = text_conditioning(text, batch, device, latents.dtype)
            per_sample = denoising_loss(
                pipe.unet,
                scheduler,
                latents,
                noise.to(device),
                timesteps,
                hidden,
                reduction="none",
                model_prediction=own,
                added=added,
            )
            total += per_sample.sum().item()
        losses[t] = total / len(val)
    return losses


def _flow_held_out_loss(pipe, val, cfg, scale, shift, scheduler, batch_size) -> dict[int, float]:
    """Flow matching's held-out loss: at fixed σ = t/1000 (the schedule's nearest
    entry) per `val_timesteps` entry, with the same ε and noise for every model,
    unweighted (a weighting at one σ is a constant factor), on the family's target."""
    from components.common.conditioning import predict
    from components.common.flow import FlowObjective, flow_matching_loss, sigma_timesteps

    family, device, text = _family(pipe), pipe.device, pipe_text(pipe)
    flow = FlowObjective(weighting_scheme="none", precondition_outputs=family.precondition_outputs)
    denoiser = getattr(pipe, family.denoiser)
    losses = {}
    for t in cfg.val_timesteps:
        g = torch.Generator().manual_seed(cfg.seed * 1009 + t)
        total = 0.0
        for rows in _same_shape_batches(val, batch_size):
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "__key__"}
            mean, logvar = batch["mean"], batch["logvar"]
            eps, noise = torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
            z = mean + torch.exp(0.5 * logvar) * eps
            latents = ((z - (shift or 0.0)) * scale).to(device)
            timesteps, sigmas = sigma_timesteps(scheduler, t / 1000, len(rows))
            hidden, added = text_conditioning(text, batch, device, latents.dtype)
            per_sample = flow_matching_loss(
                lambda x, ts: predict(family, denoiser, x, ts, hidden, added),  # noqa: B023
                latents, noise.to(device), timesteps, sigmas, flow, reduction="none",
            )  # fmt: skip
            total += per_sample.sum().item()
        losses[t] = total / len(val)
    return losses


def _family(pipe):
    from components.common.families import FAMILIES, SD

    return FAMILIES.get(type(pipe).__name__, SD)


def pipe_text(pipe):
    """The text encoders of a pipeline, as `text_conditioning` takes them."""
    from components.common.conditioning import TextEncoders
    from components.common.families import SD

    family = _family(pipe)
    return pipe.text_encoder if family == SD else TextEncoders.of_pipeline(pipe, family)


def _same_shape_batches(val: list[dict], batch_size: int) -> list[list[dict]]:
    """`val` in batches of at most `batch_size` samples of one latent shape, shapes in
    order of first appearance (one shape: the batches of `val` in order)."""
    shapes: dict[tuple, list[dict]] = {}
    for row in val:
        shapes.setdefault(tuple(row["mean"].shape), []).append(row)
    return [
        rows[lo : lo + batch_size]
        for rows in shapes.values()
        for lo in range(0, len(rows), batch_size)
    ]


def sample_grid(images: dict[str, list[Image.Image]], jobs, cfg: EvaluateConfig) -> Image.Image:
    """Rows: prompts; columns: each model's images, one per seed (same seeds)."""
    import textwrap

    label_w, k = 220, cfg.images_per_prompt
    cols = [(name, i) for name in images for i in range(k)]
    width = label_w + CELL * len(cols) + 8 * (len(images) - 1)
    line_h, max_lines = 12, CELL // 12
    grid = Image.new("RGB", (width, 20 + CELL * len(cfg.prompts)), "white")
    draw = ImageDraw.Draw(grid)

    def x_of(col: int) -> int:
        return label_w + col * CELL + 8 * (col // k)

    for col, (name, i) in enumerate(cols):
        draw.text((x_of(col) + 4, 4), f"{name} s{jobs[i][1]}", fill="black")
    for row, prompt in enumerate(cfg.prompts):
        y = 20 + row * CELL
        # Whole words, wrapped to the label column (PIL's default font: ~6 px a letter).
        lines = textwrap.wrap(prompt, width=34, max_lines=max_lines, placeholder=" ...")
        top = y + (CELL - line_h * len(lines)) // 2
        for n, line in enumerate(lines):
            draw.text((4, top + n * line_h), line, fill="black")
        for col, (name, i) in enumerate(cols):
            image = images[name][row * k + i]
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (x_of(col), y))
    return grid
