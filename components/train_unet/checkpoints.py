"""Training checkpoints that survive crashes, kept apart run by run.

A run's checkpoints live in a folder of their own under the checkpoint root,
`<root>/<run fingerprint>-<planned steps>/checkpoint-<step>`: the fingerprint covers
the config, the data and the base model, and two runs of one config but different
lengths differ too (their LR schedules do). A run prunes only its own folder, so it
never deletes or overwrites another run's checkpoint.

A checkpoint is written into a temporary folder, a COMMITTED marker is written last,
and the folder is renamed to `checkpoint-<step>`. Old checkpoints are pruned only
after the new one is committed. `latest` resumes the newest checkpoint of the run
itself or, failing that, of a shorter run of the same fingerprint (which is then
extended, and says so); checkpoints it passes over are named, with the reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from components.common.errors import ConfigError, T2IError
from components.common.io import atomic_dir, write_json_atomic
from components.train_unet import lora

MARKER = "COMMITTED"
ADAPTER_STATE = "lora_adapter.safetensors"  # a LoRA run's trainable parameters, by name


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint belongs to: the run fingerprint, the inputs it hashes (kept in
    each checkpoint so a skipped one can be explained) and the planned length."""

    fingerprint: str
    inputs: dict
    max_steps: int

    @property
    def folder_name(self) -> str:
        return f"{self.fingerprint[:16]}-{self.max_steps}"


def run_folder(root: Path, run: RunIdentity) -> Path:
    """Where `run` writes its checkpoints."""
    return Path(root) / run.folder_name


