"""The default run (params.yaml as shipped, on data/sample) visibly learns the prompt,
judged as a user would judge it: with plain diffusers on the trained model, fixed
seeds, the default prompts and the default sampling settings.

- Colours: the border's mean colour is nearest (of the demo's eight colours) to the
  prompt's background colour in at least 10 of 16 samples, and the shape's (the pixels
  far from the background) to the prompt's shape colour in at least half. Chance is
  about 2 of 16.
- And it is the training that did it: the base model's samples of the same prompts and
  seeds hardly ever match (its UNet is random).
"""

import numpy as np
import pytest

from components import base_model, cache_latents, pack_shards, train_unet
from components.common.config import load_params
from components.common.shapes import COLOURS
from components.evaluate.sampling import generate, use_scheduler

from .conftest import REPO

SEEDS = (0, 1, 2, 3)
NAMES = list(COLOURS)
RGB = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)


def nearest(rgb) -> str:
    return NAMES[int(np.argmin(((RGB - rgb) ** 2).sum(axis=1)))]


def colours(image: np.ndarray) -> tuple[str, str | None]:
    """(background, shape) colour names of a sample: the 2-pixel border's mean, and the
    mean of the pixels far (> 80 in RGB) from it (None when there are hardly any)."""
    border = np.concatenate(
        [image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3)]
        + [image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]
    )
    background = border.mean(axis=0)
    far = image[np.sqrt(((image - background) ** 2).sum(axis=-1)) > 80]
    return nearest(background), (nearest(far.mean(axis=0)) if len(far) > 8 else None)


def samples(model, params) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    use_scheduler(pipe, params.evaluate.scheduler)
    jobs = [(p, s) for p in params.evaluate.prompts for s in SEEDS]
    images = generate(pipe, jobs, params.evaluate, params.cache.resolution)
    return {job: np.asarray(im, dtype=np.float32) for job, im in zip(jobs, images, strict=True)}


@pytest.mark.slow
def test_default_run_draws_the_colours_the_prompt_names(tmp_path):
    params = load_params(REPO / "params.yaml")
    base = tmp_path / "base-model"
    base_model.run(params.model, base)
    pack_shards.run(params.data, params.pack, REPO / params.data.source, tmp_path / "shards")
    cache_latents.run(params.cache, tmp_path / "shards", base, tmp_path / "latents")
    train = params.train.model_copy(update={"report_to": "none"})
    train_unet.run(
        train, tmp_path / "latents", base, tmp_path / "model", tmp_path / "r", tmp_path / "c"
    )
    before, after = samples(base, params), samples(tmp_path / "model", params)

    def matches(images: dict) -> tuple[int, int]:
        backgrounds = shapes = 0
        for (prompt, _), image in images.items():
            words = prompt.split()  # "a red circle on a blue background"
            bg, shape = colours(image)
            backgrounds += bg == words[-2]
            shapes += shape == words[1]
        return backgrounds, shapes

    (bg_before, shape_before), (bg_after, shape_after) = matches(before), matches(after)
    print(
        f"tuned: backgrounds {bg_after}/16, shapes {shape_after}/16; base: backgrounds "
        f"{bg_before}/16, shapes {shape_before}/16"
    )
    assert bg_after >= 10 and shape_after >= 8
    assert bg_before <= 4 and shape_before <= 4
