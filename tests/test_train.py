import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from components import train_unet
from components.common.errors import ConfigError
from components.train_unet import checkpoints

from .conftest import TRAIN

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
    names = sorted(p.name for p in (trained[0] / "checkpoints").iterdir())
    assert names == ["checkpoint-20", "checkpoint-30"]  # limit 2: checkpoint-10 pruned
    assert all((trained[0] / "checkpoints" / n / "COMMITTED").is_file() for n in names)


def test_resume_latest_is_bit_exact(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-30")  # "crashed" after step 20
    (tmp_path / "checkpoints" / "checkpoint-25.tmp").mkdir()  # a half-written one is ignored
    report = train_unet.run(
        TRAIN, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 20
    resumed, straight = load_file(tmp_path / "model" / UNET), load_file(root / "model" / UNET)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    a = torch.load(tmp_path / "checkpoints/checkpoint-30/training_state.pt", weights_only=True)
    b = torch.load(root / "checkpoints/checkpoint-30/training_state.pt", weights_only=True)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for k, state in b["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], a["optimizer"]["state"][k]["exp_avg_sq"])


def test_latest_ignores_checkpoints_of_another_run(trained, latents, tiny_model, tmp_path):
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    other = TRAIN.model_copy(update={"learning_rate": 5e-4, "max_train_steps": 2})
    report = train_unet.run(
        other, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 0 and report.steps == 2


def test_a_longer_runs_checkpoint_is_never_resumed_into_a_shorter_run(
    trained, latents, tiny_model, tmp_path, capsys
):
    """checkpoint-20/30 of the 30-step run; asking for 10 steps trains 10 from scratch
    (DVC would otherwise record 10 steps for a 30-step model), and its own checkpoint
    survives the pruning of the longer run's."""
    root, _ = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    short = TRAIN.model_copy(update={"max_train_steps": 10})
    report = train_unet.run(
        short, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "checkpoints"
    )
    assert report.resumed_from_step == 0 and report.steps == 10
    assert "not resuming checkpoint-30: it belongs to a 30-step run" in capsys.readouterr().out
    kept = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert kept == {"checkpoint-10", "checkpoint-30"}  # the oldest commit (20) was pruned
    assert checkpoints.read_state(tmp_path / "checkpoints" / "checkpoint-10")["max_steps"] == 10
    with pytest.raises(ConfigError, match="at step 30, past train.max_train_steps=10"):
        path = str(tmp_path / "checkpoints" / "checkpoint-30")
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
    assert "extending a 30-step run from checkpoint-30 to 34 steps" in out
    assert "LR schedule is recomputed" in out
    # The tracker run continues under the checkpoint's run id.
    run_id = checkpoints.read_state(root / "checkpoints" / "checkpoint-30")["run_id"]
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


def test_v_prediction_and_accumulation_run(latents, tiny_model, tmp_path):
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
    assert report.samples_seen == 2 * 2 * cfg.train_batch_size
    saved = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_impossible_settings_fail_before_work(latents, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train_unet.run(
            TRAIN.model_copy(update={"mixed_precision": "fp16"}),
            latents,
            tiny_model,
            tmp_path / "m",
        )
    with pytest.raises(ConfigError, match="for 1 data streams .*less than one batch"):
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


def test_objective_options_change_the_loss(latents, tiny_model):
    from components.common.models import load_noise_scheduler, load_text_encoder, load_unet
    from components.common.records import load_latent_split as load_split
    from components.train_unet.objective import Objective, StepDraws, training_loss

    samples = load_split(latents, "train")[:4]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("mean", "logvar", "input_ids")}
    unet, te = load_unet(tiny_model), load_text_encoder(tiny_model)
    sched = load_noise_scheduler(tiny_model)

    class LowTimestepDraws(StepDraws):
        """The step's draws, with timesteps that include low ones: min-SNR-5 only
        reweights timesteps whose SNR exceeds 5, and a seed's draws may hold none."""

        def randint(self, high, n):
            super().randint(high, n)  # keep the generator's sequence as in training
            return torch.tensor([5, 40, 500, 900])[self.rows]

    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, torch.tensor([5, 40, 500, 900]))
    assert (snr > 5).any() and (snr < 5).any()  # the weighting is not a no-op here

    def loss(objective):
        torch.manual_seed(0)
        draws = LowTimestepDraws(0, 0, slice(0, 4), "cpu")
        with torch.no_grad():
            return training_loss(unet, te, sched, batch, draws, 0.18215, 4, "cpu", objective)

    base = loss(Objective())
    assert loss(Objective()) == base  # deterministic per (seed, micro-step)
    for option in (
        Objective(snr_gamma=5.0),
        Objective(noise_offset=0.1),
        Objective(input_perturbation=0.1),
        Objective(dream_training=True),
    ):
        value = loss(option)
        assert torch.isfinite(value) and value != base, option


def test_ema_epochs_validation_and_tensorboard(latents, tiny_model, tmp_path):
    cfg = TRAIN.model_copy(
        update={
            "max_train_steps": None,
            "num_train_epochs": 2,
            "use_ema": True,
            "validation_prompts": ["a red circle"],
            "validation_epochs": 1,
            "checkpointing_steps": 8,
        }
    )
    report = train_unet.run(
        cfg, latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"
    )
    assert report.steps == 8  # 2 epochs of 38 // 8 = 4 steps
    validation = sorted((tmp_path / "train" / "validation").glob("step-*/00.png"))
    assert [p.parent.name for p in validation] == ["step-000004", "step-000008"]
    assert list((tmp_path / "train" / "logs").rglob("events.out.tfevents.*"))
    # The saved UNet holds the EMA weights: an average that lags the raw weights.
    ema, base = load_file(tmp_path / "model" / UNET), load_file(tiny_model / UNET)
    raw = load_file(tmp_path / "ckpt" / "checkpoint-8" / UNET)

    def dist(x, y):
        return sum((x[k] - y[k]).pow(2).sum().item() for k in x) ** 0.5

    assert 0 < dist(ema, base) < dist(raw, base) and dist(ema, raw) > 0


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
def straight_run(latents, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    train_unet.run(RESUME, latents, tiny_model, root / "model", root / "train", root / "ckpt")
    return root


@pytest.mark.parametrize("kill_at", [6, 10])  # mid-epoch 0; mid-epoch 1
def test_sigkill_then_resume_is_bit_exact(straight_run, latents, tiny_model, tmp_path, kill_at):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    paths = [latents, tiny_model, tmp_path / "model", tmp_path / "train", tmp_path / "ckpt"]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_CHECKPOINT, str(kill_at), RESUME.model_dump_json()]
        + [str(p) for p in paths],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (tmp_path / "model").exists()
    state = json.loads((tmp_path / "ckpt" / f"checkpoint-{kill_at}" / "state.json").read_text())
    assert state["data_position"] == {"epoch": kill_at // 9, "batch": kill_at % 9}
    report = train_unet.run(RESUME, *paths)
    assert report.resumed_from_step == kill_at and report.steps == 12
    for name in ("model/" + UNET, "ckpt/checkpoint-12/" + UNET):  # EMA and raw weights
        a, b = load_file(tmp_path / name), load_file(straight_run / name)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    a, b = (
        torch.load(root / "ckpt/checkpoint-12/training_state.pt", weights_only=True)
        for root in (tmp_path, straight_run)
    )
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for k, s in b["optimizer"]["state"].items():
        assert all(torch.equal(s[n], a["optimizer"]["state"][k][n]) for n in s)
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 12
    assert all(
        torch.equal(x, y)
        for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True)
    )
    loss_a = (tmp_path / "train" / "loss.csv").read_text()
    assert loss_a == (straight_run / "train" / "loss.csv").read_text()


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


def test_too_few_shards_for_the_processes_is_one_line_before_launch(
    latents, tiny_model, tmp_path, capsys
):
    from components.common.records import read_latent_manifest

    shards = [s for s in read_latent_manifest(latents).shards if s.split == "train"]
    err = _launch_error(latents, tiny_model, tmp_path, capsys, len(shards) + 1)
    assert f"{len(shards)} train shards" in err and "every stream needs its own" in err
    assert f"at most {len(shards)} processes" in err and "pack.shard_max_samples" in err
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
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["checkpoint-2"]
    assert checkpoints.committed(tmp_path / "c")[0].name == "checkpoint-2"
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
