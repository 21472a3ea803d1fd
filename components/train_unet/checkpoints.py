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
) -> Path:
    """Commit checkpoint-<step> under `root`, then prune to the `keep` newest."""
    final = Path(root) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        torch.save(state, tmp / "training_state.pt")
        write_json_atomic(
            tmp / "state.json", {"step": step, "fingerprint": fingerprint, "history": history}
        )
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
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError(
                f"train.resume_from_checkpoint {resume!r}: no committed checkpoint there"
            )
        return path
    for path in reversed(committed(root)):
        if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
            return path
    return None


def load(path: Path, unet, optimizer, lr_scheduler, scaler) -> int:
    """Restore state from a committed checkpoint; return its step. No pickle is run."""
    from safetensors.torch import load_file

    weights = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
    unet.load_state_dict(weights)
    state = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(json.loads((path / "state.json").read_text())["step"])
