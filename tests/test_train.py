import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from components import train_unet
from components.common.errors import ConfigError
from components.train_unet import checkpoints

from .conftest import TRAIN, run_folder

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_loss_falls_on_sample_data(trained):
    root, report = trained
    assert report.steps == TRAIN.max_train_steps
    assert report.final_loss < 0.7 * report.initial_loss
    metrics = json.loads((root / "train" / "train_metrics.json").read_text())
    assert metrics["final_loss"] == pytest.approx(report.final_loss)
    assert (root / "train" / "loss.csv").read_text().count("\n") == TRAIN.max_train_steps + 1


def test_output_is_a_loadable_pipeline_that_generates(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained[0] / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    assert not list((trained[0] / "model").rglob("*.bin"))


def test_checkpoints_are_committed_and_pruned(trained):
    folder = run_folder(trained[0] / "checkpoints")
    assert folder.name.endswith(f"-{TRAIN.max_train_steps}")  # <fingerprint>-<steps>
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checkpoint-20", "checkpoint-30"]  # limit 2: checkpoint-10 pruned
    assert all((folder / n / "COMMITTED").is_file() for n in names)


def test_resume_latest_is_bit_exact(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    folder = run_folder(tmp_path / "checkpoints")
    shutil.rmtree(folder / "checkpoint-30")  # "crashed" after step 20
    (folder / "checkpoint-25.tmp").mkdir()  # a half-written one is ignored
    report = train_unet.run(
        TRAIN, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 20
    resumed, straight = load_file(tmp_path / "model" / UNET), load_file(root / "model" / UNET)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    a = torch.load(folder / "checkpoint-30/training_state.pt", weights_only=True)
    b = torch.load(
        run_folder(root / "checkpoints") / "checkpoint-30/training_state.pt", weights_only=True
    )
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for k, state in b["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], a["optimizer"]["state"][k]["exp_avg_sq"])


def test_latest_ignores_checkpoints_of_another_run_says_so_and_keeps_them(
    trained, latents, tiny_model, tmp_path, capsys
):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    theirs = run_folder(tmp_path / "checkpoints")
    other = TRAIN.model_copy(
        update={"learning_rate": 5e-4, "max_train_steps": 3, "checkpointing_steps": 1}
    )
    report = train_unet.run(
        other, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 0 and report.steps == 3
    out = capsys.readouterr().out
    assert f"not resuming {theirs / 'checkpoint-30'}" in out
    assert "train.learning_rate 0.001 -> 0.0005" in out and "kept" in out
    # Its own three checkpoints pruned to two, in its own folder; the other run's intact.
    assert sorted(p.name for p in theirs.iterdir()) == ["checkpoint-20", "checkpoint-30"]
    (mine,) = [p for p in (tmp_path / "checkpoints").iterdir() if p != theirs]
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_an_explicit_checkpoint_of_another_run_is_refused_unless_asked(
    trained, latents, tiny_model, tmp_path, capsys
):
    theirs = run_folder(trained[0] / "checkpoints") / "checkpoint-20"
    other = TRAIN.model_copy(
        update={"learning_rate": 5e-4, "resume_from_checkpoint": str(theirs), "report_to": "none"}
    )
    with pytest.raises(ConfigError, match="another run's checkpoint .*learning_rate.*resume_other"):
        train_unet.run(other, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    assert not (tmp_path / "m").exists()
    forced = other.model_copy(update={"resume_other_run": True})
    report = train_unet.run(
        forced, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c"
    )
    assert report.resumed_from_step == 20 and report.steps == 30
    assert "resuming another run's checkpoint" in capsys.readouterr().out


def test_a_checkpoint_whose_data_position_disagrees_is_refused(
    trained, latents, tiny_model, tmp_path
):
    from components.common.errors import T2IError

    shutil.copytree(trained[0] / "checkpoints", tmp_path / "checkpoints")
    state = run_folder(tmp_path / "checkpoints") / "checkpoint-30" / "state.json"
    doc = json.loads(state.read_text())
    doc["data_position"] = {"epoch": 0, "batch": 1}  # not where step 30 is
    state.write_text(json.dumps(doc))
    longer = TRAIN.model_copy(update={"max_train_steps": 31, "report_to": "none"})
    with pytest.raises(T2IError, match="saved at epoch 0, batch 1, but this run's data puts"):
        train_unet.run(
            longer, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "checkpoints"
        )


def test_a_longer_runs_checkpoint_is_never_resumed_into_a_shorter_run(
    trained, latents, tiny_model, tmp_path, capsys
):
    """checkpoint-20/30 of the 30-step run; asking for 10 steps trains 10 from scratch
    (DVC would otherwise record 10 steps for a 30-step model), in a folder of its own:
    the longer run's checkpoints are neither resumed nor pruned."""
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    longer = run_folder(tmp_path / "checkpoints")
    short = TRAIN.model_copy(update={"max_train_steps": 10})
    report = train_unet.run(
        short, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 0 and report.steps == 10
    out = capsys.readouterr().out
    assert f"not resuming {longer / 'checkpoint-30'}: it belongs to a 30-step run" in out
    assert sorted(p.name for p in longer.iterdir()) == ["checkpoint-20", "checkpoint-30"]
    shorter = tmp_path / "checkpoints" / (longer.name.rsplit("-", 1)[0] + "-10")
    assert [p.name for p in shorter.iterdir()] == ["checkpoint-10"]
    assert checkpoints.read_state(shorter / "checkpoint-10")["max_steps"] == 10
    with pytest.raises(ConfigError, match="at step 30, past train.max_train_steps=10"):
        path = str(longer / "checkpoint-30")
        train_unet.run(
            short.model_copy(update={"resume_from_checkpoint": path}),
            latents,
            tiny_model,
            tmp_path / "m2",
        )


def test_extending_a_run_resumes_it_and_says_so(trained, latents, tiny_model, tmp_path, capsys):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    longer = TRAIN.model_copy(update={"max_train_steps": 34})
    report = train_unet.run(
        longer,
        latents,
        tiny_model,
        tmp_path / "model",
        tmp_path / "train",
        tmp_path / "checkpoints",
    )
    assert report.resumed_from_step == 30 and report.steps == 34
    out = capsys.readouterr().out
    assert "extending a 30-step run from " in out and "checkpoint-30 to 34 steps" in out
    assert "LR schedule is recomputed" in out
    # The tracker run continues under the checkpoint's run id.
    run_id = checkpoints.read_state(run_folder(root / "checkpoints") / "checkpoint-30")["run_id"]
    runs = [p.name for p in (tmp_path / "train" / "logs" / TRAIN.tracker_project_name).iterdir()]
    assert runs == [run_id]


def test_each_training_run_logs_to_its_own_tensorboard_run(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "train", tmp_path / "train")
    other = TRAIN.model_copy(update={"learning_rate": 5e-4, "max_train_steps": 2})
    train_unet.run(
        other, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"
    )
    runs = sorted((tmp_path / "train" / "logs" / TRAIN.tracker_project_name).iterdir())
    assert len(runs) == 2 and all(list(r.glob("events.out.tfevents.*")) for r in runs)


def test_v_prediction_and_accumulation_run(latents, tiny_model, tmp_path, monkeypatch):
    """samples_seen counts the micro-batches actually trained (2 steps x 2 micro-steps)."""
    real, trained = train_unet.training_loss, []

    def counted(unet, text_encoder, scheduler, batch, draws, **kw):
        trained.append(len(batch["mean"]))
        return real(unet, text_encoder, scheduler, batch, draws, **kw)

    monkeypatch.setattr(train_unet, "training_loss", counted)
    cfg = TRAIN.model_copy(
        update={
            "prediction_type": "v_prediction",
            "max_train_steps": 2,
            "gradient_accumulation_steps": 2,
        }
    )
    report = train_unet.run(
        cfg, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"
    )
    assert trained == [cfg.train_batch_size] * 4
    assert report.samples_seen == sum(trained)
    saved = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resumed_ema_lives_where_the_parameters_it_shadows_live(tiny_model, tmp_path):
    """A checkpoint's EMA is read to the CPU; after `load` every shadow tensor is on the
    device and dtype of its parameter (here "meta" stands in for a CUDA device), so the
    next EMA step does not mix devices."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from components.common.models import load_unet

    def parts(device):
        unet = load_unet(tiny_model).to(device)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        return unet, optimizer, get_scheduler("constant", optimizer), EMAModel(unet.parameters())

    unet, optimizer, sched, ema = parts("cpu")
    run = checkpoints.RunIdentity("f" * 64, {}, 10)
    path = checkpoints.save(
        tmp_path, 4, run, unet, optimizer, sched, None, keep=None, history=[], ema=ema
    )
    unet, optimizer, sched, ema = parts("meta")
    assert checkpoints.load(path, unet, optimizer, sched, None, ema, ema_device="meta") == 4
    for shadow, param in zip(ema.shadow_params, unet.parameters(), strict=True):
        assert (shadow.device, shadow.dtype) == (param.device, param.dtype)
    ema.step(unet.parameters())  # the step that crashed with CPU shadows and CUDA params


def test_a_scheduler_that_predicts_the_sample_is_refused(latents, tiny_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ConfigError, match="prediction_type 'sample' cannot be trained"):
        train_unet.run(TRAIN, latents, base, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    assert not (tmp_path / "m").exists()
    ok = TRAIN.model_copy(update={"prediction_type": "epsilon", "max_train_steps": 1})
    assert train_unet.run(ok, latents, base, tmp_path / "m", tmp_path / "t", tmp_path / "c").steps


def test_the_launchers_mixed_precision_is_honoured_or_a_disagreement_named(
    latents, tiny_model, tmp_path, monkeypatch
):
    from components.train_unet.setup import resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch sets it
    unset = TRAIN.model_copy(update={"mixed_precision": None})
    assert resolve_precision(unset).mixed_precision == "bf16"
    assert resolve_precision(TRAIN.model_copy(update={"mixed_precision": "bf16"}))
    with pytest.raises(
        ConfigError, match="mixed_precision is 'no' but the launcher asks for 'bf16'"
    ):
        train_unet.run(
            TRAIN.model_copy(update={"mixed_precision": "no"}), latents, tiny_model, tmp_path / "m"
        )
    assert not (tmp_path / "m").exists()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision(unset).mixed_precision == "no"


def test_variant_loads_only_the_frozen_parts(latents, tiny_model, tmp_path):
    """Upstream trains the UNet's full-precision weights; `variant` is for the frozen
    text encoder (and VAE). A folder whose fp16 variant differs proves which was read."""
    from components.common.models import load_text_encoder, load_unet
    from components.train_unet.setup import load_models

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    rounded = load_unet(base)
    with torch.no_grad():
        for p in rounded.parameters():
            p.add_(1.0)
    rounded.save_pretrained(base / "unet", variant="fp16", safe_serialization=True)
    load_text_encoder(base).save_pretrained(base / "text_encoder", variant="fp16")
    from components.common.records import read_latent_manifest

    cfg = TRAIN.model_copy(update={"variant": "fp16"})
    models = load_models(cfg, base, base, "cpu", read_latent_manifest(latents))
    plain = load_unet(tiny_model).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in models.unet.state_dict().items())
    lora = cfg.model_copy(update={"lora_rank": 2})
    frozen = load_models(lora, base, base, "cpu", read_latent_manifest(latents)).unet
    key = "conv_in.weight"
    assert torch.equal(frozen.state_dict()[key], rounded.state_dict()[key])  # LoRA: the variant


def test_objective_options_match_the_upstream_formulas(latents, tiny_model):
    """Each option against an independent computation of train_text_to_image.py's
    formulas on the same fixed tensors (not merely "the loss changed")."""
    from components.common.models import load_noise_scheduler, load_text_encoder, load_unet
    from components.common.records import load_latent_split as load_split
    from components.train_unet.objective import Objective, training_loss

    samples = load_split(latents, "train")[:4]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("mean", "logvar", "input_ids")}
    unet, te = load_unet(tiny_model).eval(), load_text_encoder(tiny_model).eval()
    g = torch.Generator().manual_seed(7)
    shape = batch["mean"].shape
    eps, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    offset = torch.randn((4, shape[1], 1, 1), generator=g)
    perturbation = torch.randn(shape, generator=g)
    timesteps = torch.tensor([5, 40, 500, 900])  # SNR above and below 5
    sf = 0.18215

    class Scripted:
        """The draws training_loss asks for, in its order: eps, noise, [offset], [pert]."""

        def __init__(self, objective):
            self.values = [eps, noise]
            self.values += [offset] if objective.noise_offset else []
            self.values += [perturbation] if objective.input_perturbation else []

        def randn(self, shape_):
            value = self.values.pop(0)
            assert tuple(value.shape) == tuple(shape_)
            return value

        def randint(self, high, n):
            return timesteps

    def reference(sched, o: Objective) -> torch.Tensor:
        a = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x0 = (batch["mean"] + torch.exp(0.5 * batch["logvar"]) * eps) * sf
        n = noise + o.noise_offset * offset if o.noise_offset else noise
        fed = n + o.input_perturbation * perturbation if o.input_perturbation else n
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * fed
        v = sched.config.prediction_type == "v_prediction"
        target = a.sqrt() * n - (1 - a).sqrt() * x0 if v else n
        hidden = te(batch["input_ids"])[0]
        if o.dream_training:  # diffusers' compute_dream_and_update_latents, epsilon
            pred = unet(noisy, timesteps, hidden).sample
            delta = (n - pred) * (1 - a).sqrt() ** o.dream_detail_preservation
            noisy, target = noisy + (1 - a).sqrt() * delta, target + delta
        pred = unet(noisy, timesteps, hidden).sample
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if o.snr_gamma is not None:
            snr = (a / (1 - a)).flatten()
            weight = torch.minimum(snr, torch.full_like(snr, o.snr_gamma))
            per_sample = per_sample * weight / ((snr + 1) if v else snr)
        return per_sample.mean()

    cases = [
        ("epsilon", Objective()),
        ("v_prediction", Objective()),
        ("epsilon", Objective(snr_gamma=5.0)),
        ("v_prediction", Objective(snr_gamma=5.0)),
        ("epsilon", Objective(noise_offset=0.1)),
        ("epsilon", Objective(input_perturbation=0.1)),
        ("v_prediction", Objective(noise_offset=0.1, input_perturbation=0.1, snr_gamma=2.0)),
        ("epsilon", Objective(dream_training=True, dream_detail_preservation=0.5)),
    ]
    for prediction, objective in cases:
        sched = load_noise_scheduler(tiny_model)
        sched.register_to_config(prediction_type=prediction)
        with torch.no_grad():
            ours = training_loss(
                unet,
                te,
                sched,
                batch,
                Scripted(objective),
                scaling_factor=sf,
                global_batch=4,
                device="cpu",
                objective=objective,
            )
            expected = reference(sched, objective)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7, msg=str(objective))


def test_impossible_settings_fail_before_work(latents, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train_unet.run(
            TRAIN.model_copy(update={"mixed_precision": "fp16"}),
            latents,
            tiny_model,
            tmp_path / "m",
        )
    too_big = "for 1 data streams .*one global batch of 1000; lower train.train_batch_size to 38"
    with pytest.raises(ConfigError, match=too_big):
        train_unet.run(
            TRAIN.model_copy(update={"train_batch_size": 1000}), latents, tiny_model, tmp_path / "m"
        )
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        train_unet.run(
            TRAIN.model_copy(update={"resume_from_checkpoint": str(tmp_path / "no")}),
            latents,
            tiny_model,
            tmp_path / "m",
        )
    assert not (tmp_path / "m").exists()


# -- the recipe's flags ----------------------------------------------------------------


def test_ema_epochs_validation_and_tensorboard(latents, tiny_model, tmp_path):
    cfg = TRAIN.model_copy(
        update={
            "max_train_steps": None,
            "num_train_epochs": 3,
            "use_ema": True,
            "validation_prompts": ["a red circle"],
            "validation_epochs": 2,
            "checkpointing_steps": 12,
        }
    )
    report = train_unet.run(
        cfg, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"
    )
    assert report.steps == 12  # 3 epochs of 38 // 8 = 4 steps
    # As upstream: after the (0-based) epochs 0 and 2; the final one is step 12 too.
    validation = sorted((tmp_path / "train" / "validation").glob("step-*/00.png"))
    assert [p.parent.name for p in validation] == ["step-000004", "step-000012"]
    assert list((tmp_path / "train" / "logs").rglob("events.out.tfevents.*"))
    # The saved UNet holds the EMA weights: an average that lags the raw weights.
    ema, base = load_file(tmp_path / "model" / UNET), load_file(tiny_model / UNET)
    raw = load_file(run_folder(tmp_path / "ckpt") / "checkpoint-12" / UNET)

    def dist(x, y):
        return sum((x[k] - y[k]).pow(2).sum().item() for k in x) ** 0.5

    assert 0 < dist(ema, base) < dist(raw, base) and dist(ema, raw) > 0


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a run in another precision needs it reset
    (a `t2i train` process runs one training)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_validation_runs_in_eval_mode_in_the_runs_dtype_and_after_the_last_step(
    latents, tiny_model, tmp_path, monkeypatch, fresh_accelerate_state
):
    from diffusers import UNet2DConditionModel

    real, seen = UNet2DConditionModel.forward, []

    def spy(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # the validation pipeline's calls
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.append((self.training, dtype))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    cfg = TRAIN.model_copy(
        update={
            "max_train_steps": 6,  # epoch 0 ends at step 4; the run at 6
            "validation_prompts": ["a red circle"],
            "validation_epochs": 1,
            "mixed_precision": "bf16",
            "report_to": "none",
        }
    )
    train_unet.run(cfg, latents, tiny_model, tmp_path / "m", tmp_path / "t", tmp_path / "c")
    folders = sorted(p.name for p in (tmp_path / "t" / "validation").iterdir())
    assert folders == ["step-000004", "step-000006"]  # the last step validates too
    assert seen and set(seen) == {(False, torch.bfloat16)}


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.enable_xformers_memory_efficient_attention=true", "needs a CUDA GPU"),
        ("train.use_8bit_adam=true", "bitsandbytes is not installed"),
        ("train.report_to=wandb", "wandb is not installed"),
        ("train.offload_ema=true", "offload_ema needs use_ema"),
        ("train.max_train_steps=null", "set max_train_steps or num_train_epochs"),
        ("train.prediction_type=x0", "prediction_type"),
        ("train.resume_from_checkpoint=/no/such/checkpoint", "no committed checkpoint"),
    ],
)
def test_impossible_settings_are_one_line_exit_2(tmp_path, capsys, setting, message):
    from components.cli import main

    code = main(
        [
            "train",
            "--set",
            setting,
            "--latents",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m").exists()


# -- exact resume after SIGKILL ---------------------------------------------------------

RESUME = TRAIN.model_copy(
    update={
        "max_train_steps": 12,
        "train_batch_size": 4,  # 38 train samples: 9 steps per epoch
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 3,
        "use_ema": True,
        "snr_gamma": 5.0,
        "noise_offset": 0.05,
        "input_perturbation": 0.1,
        "proportion_empty_prompts": 0.2,
        "shuffle_buffer": 8,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "report_to": "none",
    }
)

_KILL_AFTER_CHECKPOINT = """
import json, os, signal, sys
from components import train_unet
from components.common.config import TrainConfig
from components.train_unet import checkpoints
real, kill_at = checkpoints.save, int(sys.argv[1])
def save_then_die(root, step, *args, **kwargs):
    path = real(root, step, *args, **kwargs)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpoints.save = save_then_die
cfg = TrainConfig.model_validate(json.loads(sys.argv[2]))
train_unet.run(cfg, *sys.argv[3:])
"""


@pytest.fixture(scope="module")
def straight_runs(latents, tiny_model, tmp_path_factory):
    """The uninterrupted run of RESUME with a given gradient accumulation (made once)."""
    runs = {}

    def get(accumulation: int):
        if accumulation not in runs:
            cfg = RESUME.model_copy(update={"gradient_accumulation_steps": accumulation})
            root = tmp_path_factory.mktemp(f"straight{accumulation}")
            train_unet.run(cfg, latents, tiny_model, root / "model", root / "train", root / "ckpt")
            runs[accumulation] = root
        return runs[accumulation]

    return get


def _same_run(a, b, steps: int) -> None:
    """Two run roots (model/, ckpt/, train/) hold bit-identical results."""
    ckpt_a, ckpt_b = (run_folder(root / "ckpt") / f"checkpoint-{steps}" for root in (a, b))
    for x, y in ((a / "model" / UNET, b / "model" / UNET), (ckpt_a / UNET, ckpt_b / UNET)):
        wx, wy = load_file(x), load_file(y)  # EMA and raw weights
        assert all(torch.equal(wx[k], wy[k]) for k in wy), x
    sa, sb = (torch.load(c / "training_state.pt", weights_only=True) for c in (ckpt_a, ckpt_b))
    assert sa["lr_scheduler"] == sb["lr_scheduler"]
    for k, state in sb["optimizer"]["state"].items():
        assert all(torch.equal(state[n], sa["optimizer"]["state"][k][n]) for n in state)
    assert sa["ema"]["optimization_step"] == sb["ema"]["optimization_step"] == steps
    assert all(
        torch.equal(x, y)
        for x, y in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"], strict=True)
    )
    assert (a / "train" / "loss.csv").read_text() == (b / "train" / "loss.csv").read_text()


@pytest.mark.parametrize(
    "kill_at, accumulation",
    [(6, 1), (10, 1), (6, 2)],  # mid-epoch 0; mid-epoch 1; 2 micro-batches per step
    ids=["epoch0", "epoch1", "accumulation2"],
)
def test_sigkill_then_resume_is_bit_exact(
    straight_runs, latents, tiny_model, tmp_path, kill_at, accumulation
):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    cfg = RESUME.model_copy(update={"gradient_accumulation_steps": accumulation})
    paths = [latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_CHECKPOINT, str(kill_at), cfg.model_dump_json()]
        + [str(p) for p in paths],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (tmp_path / "model").exists()
    checkpoint = run_folder(tmp_path / "ckpt") / f"checkpoint-{kill_at}"
    state = json.loads((checkpoint / "state.json").read_text())
    micro = kill_at * accumulation  # 38 train samples, batches of 4: 9 per epoch
    assert state["data_position"] == {"epoch": micro // 9, "batch": micro % 9}
    report = train_unet.run(cfg, *paths)
    assert report.resumed_from_step == kill_at and report.steps == 12
    _same_run(tmp_path, straight_runs(accumulation), 12)


# -- multi-process ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lora", [{}, {"lora_rank": 4, "lora_merge": True}], ids=["full", "lora"])
def test_two_gloo_processes_equal_one_with_twice_the_batch(latents, tiny_model, tmp_path, lora):
    """DDP: full fine-tuning, and a LoRA adapter (compared through its merged UNet)."""
    from components.cli import main

    common = {"max_train_steps": 3, "data_streams": 2, "report_to": "none", "shuffle_buffer": 8}
    common |= lora
    one = TRAIN.model_copy(update={**common, "train_batch_size": 8})
    train_unet.run(one, latents, tiny_model, tmp_path / "one", tmp_path / "r1", tmp_path / "c1")
    sets = [f"train.{k}={v}" for k, v in {**common, "train_batch_size": 4}.items()]
    sets += ["train.learning_rate=0.001", "train.lr_scheduler=constant"]
    sets += ["train.proportion_empty_prompts=0.0"]  # as TRAIN, not params.yaml
    sets += ["evaluate.heldout_captions=4"]  # the fixture's validation split holds 10
    argv = ["train", "--num-processes", "2", "--latents", str(latents), "--model", str(tiny_model)]
    argv += ["--out", str(tmp_path / "two"), "--reports", str(tmp_path / "r2")]
    argv += ["--checkpoints", str(tmp_path / "c2")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    a, b = load_file(tmp_path / "one" / UNET), load_file(tmp_path / "two" / UNET)
    base = load_file(tiny_model / UNET)

    def norm(x, y):
        return sum((x[k] - y[k]).double().pow(2).sum().item() for k in x) ** 0.5

    rel = norm(a, b) / norm(a, base)
    losses = [
        [float(line.split(",")[1]) for line in (tmp_path / r / "loss.csv").read_text().split()[1:]]
        for r in ("r1", "r2")
    ]
    # Stated tolerance. Per-step losses agree to 1e-5 (relative). The UNets differ by
    # less than 1% of the update's norm. AdamW's m/sqrt(v) blows the all-reduce's
    # rounding up to full-size steps on near-zero gradients; 0.12% measured.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert rel < 0.01


_DDP_SCRIPT = """
import json, os, signal, sys
from components import train_unet
from components.common.config import TrainConfig
from components.train_unet import checkpoints
real, kill_at = checkpoints.save, int(sys.argv[1])
def save_then_die(root, step, *args, **kwargs):
    path = real(root, step, *args, **kwargs)
    if step == kill_at:  # rank 0 saves; its death takes the job down, as a lost node does
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpoints.save = save_then_die
train_unet.run(TrainConfig.model_validate(json.loads(sys.argv[2])), *sys.argv[3:])
"""


@pytest.mark.slow
def test_two_gloo_processes_killed_after_a_checkpoint_resume_bit_exact(
    latents, tiny_model, tmp_path
):
    """DDP resume: 2 processes SIGKILLed after checkpoint 4 (of 8), relaunched, equal
    the uninterrupted 2-process run bit for bit (weights, optimizer, EMA, loss.csv)."""
    import subprocess
    import sys

    from .conftest import REPO

    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    cfg = RESUME.model_copy(update={"max_train_steps": 8, "train_batch_size": 2})

    def launch(root, kill_at: int) -> int:
        paths = [latents, tiny_model, root / "model", root / "train", root / "ckpt"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", str(script), str(kill_at), cfg.model_dump_json()]
        done = subprocess.run(
            cmd + [str(p) for p in paths],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stderr[-3000:]

    import os

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, err = launch(straight, -1)
    assert code == 0, err
    code, err = launch(resumed, 4)
    assert code != 0 and not (resumed / "model").exists()
    assert sorted(p.name for p in run_folder(resumed / "ckpt").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    code, err = launch(resumed, -1)
    assert code == 0, err
    assert (
        json.loads((resumed / "train" / "train_metrics.json").read_text())["resumed_from_step"] == 4
    )
    _same_run(resumed, straight, 8)


def _launch_error(latents, tiny_model, tmp_path, capsys, processes, *sets) -> str:
    from components.cli import main

    argv = ["train", "--num-processes", str(processes), "--latents", str(latents)]
    argv += ["--model", str(tiny_model), "--out", str(tmp_path / "m")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2  # before torchrun starts: no per-rank tracebacks
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_more_processes_than_shards_share_them_and_too_few_samples_is_one_line(
    latents, tiny_model, tmp_path, capsys
):
    """Streams take equal ranges of samples, not whole shards: more processes than
    shards is fine; fewer samples than one global batch is one line before launch."""
    from components.common.records import read_latent_manifest

    shards = [s for s in read_latent_manifest(latents).shards if s.split == "train"]
    small = TRAIN.model_copy(update={"train_batch_size": 2})
    train_unet.check_data(small, latents, len(shards) + 1)
    err = _launch_error(latents, tiny_model, tmp_path, capsys, 5, "train.train_batch_size=8")
    assert "38 train samples" in err and "less than one global batch of 40" in err
    assert "lower train.train_batch_size to 7 or less" in err
    assert not (tmp_path / "m").exists()


def test_batch_too_large_for_a_stream_names_a_batch_that_fits(
    latents, tiny_model, tmp_path, capsys
):
    import re

    err = _launch_error(latents, tiny_model, tmp_path, capsys, 2, "train.train_batch_size=40")
    fits = int(re.search(r"lower train.train_batch_size to (\d+)", err).group(1))
    # The advice works: that batch passes the same check.
    train_unet.check_data(TRAIN.model_copy(update={"train_batch_size": fits}), latents, 2)
    with pytest.raises(ConfigError):
        train_unet.check_data(TRAIN.model_copy(update={"train_batch_size": fits + 1}), latents, 2)


def test_crash_while_saving_keeps_the_previous_checkpoint(
    latents, tiny_model, tmp_path, monkeypatch
):
    from components.train_unet import checkpoints

    cfg = TRAIN.model_copy(
        update={"max_train_steps": 4, "checkpointing_steps": 2, "report_to": "none"}
    )
    real_save, calls = torch.save, []

    def disk_full_on_second(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", disk_full_on_second)
    with pytest.raises(OSError, match="No space left"):
        train_unet.run(cfg, latents, tiny_model, tmp_path / "m", tmp_path / "r", tmp_path / "c")
    folder = run_folder(tmp_path / "c")
    assert [p.name for p in folder.iterdir()] == ["checkpoint-2"]
    assert checkpoints.committed(folder)[0].name == "checkpoint-2"
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    report = train_unet.run(
        cfg, latents, tiny_model, tmp_path / "m", tmp_path / "r", tmp_path / "c"
    )
    assert report.resumed_from_step == 2 and report.steps == 4


def test_module_entry_point_for_accelerate_launch():
    import subprocess
    import sys

    from .conftest import REPO

    done = subprocess.run(
        [sys.executable, "-m", "components.train_unet", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "--num-processes" in done.stdout


def test_non_ema_revision_needs_a_hub_model(latents, tiny_model, tmp_path):
    cfg = TRAIN.model_copy(update={"use_ema": True, "non_ema_revision": "abc123"})
    with pytest.raises(ConfigError, match="non_ema_revision needs a hub model"):
        train_unet.run(cfg, latents, tiny_model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("evaluate.heldout_captions=500", "validation split holds 10 samples; lower it to 10"),
        ("train.train_batch_size=64", "less than one global batch of 64"),
    ],
)
def test_what_would_fail_later_fails_before_training(
    latents, tiny_model, tmp_path, capsys, setting, message
):
    """Evaluate's needs of the data and the stream arithmetic are checked by `t2i
    train` before a step is trained: one line, exit 2, no model, no checkpoint."""
    from components.cli import main

    argv = ["train", "--latents", str(latents), "--model", str(tiny_model)]
    argv += ["--out", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c")]
    argv += ["--set", setting, "--set", "train.report_to=none"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(latents, model, root, cfg, kill_node_after: str | None = None) -> list[int]:
    """`t2i train` on 2 "nodes" (processes with Kubeflow Trainer's PET_* variables, 1
    process each, gloo). With `kill_node_after`, node 1 is SIGKILLed once that
    checkpoint is committed (a lost node). The exit codes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    port = str(_free_port())
    sets = [
        a
        for k, v in cfg.model_dump(mode="json").items()
        for a in ("--set", f"train.{k}={json.dumps(v)}")
    ]
    argv = [sys.executable, "-m", "components.cli", "train", "--params", "/dev/null", *sets]
    argv += ["--checked"]  # (evaluate's defaults are not this data's)
    argv += ["--latents", str(latents), "--model", str(model), "--out", str(root / "model")]
    argv += ["--reports", str(root / "train"), "--checkpoints", str(root / "ckpt")]
    procs = []
    for rank in (0, 1):
        pet = {"PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": "1",
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), **pet}
        procs.append(
            subprocess.Popen(
                argv, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL
            )
        )
    if kill_node_after:
        deadline = time.monotonic() + 240
        while not list((root / "ckpt").glob(f"*/{kill_node_after}/COMMITTED")):
            assert time.monotonic() < deadline and procs[1].poll() is None
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)  # node 1 and its torchrun workers
        procs[1].wait()
        # JobSet's failurePolicy fails the whole job when a node fails: node 0, blocked
        # in a collective with its lost peer, goes too (then the job restarts whole).
        os.killpg(procs[0].pid, signal.SIGTERM)
    return [p.wait(timeout=300) for p in procs]


@pytest.mark.slow
def test_two_trainer_nodes_train_as_one_process_with_two_streams_and_resume(
    latents, tiny_model, tmp_path
):
    """Two `t2i train` processes with PET_NNODES=2 (as Kubeflow Trainer starts them)
    give the UNet of one process with data_streams: 2 (within the DDP tolerance); a
    node lost after a checkpoint, both restarted, equals the uninterrupted 2-node run."""
    cfg = RESUME.model_copy(update={"max_train_steps": 8, "train_batch_size": 2,
                                    "data_streams": 2, "checkpointing_steps": 2})  # fmt: skip
    straight = tmp_path / "straight"
    assert _nodes(latents, tiny_model, straight, cfg) == [0, 0]
    one = cfg.model_copy(update={"train_batch_size": 4})
    train_unet.run(one, latents, tiny_model, tmp_path / "one", tmp_path / "r1", tmp_path / "c1")
    a, b = load_file(straight / "model" / UNET), load_file(tmp_path / "one" / UNET)
    base = load_file(tiny_model / UNET)

    def norm(x, y):
        return sum((x[k] - y[k]).double().pow(2).sum().item() for k in x) ** 0.5

    assert norm(a, b) / norm(b, base) < 0.01  # as the one-node DDP test's tolerance

    lost = tmp_path / "lost"
    codes = _nodes(latents, tiny_model, lost, cfg, kill_node_after="checkpoint-4")
    assert codes[1] == -9 and codes[0] != 0 and not (lost / "model").exists()
    assert _nodes(latents, tiny_model, lost, cfg) == [0, 0]  # the job restarted whole
    metrics = json.loads((lost / "train" / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 4
    _same_run(lost, straight, 8)
