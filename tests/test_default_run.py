"""The default run (params.yaml as shipped, on data/sample) visibly learns: the tuned
model's samples are pictures, not noise, and they follow the prompt.

Fixed seeds on the default prompts. Total variation (mean absolute difference of
neighbouring pixels) measures noise: the tuned samples' must be well below the base
model's. Prompt-following: with the same seed, different prompts must give pictures
that differ at least half as much as different seeds of one prompt do (a model that
ignores the prompt gives the same picture for every prompt: a ratio near 0).
"""

import itertools

import numpy as np
import pytest

from components import base_model, cache_latents, pack_shards, train_unet
from components.common.config import load_params
from components.evaluate.sampling import generate, use_scheduler

from .conftest import REPO

SEEDS = (0, 1, 2)


def total_variation(image: np.ndarray) -> float:
    return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())


def pictures(model, params, resolution):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    use_scheduler(pipe, params.evaluate.scheduler)
    jobs = [(p, s) for s in SEEDS for p in params.evaluate.prompts]
    images = generate(pipe, jobs, params.evaluate, resolution)
    return {
        job: np.asarray(im, dtype=np.float32) / 255 for job, im in zip(jobs, images, strict=True)
    }


def prompt_vs_seed(images: dict, prompts: list[str]) -> float:
    by_prompt = [
        np.abs(images[(a, s)] - images[(b, s)]).mean()
        for s in SEEDS
        for a, b in itertools.combinations(prompts, 2)
    ]
    by_seed = [
        np.abs(images[(p, a)] - images[(p, b)]).mean()
        for p in prompts
        for a, b in itertools.combinations(SEEDS, 2)
    ]
    return float(np.mean(by_prompt) / np.mean(by_seed))


@pytest.mark.slow
def test_default_run_makes_pictures_that_follow_the_prompt(tmp_path):
    params = load_params(REPO / "params.yaml")
    base = tmp_path / "base-model"
    base_model.run(params.model, base)
    pack_shards.run(params.data, params.pack, REPO / params.data.source, tmp_path / "shards")
    cache_latents.run(params.cache, tmp_path / "shards", base, tmp_path / "latents")
    train = params.train.model_copy(update={"report_to": "none"})
    train_unet.run(
        train, tmp_path / "latents", base, tmp_path / "model", tmp_path / "r", tmp_path / "c"
    )
    resolution = params.cache.resolution
    prompts = params.evaluate.prompts
    before = pictures(base, params, resolution)
    after = pictures(tmp_path / "model", params, resolution)

    tv_before = np.mean([total_variation(i) for i in before.values()])
    tv_after = np.mean([total_variation(i) for i in after.values()])
    ratio_before, ratio_after = prompt_vs_seed(before, prompts), prompt_vs_seed(after, prompts)
    print(
        f"total variation base {tv_before:.3f} tuned {tv_after:.3f}; "
        f"prompt/seed difference base {ratio_before:.2f} tuned {ratio_after:.2f}"
    )
    assert tv_after < 0.6 * tv_before  # pictures, not noise
    assert ratio_after >= 0.5  # the prompt matters
    assert ratio_before < 0.2  # and it did not before training