def committed(folder: Path) -> list[Path]:
    """Committed checkpoints directly in `folder`, lowest step first."""
    if not Path(folder).is_dir():
        return []
    found = [p for p in Path(folder).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def save(
    folder: Path,
    step: int,
    run: RunIdentity,
    unet,
    optimizer,
    lr_scheduler,
    scaler,
    *,
    keep: int | None,
    history: list,
    ema=None,
    data_position: dict | None = None,
    run_id: str = "",
    extra: dict | None = None,
) -> Path:
    """Commit checkpoint-<step> in the run's `folder`, then prune it to the `keep` newest.

    Holds the UNet (safetensors; a LoRA run: only the adapter's parameters), the
    optimizer, LR scheduler, grad scaler and EMA state (a tensors-only file, loaded
    with `weights_only=True`), the data position, the loss history and the run's
    identity (fingerprint, its inputs, planned length, tracker run id) and `extra` (the
    loop's own counters) in state.json.
    """
    final = Path(folder) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        if _has_adapter(unet):  # only the adapter trains: the frozen UNet is the base's
            from safetensors.torch import save_file

            save_file(lora.trainable_state(unet), tmp / ADAPTER_STATE)
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if ema is not None:
            state["ema"] = ema.state_dict()
        torch.save(state, tmp / "training_state.pt")
        meta = {
            "step": step,
            "fingerprint": run.fingerprint,
            "inputs": run.inputs,
            "max_steps": run.max_steps,
            "run_id": run_id,
            "history": history,
            "data_position": data_position,
            **(extra or {}),
        }
        write_json_atomic(tmp / "state.json", meta)
        (tmp / MARKER).write_text("")
    if keep is not None:
        for old in committed(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from (None: step 0), and what to tell the user."""

    path: Path | None
    note: str | None = None


def find_resume(
    root: Path, resume: str | None, run: RunIdentity, allow_other_run: bool = False
) -> Resume:
    """The checkpoint to resume from, for `train.resume_from_checkpoint` = `resume`.

    - None: none.
    - a path: that checkpoint; ConfigError when it is past `run.max_steps`, or belongs
      to another config or data and `allow_other_run` (`train.resume_other_run`) is off.
    - `latest`: the newest checkpoint of this run, else of a shorter run of the same
      fingerprint (extended). A longer run's checkpoints are never resumed into a
      shorter one, and another config's never: either is named in the note.
    """
    if resume is None:
        return Resume(None)
    if resume != "latest":
        return _explicit(require_committed(resume), run, allow_other_run)
    own = [p for p in committed(run_folder(root, run)) if _step_of(p) <= run.max_steps]
    if own:
        return Resume(own[-1])
    same, longer, other = _siblings(root, run)
    if same:
        path = max(same, key=_step_of)
        return Resume(path, _extending(path, read_state(path), run.max_steps))
    if longer:
        path, planned = max(longer, key=lambda item: _step_of(item[0]))
        return Resume(
            None,
            f"not resuming {path}: it belongs to a {planned}-step run of this config, "
            f"longer than train.max_train_steps={run.max_steps}; training {run.max_steps} "
            "steps from step 0 (that run's checkpoints are kept)",
        )
    if other:
        path = max(other, key=lambda p: (p / MARKER).stat().st_mtime_ns)
        why = describe_difference(read_state(path), run)
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        return Resume(
            None,
            f"not resuming {path}{more}: another run's ({why}); training from step 0 "
            "(its checkpoints are kept)",
        )
    return Resume(None)


def _siblings(root: Path, run: RunIdentity):
    """Committed checkpoints under `root` outside the run's folder: (of a shorter run of
    this fingerprint, of a longer one (with its planned length), of other runs)."""
    same, longer, other = [], [], []
    folders = [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []
    for folder in [Path(root), *folders]:
        if folder == run_folder(root, run):
            continue
        for path in committed(folder):
            state = read_state(path)
            planned = state.get("max_steps", state["step"])
            if state.get("fingerprint") != run.fingerprint:
                other.append(path)
            elif planned <= run.max_steps and state["step"] <= run.max_steps:
                same.append(path)
            else:
                longer.append((path, planned))
    return same, longer, other


def _explicit(path: Path, run: RunIdentity, allow_other_run: bool) -> Resume:
    state = read_state(path)
    step = state["step"]
    if step > run.max_steps:
        raise ConfigError(
            f"train.resume_from_checkpoint {str(path)!r}: it is at step {step}, past "
            f"train.max_train_steps={run.max_steps}; raise max_train_steps or train from scratch"
        )
    if state.get("fingerprint") != run.fingerprint:
        why = describe_difference(state, run)
        if not allow_other_run:
            raise ConfigError(
                f"train.resume_from_checkpoint {str(path)!r}: another run's checkpoint "
                f"({why}); set train.resume_other_run: true to continue from its weights "
                "and optimizer state anyway"
            )
        return Resume(path, f"resuming another run's checkpoint {path} ({why}), as asked")
    return Resume(path, _extending(path, state, run.max_steps))


def describe_difference(state: dict, run: RunIdentity, limit: int = 3) -> str:
    """What differs between a checkpoint's run and `run`, in a user's words."""
    theirs = state.get("inputs")
    if not isinstance(theirs, dict):
        return "another config or data; it predates checkpoints that record theirs"
    ours, parts = run.inputs, []
    mine_cfg, their_cfg = ours.get("config", {}), theirs.get("config", {})
    for key in sorted(set(mine_cfg) | set(their_cfg)):
        if mine_cfg.get(key) != their_cfg.get(key):
            parts.append(f"train.{key} {their_cfg.get(key)!r} -> {mine_cfg.get(key)!r}")
    labels = {
        "latents": "other latents",
        "base_unet": "another base UNet",
        "processes": "another process count",
        "streams": "other data streams",
        "data_layout": "another data layout",
    }
    parts += [label for key, label in labels.items() if ours.get(key) != theirs.get(key)]
    if not parts:
        return "another fingerprint"
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _extending(path: Path, state: dict, max_steps: int) -> str | None:
    planned = state.get("max_steps")
    if planned is None or planned == max_steps:
        return None
    return (
        f"extending a {planned}-step run from {path} to {max_steps} steps "
        f"(the LR schedule is recomputed for {max_steps} steps)"
    )


def require_committed(path: str | Path) -> Path:
    """`path` if it is a committed checkpoint, else ConfigError naming the key."""
    if not (Path(path) / MARKER).is_file():
        raise ConfigError(
            f"train.resume_from_checkpoint {str(path)!r}: no committed checkpoint there"
        )
    return Path(path)


def load(path: Path, unet, optimizer, lr_scheduler, scaler, ema=None, ema_device=None) -> int:
    """Restore state from a committed checkpoint; return its step. No pickle is run.

    The EMA's shadow parameters are read to the CPU and then moved to `ema_device`
    (where the run keeps them: the training device, or the CPU when offloaded), so
    the next EMA step never mixes devices."""
    from safetensors.torch import load_file

    if _has_adapter(unet):
        if not (path / ADAPTER_STATE).is_file():
            raise ConfigError(f"{path}: a full fine-tune's checkpoint; this run trains LoRA")
        lora.load_trainable_state(unet, load_file(path / ADAPTER_STATE), path)
    else:
        if not (path / "unet").is_dir():
            raise ConfigError(f"{path}: a LoRA run's checkpoint; this run trains the whole UNet")
        weights = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
        unet.load_state_dict(weights)
    state = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if "ema" not in state:
            raise ConfigError(f"{path}: has no EMA state; it was saved with use_ema: false")
        ema.load_state_dict(state["ema"])
        if ema_device is not None:
            ema.to(ema_device)
    return int(read_state(path)["step"])


def check_data_position(path: Path, saved: dict | None, expected: dict, forced: bool) -> str | None:
    """T2IError when a checkpoint's saved data position is not where this run's stream
    puts its step (the data or its layout changed under the run); with `forced` (a
    resumed other run) a note instead. None when they agree or none was saved."""
    if saved is None or saved == expected:
        return None
    where = (
        f"{path} was saved at epoch {saved.get('epoch')}, batch {saved.get('batch')}, but this "
        f"run's data puts its step at epoch {expected['epoch']}, batch {expected['batch']}"
    )
    if forced:
        return f"{where}: continuing from this run's position"
    raise T2IError(f"{where}; the latents or the data streams changed: train from scratch")


def _has_adapter(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def read_state(path: Path) -> dict:
    """state.json of a committed checkpoint: step, fingerprint, history, data position."""
    return json.loads((Path(path) / "state.json").read_text())
