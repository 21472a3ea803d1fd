"""Prompt alignment and distribution distance, by torchmetrics.

- CLIP score (`torchmetrics.multimodal.CLIPScore`: 100 x cosine of the CLIP image and
  text embeddings, floored at 0) of each sample against its prompt.
- FD on DINOv2 features and KID (`FrechetInceptionDistance` / `KernelInceptionDistance`
  with the feature extractor as a custom module) between the samples of the held-out
  captions and the real held-out images. KID is unbiased (polynomial-kernel MMD) and
  averaged over random subsets drawn from `seed`; its std over the subsets is reported.
- FID when `evaluate.inception_weights` names a local copy of NVIDIA's TorchScript
  export of the 2015-12-05 Inception graph (`inception-2015-12-05.pt`, the file
  StyleGAN2-ADA and clean-fid load): the standard FID, comparable with published
  numbers, on plain torch (no torchvision, no torch-fidelity).

Models: `tiny` (built from the seed, `components/common/tiny.py`), a hub id (from the
Hugging Face cache when HF_HUB_OFFLINE is set) or a local folder. Loading failures are
ConfigErrors naming the key, raised by `load_scorers` before any sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from components.common.config import EvaluateConfig
from components.common.errors import ConfigError, first_line
from components.common.models import hub_offline


@dataclass
class Scorers:
    clip: object  # (model, processor) as torchmetrics' CLIPScore takes them
    features: torch.nn.Module  # images (uint8 N,3,H,W) -> features (N, d)
    inception: torch.nn.Module | None = None  # FID's: images -> (N, 2048)


class _ClipFeatures(torch.nn.Module):
    """CLIPModel whose get_*_features return the projected embeddings as tensors
    (transformers 5 returns output objects; torchmetrics 1.9 expects tensors)."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


class ImageFeatures(torch.nn.Module):
    """A vision backbone as torchmetrics' custom feature extractor: uint8 images,
    resized (bicubic, antialiased) and normalised, to the pooled (CLS) embedding."""

    def __init__(self, model, size: int, mean, std):
        super().__init__()
        self.model, self.size = model, size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.num_features = model.config.hidden_size

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.mean.device) / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        out = self.model(pixel_values=(x - self.mean) / self.std)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


class InceptionFeatures(torch.nn.Module):
    """FID's Inception as torchmetrics' custom feature extractor: uint8 images (N,3,H,W)
    resized (bilinear) to 299x299 and given as floats in 0..255, as the TorchScript
    export expects, to its 2048 pool features."""

    num_features = 2048

    def __init__(self, net):
        super().__init__()
        self.net = net

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x, return_features=True).float()


def load_inception(path: str, device="cpu") -> InceptionFeatures:
    """The TorchScript Inception at `path`, checked to give (N, 2048) features.
    ConfigError naming `evaluate.inception_weights` when it is missing or not that."""
    if not Path(path).is_file():
        raise ConfigError(f"evaluate.inception_weights {path!r}: no such file")
    try:
        net = torch.jit.load(str(path), map_location="cpu").eval()
        model = InceptionFeatures(net).to(device)
        out = model(torch.full((1, 3, 299, 299), 128, dtype=torch.uint8, device=device))
    except (RuntimeError, ValueError, TypeError, torch.jit.Error) as e:
        raise ConfigError(
            f"evaluate.inception_weights {path!r}: not a TorchScript Inception called as "
            "model(images, return_features=True) (NVIDIA's inception-2015-12-05.pt): "
            f"{first_line(e, 160)}"
        ) from e
    if tuple(out.shape) != (1, 2048):
        raise ConfigError(
            f"evaluate.inception_weights {path!r}: gives features of shape "
            f"{tuple(out.shape)} for one image, not (1, 2048)"
        )
    return model


def load_scorers(cfg: EvaluateConfig, device) -> Scorers:
    """The CLIP, feature and (with `inception_weights`) Inception models; ConfigError
    naming the key when one cannot load."""
    inception = None
    if cfg.inception_weights is not None:
        inception = load_inception(cfg.inception_weights, device)
    clip = _load("evaluate.clip_model", cfg.clip_model, lambda: _clip(cfg, device))
    features = _load("evaluate.fd_model", cfg.fd_model, lambda: _features(cfg, device))
    return Scorers(clip, features, inception)


def _load(key: str, name: str, build):
    try:
        return build()
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:
        if hub_offline() and not Path(name).exists():
            why = "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            fix = f"download it once online (`hf download {name}`)"
        else:
            why = f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            fix = "give a hub id or a local folder of that kind of model"
        raise ConfigError(f"{key} {name!r}: {why}; {fix}, or use 'tiny'") from None


def _clip(cfg: EvaluateConfig, device):
    if cfg.clip_model == "tiny":
        from components.common.tiny import build_tiny_clip

        model, processor = build_tiny_clip(cfg.seed)
    else:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(cfg.clip_model)
        processor = CLIPProcessor.from_pretrained(cfg.clip_model)
    return _ClipFeatures(model.eval().to(device)), processor


def _features(cfg: EvaluateConfig, device) -> ImageFeatures:
    if cfg.fd_model == "tiny":
        from components.common.tiny import build_tiny_dinov2

        model, size, mean, std = build_tiny_dinov2(cfg.seed)
    else:
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(cfg.fd_model)
        proc = AutoImageProcessor.from_pretrained(cfg.fd_model)
        crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        size = crop.get("height") or crop.get("shortest_edge") or 224
        mean, std = proc.image_mean, proc.image_std
    return ImageFeatures(model.eval(), size, mean, std).to(device)


def clip_scores(scorers: Scorers, images: list[torch.Tensor], prompts: list[str]) -> list[float]:
    """CLIP score of each image (uint8 3,H,W) against its prompt."""
    from torchmetrics.multimodal import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: scorers.clip)
    scores = []
    for image, prompt in zip(images, prompts, strict=True):
        metric.update(image.unsqueeze(0), [prompt])
        scores.append(float(metric.compute()))
        metric.reset()
    return scores


@dataclass
class Distances:
    fd: float
    kid: float
    kid_std: float
    n: int
    fid: float | None = None


def distances(
    scorers: Scorers, real: torch.Tensor, fake: torch.Tensor, seed: int, subsets: int = 100
) -> Distances:
    """FD (features of `scorers.features`), KID and, with the Inception, FID between
    uint8 image batches `real` and `fake` (N,3,H,W)."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
    fd = FrechetInceptionDistance(feature=scorers.features, reset_real_features=False)
    kid = KernelInceptionDistance(
        feature=scorers.features, subsets=subsets, subset_size=max(2, n // 2)
    )
    for metric in (fd, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID's subsets
        kid_mean, kid_std = kid.compute()
    out = Distances(float(fd.compute()), float(kid_mean), float(kid_std), n)
    if scorers.inception is not None:
        fid = FrechetInceptionDistance(feature=scorers.inception)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out.fid = float(fid.compute())
    return out
