import json
import multiprocessing
import shutil
import stat

import pytest
from PIL import Image

from components import evaluate, publish
from components.common.config import EvaluateConfig, PublishConfig
from components.common.errors import T2IError
from components.common.records import read_evaluation_record, read_receipt

from .conftest import EVAL, PROMPTS


def test_metrics_compare_base_and_tuned(evaluation):
    out, report = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"]  # training helped held-out loss
    assert metrics["gate_passed"] is True and report.gate_passed
    for key in ("val_loss", "clip_score", "fd", "kid", "kid_std"):
        assert isinstance(metrics[f"base_{key}"], float), key
        assert isinstance(metrics[f"tuned_{key}"], float), key
    assert metrics["fd_ratio"] == pytest.approx(metrics["tuned_fd"] / metrics["base_fd"])
    assert metrics["clip_score_delta"] == pytest.approx(
        metrics["tuned_clip_score"] - metrics["base_clip_score"]
    )
    assert metrics["heldout_images"] == EVAL.heldout_captions
    assert not any(isinstance(v, dict | list) for v in metrics.values())  # exp show stays narrow
    curve = (out / "val_loss_by_timestep.csv").read_text().splitlines()
    assert curve[0] == "timestep,base,tuned"
    assert [int(line.split(",")[0]) for line in curve[1:]] == [100, 300, 500, 700, 900]
    by_prompt = (out / "clip_score_by_prompt.csv").read_text().splitlines()
    assert by_prompt[0] == "row,prompt,base,tuned" and len(by_prompt) == 1 + len(PROMPTS)
    record = read_evaluation_record(out)
    assert record.passed and [c.name for c in record.checks] == ["val_loss_ratio"]
    assert record.checks[0].value == pytest.approx(metrics["val_loss_ratio"])
    assert {c.key for c in record.comparisons} >= {"val_loss", "clip_score", "fd", "kid"}


def test_grid_and_self_contained_report(evaluation):
    out, _ = evaluation
    k = EVAL.images_per_prompt
    grid = Image.open(out / "grid.png")
    width = 220 + 2 * k * evaluate.CELL + 8
    assert grid.size == (width, 20 + len(PROMPTS) * evaluate.CELL)
    page = (out / "report.html").read_text()
    # Self-contained: every image inline, no link to another file or the network.
    assert page.count("data:image/png;base64,") == 2 * k * len(PROMPTS)
    assert "src='samples" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )
    assert page.count("<svg") == 2  # held-out loss by timestep, training loss
    assert "val_loss_ratio" in page and "CLIP score" in page and "KID" in page
    record = read_evaluation_record(out)
    assert [(s.prompt, s.seed) for s in record.samples] == [
        (p, EVAL.seed + i) for p in PROMPTS for i in range(k)
    ]
    for sample in record.samples:
        assert set(sample.images) == {"base", "tuned"}
        assert all((out / f).is_file() for f in sample.images.values())


def test_seeds_make_evaluation_reproducible(
    trained, tiny_model, latents, shards, tmp_path, evaluation
):
    evaluate.run(EVAL, trained[0] / "model", tiny_model, latents, tmp_path, shards=shards)
    again = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((evaluation[0] / "metrics.json").read_text())
    assert again == first
    for sample in read_evaluation_record(tmp_path).samples:
        for f in sample.images.values():
            assert (tmp_path / f).read_bytes() == (evaluation[0] / f).read_bytes()


def test_gate_checks_every_set_key_with_value_threshold_and_verdict():
    from components.common.config import GateConfig

    metrics = {"val_loss_ratio": 0.9, "clip_score_delta": -0.5, "fd_ratio": 1.2}
    checks = evaluate.gate_checks(
        GateConfig(max_val_loss_ratio=1.0, min_clip_score_delta=0.0, max_fd_ratio=1.1), metrics
    )
    assert [(c.name, c.comparison, c.threshold, c.passed) for c in checks] == [
        ("val_loss_ratio", "<=", 1.0, True),
        ("clip_score_delta", ">=", 0.0, False),
        ("fd_ratio", "<=", 1.1, False),
    ]
    none = GateConfig(max_val_loss_ratio=None)
    assert evaluate.gate_checks(none, metrics) == []


