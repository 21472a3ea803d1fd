import pytest

from components import base_model
from components.common.config import ModelConfig
from components.common.errors import T2IError
from components.common.io import sha256_tree

from .conftest import MODEL


def test_same_seed_gives_byte_identical_weights(tiny_model, tmp_path):
    again = tmp_path / "again"
    base_model.run(MODEL, again)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert sha256_tree(tiny_model / part) == sha256_tree(again / part), part


def test_layout_is_diffusers_with_safetensors(tiny_model):
    assert (tiny_model / "model_index.json").is_file()
    weights = sorted(
        p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*.safetensors")
    )
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(tiny_model.rglob("*.bin")) and not list(tiny_model.rglob("*.pt"))


def test_scheduler_is_scaled_linear_ddpm(tiny_model):
    from components.common.models import load_noise_scheduler

    sched = load_noise_scheduler(tiny_model)
    assert type(sched).__name__ == "DDPMScheduler"
    assert sched.config.beta_schedule == "scaled_linear"


def test_tokenizer_round_trips_captions(tiny_model):
    from components.common.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) < 20  # merges learnt: words are not spelled out letter by letter
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle on a blue background"


def _cli(*args, env):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "components.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def test_hub_id_offline_uses_the_cache_and_is_a_config_error_when_absent(tiny_model, tmp_path):
    """A model in the Hugging Face cache (as `hf download` leaves it) loads with
    HF_HUB_OFFLINE=1; one not in the cache is exit 2, one line, no output folder."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    done = _cli(
        "base-model", "--set", "model.source=someone/tiny-sd", "--out", str(tmp_path / "a"), env=env
    )
    assert done.returncode == 0, done.stderr
    assert sha256_tree(tmp_path / "a" / "unet") == sha256_tree(tiny_model / "unet")
    record = (tmp_path / "a" / "base_model.json").read_text()
    assert commit in record and "someone/tiny-sd" in record

    done = _cli(
        "base-model", "--set", "model.source=someone/absent", "--out", str(tmp_path / "b"), env=env
    )
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "'someone/absent' is not in the Hugging Face cache" in err and "hf download" in err
    assert not (tmp_path / "b").exists()


def test_local_folder_is_copied(tiny_model, tmp_path):
    report = base_model.run(ModelConfig(source=str(tiny_model)), tmp_path / "copy")
    assert sha256_tree(tmp_path / "copy" / "unet") == sha256_tree(tiny_model / "unet")
    assert report.source == str(tiny_model)


def test_local_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(T2IError, match="not a diffusers model folder"):
        base_model.run(ModelConfig(source=str(tmp_path / "junk")), tmp_path / "out")


def test_license_comes_from_the_base_models_card(tmp_path):
    from components.base_model import card_license

    (tmp_path / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# SD\n")
    assert card_license(tmp_path) == "creativeml-openrail-m"
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert card_license(tmp_path) is None
    assert card_license(tmp_path / "missing") is None


def test_a_pipeline_the_trainer_cannot_train_is_refused_at_the_base_model_stage(
    tiny_model, tmp_path, capsys
):
    """A PixArt (or any other unsupported) pipeline folder: one line naming its class and
    what is trained, before anything is written; `t2i train` on such a folder says the
    same."""
    import json
    import shutil

    from components.cli import main

    other = tmp_path / "pixart"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "PixArtAlphaPipeline"})
    )
    out = tmp_path / "base"
    assert main(["base-model", "--set", f"model.source={other}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a PixArtAlphaPipeline" in err, err
    assert "trains StableDiffusionPipeline (Stable Diffusion 1.x/2.x), " in err
    assert "StableDiffusionXLPipeline (Stable Diffusion XL), " in err
    assert "StableDiffusion3Pipeline (Stable Diffusion 3/3.5), FluxPipeline (FLUX.1)" in err
    assert not out.exists()
    train = ["train", "--set", f"train.pretrained_model_name_or_path={other}"]
    assert main([*train, "--out", str(tmp_path / "m")]) == 2
    assert "train.pretrained_model_name_or_path" in capsys.readouterr().err
