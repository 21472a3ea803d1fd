"""What a run shows and leaves behind: loss history, trackers, validation images, reports."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from components.common.config import TrainConfig
from components.common.errors import T2IError
from components.common.io import write_json_atomic
from components.train_unet.lora import trainable

METRICS = "train_metrics.json"
LOSS_LOG = "loss.csv"


@dataclass
class TrainReport:
    steps: int
    samples_seen: int
    initial_loss: float
    final_loss: float
    images_per_second: float
    resumed_from_step: int
    # samples an epoch leaves out: those that fill no whole batch (with buckets: a
    # bucket's remainder, or a bucket smaller than a global batch)
    samples_not_in_a_batch: int = 0

    def summary(self) -> str:
        start = f" (resumed at step {self.resumed_from_step})" if self.resumed_from_step else ""
        left = self.samples_not_in_a_batch
        out = f"; {left} samples per epoch fit no whole batch" if left else ""
        return (
            f"trained {self.steps} steps{start}: loss {self.initial_loss:.4f} -> "
            f"{self.final_loss:.4f}, {self.images_per_second:.1f} img/s{out}"
        )


class LossLog:
    """Per-step [step, loss, lr] rows. Losses stay on the device until `flush`, so the
    hot loop never waits for the GPU just to print a number."""

    def __init__(self, history: list | None = None):
        self.rows: list[list] = list(history or [])
        self._pending: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self._pending.append((step, loss, lr))

    def flush(self) -> list[list]:
        """Move pending losses to the host (one sync); return the rows new since last time."""
        if not self._pending:
            return []
        values = torch.stack([p[1] for p in self._pending]).float().cpu().tolist()
        new = [[s, v, lr] for (s, _, lr), v in zip(self._pending, values, strict=True)]
        self.rows += new
        self._pending = []
        return new


def tracker_config(cfg: TrainConfig) -> dict:
    """Hyper-parameters as TensorBoard accepts them (scalars and strings only)."""
    out = {}
    for k, v in cfg.model_dump().items():
        if isinstance(v, bool | int | float | str):
            out[k] = v
        elif v is not None:
            out[k] = str(v)
    return out


def log_validation(
    cfg: TrainConfig, model: Path, unet, ema, accelerator, out: Path, step: int, resolution: int
) -> list[Path]:
    """Images for `validation_prompts` from the current UNet (EMA weights when
    `use_ema`), saved under `out/step-<step>/` and logged to the trackers. The UNet is
    in eval mode (no LoRA dropout) and autocast in the run's own dtype."""
    from contextlib import nullcontext

    from components.common.families import SD, family_of
    from components.train_unet.setup import WEIGHT_DTYPES

    unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(trainable(unet))
        ema.copy_to(trainable(unet))
    dtype = WEIGHT_DTYPES.get(cfg.mixed_precision)
    device = accelerator.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    unet.eval()
    try:
        family = family_of(model)
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == SD else {}
        extra[family.denoiser] = unet
        pipe = family.pipeline().from_pretrained(model, **extra).to(device)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        images = []
        for prompt in cfg.validation_prompts:
            with autocast:
                images += pipe(
                    prompt,
                    num_inference_steps=20,
                    generator=g,
                    height=resolution,
                    width=resolution,
                ).images
    finally:
        if ema is not None:
            ema.restore(trainable(unet))
        unet.train()
    folder = out / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:02d}.png")
        image.save(paths[-1])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            stacked = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return paths


def make_report(rows: list, steps: int, resumed_from: int, rate: float, samples_seen: int):
    """The run's report; `samples_seen`: samples the run trained on, counted as the
    batches went by (a resumed run: from the checkpoint's step on)."""
    if not rows:
        raise T2IError("training ran no step (max_train_steps reached already?)")
    window = max(1, min(10, len(rows) // 5))
    losses = [r[1] for r in rows]
    return TrainReport(
        steps=steps,
        samples_seen=samples_seen,
        initial_loss=sum(losses[:window]) / window,
        final_loss=sum(losses[-window:]) / window,
        images_per_second=round(rate, 2),
        resumed_from_step=resumed_from,
    )


def write_reports(reports: Path, report: TrainReport, rows: list) -> None:
    """`train_metrics.json` (a DVC metric) and `loss.csv` (step, loss, lr: a DVC plot)."""
    reports.mkdir(parents=True, exist_ok=True)
    write_json_atomic(reports / METRICS, asdict(report))
    tmp = reports / (LOSS_LOG + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(rows)
    tmp.replace(reports / LOSS_LOG)