def test_gate_reasons_reach_the_publish_receipt(trained, tiny_model, latents, shards, tmp_path):
    from components.common.config import GateConfig

    strict = EVAL.model_copy(
        update={
            "images_per_prompt": 1,
            "gate": GateConfig(max_val_loss_ratio=1.0, min_clip_score_delta=1000.0),
        }
    )
    report = evaluate.run(
        strict, trained[0] / "model", tiny_model, latents, tmp_path / "eval", shards=shards
    )
    assert not report.gate_passed and "clip_score_delta" in report.summary()
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    with pytest.raises(publish.GateFailed, match="clip_score_delta .* .must be >= 1000.: failed"):
        publish.run(cfg, trained[0] / "model", tmp_path / "eval", tmp_path / "out")
    receipt = read_receipt(tmp_path / "out" / "receipt.json")
    assert [(c.name, c.passed) for c in receipt.checks] == [
        ("val_loss_ratio", True),
        ("clip_score_delta", False),
    ]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["evaluate.clip_model=nobody/no-such-clip"], "evaluate.clip_model 'nobody/no-such-clip'"),
        (["evaluate.fd_model=nobody/no-such-dino"], "evaluate.fd_model 'nobody/no-such-dino'"),
        (["evaluate.heldout_captions=500"], "evaluate.heldout_captions=500, but the validation"),
        (["evaluate.prompts=[]"], "evaluate.prompts"),
        (["evaluate.inception_weights=/no/such.pt"], "evaluate.inception_weights"),
        (["evaluate.inception_weights=params.yaml"], "not a TorchScript Inception"),  # a file
        (["evaluate.gate.max_fid_ratio=1.2"], "gate.max_fid_ratio needs evaluate.inception"),
        (["evaluate.max_val_loss_ratio=2"], "moved to evaluate.gate.max_val_loss_ratio"),
    ],
)
def test_bad_evaluation_input_is_one_line_exit_2_before_sampling(
    trained, tiny_model, latents, shards, tmp_path, capsys, sets, message
):
    from components.cli import main

    argv = ["evaluate", "--model", str(trained[0] / "model"), "--base-model", str(tiny_model)]
    argv += ["--latents", str(latents), "--shards", str(shards), "--out", str(tmp_path / "e")]
    for s in ["evaluate.heldout_captions=4", *sets]:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if "clip_model" in message:
        assert "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("variable", ["DVC_EXP_NAME", "T2I_EXPERIMENT"])
