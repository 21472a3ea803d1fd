"""Training checkpoints that survive crashes.

A checkpoint is written into a temporary folder, a COMMITTED marker is written last,
and the folder is renamed to `checkpoint-<step>`. Old checkpoints are pruned only
after the new one is committed. A checkpoint belongs to one run fingerprint (config,
data, base model); `latest` only resumes a checkpoint of the same run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from components.common.errors import ConfigError
from components.common.io import atomic_dir, write_json_atomic

MARKER = "COMMITTED"


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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
) -> Path:
    """Commit checkpoint-<step> under `root`, then prune to the `keep` newest.

    Holds the UNet (safetensors), the optimizer, LR scheduler, grad scaler and EMA
    state (a tensors-only file, loaded with `weights_only=True`), the data position
    and the loss history.
    """
    final = Path(root) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if ema is not None:
            state["ema"] = ema.state_dict()
        torch.save(state, tmp / "training_state.pt")
        meta = {"step": step, "fingerprint": fingerprint, "history": history}
        meta["data_position"] = data_position
        write_json_atomic(tmp / "state.json", meta)
        (tmp / MARKER).write_text("")
    if keep is not None:
        for old in committed(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume(root: Path, resume: str | None, fingerprint: str) -> Path | None:
    """The checkpoint to resume from: a path, `latest` (same run only), or None."""
    if resume is None:
        return None
    if resume != "latest":
        return require_committed(resume)
    for path in reversed(committed(root)):
        if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
            return path
    return None


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


def read_state(path: Path) -> dict:
    """state.json of a committed checkpoint: step, fingerprint, history, data position."""
    return json.loads((Path(path) / "state.json").read_text())
