"""Shared fixtures: a tiny model, a small sample set, its shards and latents (built once)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Outputs' sha256 by stat (components/common/stat_index.py): never the user's ~/.cache.
os.environ.setdefault("T2I_HASH_CACHE", tempfile.mkdtemp(prefix="t2i-test-hashes-"))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))

from components import base_model, cache_latents, evaluate, pack_shards, train_unet  # noqa: E402
from components.common.config import (  # noqa: E402
    CacheConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PackConfig,
    TrainConfig,
)

# A few VAE pretraining steps: the tests check mechanics, not picture quality (the
# default's 400 steps are tested once, in test_default_run.py). The epsilon objective:
# its loss falls clearly in a few steps (the default run's v_prediction learns the
# colours, in more).
MODEL = ModelConfig(seed=0, tiny_vae_steps=8, tiny_prediction_type="epsilon")
PACK = PackConfig(val_fraction=0.2, shard_max_samples=16)
CACHE = CacheConfig(resolution=32, random_flip=True, batch_size=16, dtype="fp32")
TRAIN = TrainConfig(
    train_batch_size=8,
    max_train_steps=30,
    learning_rate=1e-3,
    checkpointing_steps=10,
    lr_scheduler="constant",
)


_SIGKILL_ON_SECOND_SHARD = """
import os, signal, sys
import {module} as stage
from components.common.config import *
real, calls = stage.write_shard, []
def dying(path, records):
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, records)
stage.write_shard = dying
stage.run({call})
"""


def run_killed_on_second_shard(module: str, call: str, *args) -> None:
    """Run `module.run(call)` in a subprocess that SIGKILLs itself as its second shard
    starts (sys.argv holds `args`); assert it died by the signal."""
    import subprocess

    script = _SIGKILL_ON_SECOND_SHARD.format(module=module, call=call)
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    assert done.returncode == -9, done.stderr[-2000:]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base-model"
    base_model.run(MODEL, out)
    return out


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    from make_sample import make_sample

    out = tmp_path_factory.mktemp("sample") / "sample"
    make_sample(out, count=48)
    return out


@pytest.fixture(scope="session")
def shards(sample_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    pack_shards.run(DataConfig(), PACK, sample_source, out)
    return out


@pytest.fixture(scope="session")
def latents(shards, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "latents"
    cache_latents.run(CACHE, shards, tiny_model, out)
    return out


@pytest.fixture(scope="session")
def trained(latents, tiny_model, tmp_path_factory) -> tuple[Path, train_unet.TrainReport]:
    root = tmp_path_factory.mktemp("trained")
    report = train_unet.run(
        TRAIN, latents, tiny_model, root / "model", root / "train", root / "checkpoints"
    )
    return root, report


PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


EVAL = EvaluateConfig(prompts=PROMPTS, num_inference_steps=2, heldout_captions=4)


@pytest.fixture(scope="session")
def evaluation(trained, tiny_model, latents, shards, tmp_path_factory):
    """(eval folder, report) of the trained model against the tiny base model."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    report = evaluate.run(EVAL, trained[0] / "model", tiny_model, latents, out, shards=shards)
    return out, report


@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto's server mode, 127.0.0.1 only) and a boto3
    client for it; the environment points s3fs (and kfp.local's subprocesses) at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import urllib.request

    # moto keeps its buckets in this process, shared by every server: start empty.
    urllib.request.urlopen(
        urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST")
    ).close()
    try:
        yield boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    finally:
        server.stop()


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def run_folder(checkpoint_root: Path) -> Path:
    """The one run's folder under a checkpoint root (`<fingerprint>-<steps>`)."""
    (folder,) = [p for p in Path(checkpoint_root).iterdir() if p.is_dir()]
    return folder


def train_then_resume(cfg, latents, model, root: Path, drop: str):
    """Train `cfg` straight through in `root/a`, then again in `root/b` from a copy of
    its checkpoints less `drop` (a "crash" before that one). Returns (straight report,
    resumed report); compare `root/a` and `root/b`."""
    import shutil

    a, b = root / "a", root / "b"
    straight = train_unet.run(cfg, latents, model, a / "m", a / "t", a / "c")
    shutil.copytree(a / "c", b / "c")
    shutil.rmtree(run_folder(b / "c") / drop)
    return straight, train_unet.run(cfg, latents, model, b / "m", b / "t", b / "c")


def cached_and_encoded_losses(model: Path, tensors: dict, **kw) -> tuple[float, float]:
    """The training loss of one cached sample (`tensors`) with its cached text states,
    and with them left out (the model's encoders run), on the same fixed draws."""
    import torch

    from components.common.conditioning import TextEncoders
    from components.common.models import load_noise_scheduler, load_unet
    from components.train_unet.objective import training_loss

    class Draws:
        def __init__(self):
            self.g = torch.Generator().manual_seed(0)

        def randn(self, shape):
            return torch.randn(shape, generator=self.g)

        def randint(self, high, n):
            return torch.tensor([500] * n)

        def density(self, flow, n):
            return torch.full((n,), 0.4)

    batch = {k: v[None].float() if v.is_floating_point() else v[None].long()
             for k, v in tensors.items()}  # fmt: skip
    without = {k: v for k, v in batch.items() if k not in ("encoder_hidden_states", "text_embeds")}
    unet, scheduler = load_unet(model).eval(), load_noise_scheduler(model)
    text = TextEncoders.load(model)
    with torch.no_grad():
        return tuple(
            training_loss(
                unet, text, scheduler, b, Draws(), global_batch=1, device="cpu", **kw
            ).item()
            for b in (batch, without)
        )
