"""Training checkpoints that survive crashes.

A checkpoint is written into a temporary folder, a COMMITTED marker is written last,
and the folder is renamed to `checkpoint-<step>`. Old checkpoints are pruned only
after the new one is committed, oldest commit first (so a run never prunes its own
newest checkpoint for a longer run's). A checkpoint belongs to one run fingerprint
(config, data, base model) and records the run's planned length: `latest` resumes
only a checkpoint of the same run that is not past `max_train_steps` and whose run was
not planned longer (a shorter run is extended, and says so).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from components.common.errors import ConfigError
from components.common.io import atomic_dir, write_json_atomic
from components.train_unet import lora

MARKER = "COMMITTED"
ADAPTER_STATE = "lora_adapter.safetensors"  # a LoRA run's trainable parameters, by name


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under `root`, lowest step first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _by_commit_time(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: ((p / MARKER).stat().st_mtime_ns, int(p.name.split("-")[1])))


def save(
    root: Path,
    step: int,
    fingerprint: str,
    unet,
    optimizer,
    lr_scheduler,
    scaler,
    keep: int | None,
    history: list,
    ema=None,
    data_position: dict | None = None,
    run: dict | None = None,
) -> Path:
    """Commit checkpoint-<step> under `root`, then prune to the `keep` newest.

    Holds the UNet (safetensors; a LoRA run: only the adapter's parameters), the
    optimizer, LR scheduler, grad scaler and EMA state (a tensors-only file, loaded
    with `weights_only=True`), the data position and the loss history; `run` (its id
    and planned `max_steps`) goes into state.json.
    """
    final = Path(root) / f"checkpoint-{step}"
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
        meta = {"step": step, "fingerprint": fingerprint, "history": history}
        meta["data_position"] = data_position
        meta.update(run or {})
        write_json_atomic(tmp / "state.json", meta)
        (tmp / MARKER).write_text("")
    if keep is not None:
        for old in _by_commit_time(committed(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume(
    root: Path, resume: str | None, fingerprint: str, max_steps: int
) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, or None; what to tell the user about the choice).

    `resume`: a path (refused when past `max_steps`), `latest`, or None. `latest`
    takes the newest checkpoint of this run fingerprint with step <= max_steps whose
    run was planned for at most max_steps steps: the same run, or a shorter one that
    is extended. A longer run's checkpoints are never resumed into a shorter one.
    """
    if resume is None:
        return None, None
    if resume != "latest":
        path = require_committed(resume)
        state = read_state(path)
        step = state["step"]
        if step > max_steps:
            raise ConfigError(
                f"train.resume_from_checkpoint {str(path)!r}: it is at step {step}, past "
                f"train.max_train_steps={max_steps}; raise max_train_steps or train from scratch"
            )
        return path, _extending(path, state, max_steps)
    skipped = None
    for path in reversed(committed(root)):
        state = read_state(path)
        if state["fingerprint"] != fingerprint:
            continue
        planned = state.get("max_steps", state["step"])
        if state["step"] > max_steps or planned > max_steps:
            skipped = skipped or (path, planned)
            continue
        return path, _extending(path, state, max_steps)
    if skipped:
        path, planned = skipped
        return None, (
            f"not resuming {path.name}: it belongs to a {planned}-step run of this config, "
            f"longer than train.max_train_steps={max_steps}; training {max_steps} steps "
            "from step 0"
        )
    return None, None


def _extending(path: Path, state: dict, max_steps: int) -> str | None:
    planned = state.get("max_steps")
    if planned is None or planned == max_steps:
        return None
    return (
        f"extending a {planned}-step run from {path.name} to {max_steps} steps "
        f"(the LR schedule is recomputed for {max_steps} steps)"
    )


def require_committed(path: str | Path) -> Path:
    """`path` if it is a committed checkpoint, else ConfigError naming the key."""
    if not (Path(path) / MARKER).is_file():
        raise ConfigError(
            f"train.resume_from_checkpoint {str(path)!r}: no committed checkpoint there"
        )
    return Path(path)


def load(path: Path, unet, optimizer, lr_scheduler, scaler, ema=None) -> int:
    """Restore state from a committed checkpoint; return its step. No pickle is run."""
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
    return int(json.loads((path / "state.json").read_text())["step"])


def _has_adapter(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def read_state(path: Path) -> dict:
    """state.json of a committed checkpoint: step, fingerprint, history, data position."""
    return json.loads((Path(path) / "state.json").read_text())