def test_experiments_do_not_publish_unless_asked(
    trained, evaluation, tmp_path, monkeypatch, variable
):
    monkeypatch.setenv(variable, "lunar-moth")
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert not receipt.published and receipt.experiment == "lunar-moth" and receipt.passed
    assert "publish.from_experiments" in receipt.reason
    # Advice that works where the experiment ran: DVC's for `dvc exp run`, the local
    # pipeline's for run-local (where `dvc exp apply` means nothing).
    if variable == "DVC_EXP_NAME":
        assert "`dvc exp apply` it" in receipt.reason
    else:
        assert "run the local pipeline again with --set publish.from_experiments=true" in (
            receipt.reason
        )
        assert "dvc" not in receipt.reason
    assert read_receipt(tmp_path / "out" / "receipt.json").reason == receipt.reason
    assert not (tmp_path / "registry").exists()
    # A failed gate in an experiment is recorded, not an error: the run's metrics stand.
    strict = tmp_path / "strict"
    shutil.copytree(evaluation[0], strict)
    record = json.loads((strict / "evaluation.json").read_text())
    record["passed"] = False
    record["checks"][0]["passed"] = False
    (strict / "evaluation.json").write_text(json.dumps(record))
    failed = publish.run(cfg, trained[0] / "model", strict, tmp_path / "out2")
    assert not failed.published and "gate failed" in failed.reason
    asked = cfg.model_copy(update={"from_experiments": True})
    done = publish.run(asked, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert done.published and done.local.version == 1


def test_publish_versions_and_is_idempotent(trained, evaluation, tmp_path):
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    first = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert first.published and first.local.version == 1 and first.local.new
    version_dir = tmp_path / "registry" / "m" / "1"
    assert (version_dir / "unet").is_dir() and (version_dir / "receipt.json").is_file()
    again = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert again.local.version == 1 and not again.local.new
    receipt = read_receipt(tmp_path / "out" / "receipt.json")
    assert receipt.unet_sha256 == first.unet_sha256
    assert not [p for p in (tmp_path / "registry" / "m").iterdir() if p.name.startswith(".")]


def test_registry_version_has_card_lineage_and_is_readable_by_the_team(
    trained, evaluation, tmp_path, capsys
):
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    version = tmp_path / "registry" / "m" / "1"
    lineage = json.loads((version / "lineage.json").read_text())
    # The tiny demo has no single-file layout: one line, and no file.
    err = capsys.readouterr().err
    assert "publish: single-file export skipped: the model's topology is not SD" in err
    assert lineage["exports"] == {} and not list(version.glob("*.safetensors"))
    assert lineage["unet_sha256"] == receipt.unet_sha256 == receipt.lineage["unet_sha256"]
    # every link of the chain, from publish's inputs alone
    assert lineage["pack"]["shards"] and all(s["sha256"] for s in lineage["pack"]["shards"])
    assert lineage["source"]["fingerprint"] and lineage["pack"]["manifest_sha256"]
    assert all(s["key"] for s in lineage["cache"]["shards"])
    assert lineage["base_model"]["source"] == "tiny" and lineage["base_model"]["unet_sha256"]
    assert lineage["train"]["config"]["learning_rate"] == 1e-3 and lineage["train"]["steps"] == 30
    assert lineage["train"]["config_sha256"] and "final_loss" in lineage["train"]
    assert lineage["evaluate"]["passed"] and lineage["evaluate"]["checks"]
    assert lineage["code"]["git_commit"] and lineage["code"]["torch_version"]
    card = (version / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "## Training settings" in card and "held-out loss" in card
    assert (version / "eval" / "grid.png").is_file()
    for path in [version, *version.rglob("*")]:
        mode = path.stat().st_mode
        assert mode & stat.S_IROTH, path  # a shared registry is readable by the team
        assert not path.is_dir() or mode & stat.S_IXOTH, path


def _publish_in_process(args):
    model, eval_dir, registry, out = args
    cfg = PublishConfig(name="m", registry=registry)
    return publish.run(cfg, model, eval_dir, out).local.version


def test_concurrent_publishes_both_succeed(trained, evaluation, tmp_path):
    model = trained[0] / "model"
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    other_eval = tmp_path / "other-eval"
    shutil.copytree(evaluation[0], other_eval)
    # A different UNet (one weight nudged), with an evaluation of it.
    from safetensors.torch import load_file, save_file

    from components.common.models import weights_sha256

    weights = next((other / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, weights)
    record = json.loads((other_eval / "evaluation.json").read_text())
    record["unet_sha256"] = weights_sha256(other, "unet")
    (other_eval / "evaluation.json").write_text(json.dumps(record))

    registry = str(tmp_path / "registry")
    jobs = [
        (model, evaluation[0], registry, tmp_path / "a"),
        (other, other_eval, registry, tmp_path / "b"),
        (model, evaluation[0], registry, tmp_path / "c"),
    ]
    with multiprocessing.get_context("fork").Pool(3) as pool:
        versions = pool.map(_publish_in_process, jobs)
    assert sorted(set(versions)) == [1, 2] and versions[0] == versions[2]
    names = sorted(p.name for p in (tmp_path / "registry" / "m").iterdir())
    assert names == ["1", "2", "latest.json"]  # one folder per UNet, and the latest's name


def test_failed_gate_publishes_nothing_and_says_which_check(trained, evaluation, tmp_path):
    failed = tmp_path / "eval"
    shutil.copytree(evaluation[0], failed)
    record = json.loads((failed / "evaluation.json").read_text())
    record["checks"][0].update(value=1.2, passed=False)
    record["passed"] = False
    (failed / "evaluation.json").write_text(json.dumps(record))
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    with pytest.raises(publish.GateFailed, match="val_loss_ratio 1.2 .must be <= 1.: failed"):
        publish.run(cfg, trained[0] / "model", failed, tmp_path / "out")
    receipt = read_receipt(tmp_path / "out" / "receipt.json")
    assert receipt.published is False and "val_loss_ratio" in receipt.reason
    assert [c.passed for c in receipt.checks] == [False]
    assert not (tmp_path / "registry" / "m").exists()


def test_incomplete_model_folder_is_refused(trained, evaluation, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained[0] / "model", model)
    next((model / "vae").glob("*.safetensors")).unlink()
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    with pytest.raises(T2IError, match="incomplete model folder .lacks vae/"):
        publish.run(cfg, model, evaluation[0], tmp_path / "out")
    assert not (tmp_path / "registry").exists() and not (tmp_path / "out").exists()


def test_evaluation_of_another_model_is_refused(trained, evaluation, tmp_path):
    other = tmp_path / "eval"
    shutil.copytree(evaluation[0], other)
    record = json.loads((other / "evaluation.json").read_text())
    record["unet_sha256"] = "0" * 64
    (other / "evaluation.json").write_text(json.dumps(record))
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    with pytest.raises(T2IError, match="evaluates another model"):
        publish.run(cfg, trained[0] / "model", other, tmp_path / "out")


def test_version_folder_without_receipt_is_skipped_not_fatal(trained, evaluation, tmp_path):
    (tmp_path / "registry" / "m" / "1").mkdir(parents=True)  # someone copied a folder in
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    receipt = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert receipt.local.version == 2 and receipt.local.new


def test_card_names_hub_base_model_and_dataset(trained, evaluation):
    """A hub base model and a Hub dataset reach the card's metadata, which the Hub's
    YAML rules (as the test Hub checks them) accept."""
    import yaml

    from components.common.records import BaseModelRecord, read_train_record
    from components.publish.card import render_card
    from components.publish.lineage import build_lineage

    from .hub_server import validate_card_yaml

    train = read_train_record(trained[0] / "model")
    base = BaseModelRecord(
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        unet_sha256="0" * 64,
        license="creativeml-openrail-m",
    )
    pack = train.pack.model_copy(update={"dataset_name": "lambdalabs/naruto-blip-captions"})
    train = train.model_copy(update={"base_model": base, "pack": pack})
    record = read_evaluation_record(evaluation[0])
    lineage = build_lineage("naruto", train, record)
    card = render_card(
        repo_id="acme/naruto",
        name="naruto",
        license_=base.license,
        version=2,
        train=train,
        evaluation=record,
        lineage=lineage,
    )
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == base.hub_id and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert meta["license"] == "creativeml-openrail-m"
    assert validate_card_yaml(card) == []
    assert "at revision `451f4fe1" in card and "# naruto (version 2)" in card


def test_held_out_loss_is_trainings_loss_incl_cached_text_embeddings(
    trained, tiny_model, shards, latents, tmp_path
):
    """One loss function for train and evaluate; the cached-hidden-states path gives
    the same held-out loss as encoding the token ids."""
    from diffusers import StableDiffusionPipeline

    from components import cache_latents
    from components.common.records import load_latent_split, read_latent_manifest
    from components.train_unet import objective

    from .conftest import CACHE

    assert evaluate.denoising_loss is objective.denoising_loss
    cache_latents.run(
        CACHE.model_copy(update={"text_embeddings": True}), shards, tiny_model, tmp_path / "lat"
    )
    with_ids, with_states = (
        load_latent_split(latents, "val"),
        load_latent_split(tmp_path / "lat", "val"),
    )
    assert "encoder_hidden_states" in with_states[0]
    pipe = StableDiffusionPipeline.from_pretrained(trained[0] / "model")
    cfg = EvaluateConfig(val_timesteps=[100, 700])
    factor = read_latent_manifest(latents).vae_scaling_factor
    a = evaluate.held_out_loss(pipe, with_ids, cfg, factor)
    b = evaluate.held_out_loss(pipe, with_states, cfg, factor)
    assert a == pytest.approx(b, rel=1e-4)


def test_no_validation_samples_is_one_line_exit_2(
    trained, tiny_model, sample_source, tmp_path, capsys
):
    from components import cache_latents, pack_shards
    from components.cli import main
    from components.common.config import DataConfig, PackConfig

    from .conftest import CACHE

    pack_shards.run(DataConfig(), PackConfig(val_fraction=0.0), sample_source, tmp_path / "s")
    cache_latents.run(CACHE, tmp_path / "s", tiny_model, tmp_path / "l")
    capsys.readouterr()  # the progress bars of pack and cache
    argv = ["evaluate", "--model", str(trained[0] / "model"), "--base-model", str(tiny_model)]
    argv += ["--latents", str(tmp_path / "l"), "--shards", str(tmp_path / "s")]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no validation samples" in err
    assert "pack.val_fraction" in err and not (tmp_path / "e").exists()


def _fake_inception(path):
    """A TorchScript module with the interface of NVIDIA's inception-2015-12-05.pt:
    model(images, return_features=True) on float NCHW 299x299 images in 0..255 gives
    (N, 2048) features. Its features are a fixed projection of pooled colours."""
    import torch

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("proj", torch.randn(3 * 16, 2048, generator=g))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.float32 and x.shape[2] == 299 and x.shape[3] == 299
            assert return_features and float(x.max()) > 1.0  # 0..255, not 0..1
            pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)
            return pooled @ self.proj

    torch.jit.script(FakeInception()).save(str(path))
    return path


def test_fid_from_a_torchscript_inception_reaches_metrics_report_card_and_gate(
    trained, tiny_model, latents, shards, tmp_path
):
    from components.common.config import GateConfig
    from components.publish.card import render_card

    weights = _fake_inception(tmp_path / "inception-2015-12-05.pt")
    cfg = EVAL.model_copy(
        update={
            "images_per_prompt": 1,
            "inception_weights": str(weights),
            "gate": GateConfig(max_val_loss_ratio=1.0, max_fid_ratio=1e-9),
        }
    )
    report = evaluate.run(
        cfg, trained[0] / "model", tiny_model, latents, tmp_path / "e", shards=shards
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["base_fid"] > 0 and metrics["tuned_fid"] > 0
    assert metrics["fid_ratio"] == pytest.approx(metrics["tuned_fid"] / metrics["base_fid"])
    assert not report.gate_passed and "fid_ratio" in report.summary()  # nothing is 1e-9x
    assert "FID" in (tmp_path / "e" / "report.html").read_text()
    record = read_evaluation_record(tmp_path / "e")
    assert "fid" in {c.key for c in record.comparisons}
    from components.common.records import read_train_record

    card = render_card(
        repo_id=None,
        name="m",
        license_=None,
        version=1,
        train=read_train_record(trained[0] / "model"),
        evaluation=record,
        lineage={"source": {}, "pack": {"manifest_sha256": ""}, "train": {"config_sha256": ""},
                 "unet_sha256": ""},
    )  # fmt: skip
    assert "FID" in card


def test_the_held_out_loss_compares_like_with_like_for_a_v_prediction_fine_tune(
    tiny_model, latents
):
    """A v-prediction fine-tune of an epsilon base: the base's output is scored as the v
    it implies (v = (eps - s*x_t) / a), the same quantity as the tuned model's, never
    its own epsilon loss against the tuned model's v loss."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from components.common.records import load_latent_split, read_latent_manifest

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base.scheduler.register_to_config(prediction_type="epsilon")  # (the tiny model is v)
    v_config = {**base.scheduler.config, "prediction_type": "v_prediction"}
    target = DDPMScheduler.from_config(v_config)
    val = load_latent_split(latents, "val")
    cfg = EvaluateConfig(val_timesteps=[100, 700])
    factor = read_latent_manifest(latents).vae_scaling_factor
    converted = evaluate.held_out_loss(base, val, cfg, factor, target)

    class PredictsV(torch.nn.Module):
        """The base UNet, converting its own epsilon output to v (the test's own sum)."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, hidden, return_dict=False):
            a = target.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = self.unet(x, t, hidden, return_dict=False)[0]
            return ((eps - (1 - a).sqrt() * x) / a.sqrt(),)

    from types import SimpleNamespace

    as_v = SimpleNamespace(
        unet=PredictsV(base.unet), text_encoder=base.text_encoder, device=base.device,
        scheduler=target,
    )  # fmt: skip
    expected = evaluate.held_out_loss(as_v, val, cfg, factor)
    assert converted == pytest.approx(expected, rel=1e-5)
    own = evaluate.held_out_loss(base, val, cfg, factor)  # its epsilon loss: another number
    assert own[700] != pytest.approx(converted[700], rel=1e-3)
    pipes = {"base": base, "tuned": as_v}
    assert "base model's epsilon output converted to v_prediction" in evaluate.loss_basis(
        pipes, target
    )


def test_grid_row_labels_wrap_whole_words():
    long = "a purple diamond on an orange background, softly lit, with a thin border"
    cfg = EVAL.model_copy(update={"prompts": [long], "images_per_prompt": 1})
    blank = Image.new("RGB", (32, 32), "white")
    grid = evaluate.sample_grid({"base": [blank], "tuned": [blank]}, [(long, 0)], cfg)
    label = grid.crop((0, 20, 220, 20 + evaluate.CELL)).convert("L")
    rows = [y for y in range(label.height) if min(label.crop((0, y, 220, y + 1)).getdata()) < 128]
    assert rows and rows[-1] - rows[0] > 24  # at least three lines of text, not one cut line
