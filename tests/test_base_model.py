import pytest

from components import base_model
from components.common.config import ModelConfig
from components.common.errors import T2IError
from components.common.io import sha256_tree


def test_same_seed_gives_byte_identical_weights(tiny_model, tmp_path):
    again = tmp_path / "again"
    base_model.run(ModelConfig(seed=0), again)
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


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(T2IError, match="HF_HUB_OFFLINE"):
        base_model.run(
            ModelConfig(source="stable-diffusion-v1-5/stable-diffusion-v1-5"), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


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
