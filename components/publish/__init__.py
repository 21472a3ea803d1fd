"""publish: the fine-tuned model into a local versioned registry, only past the gate.

`<registry>/<name>/<version>/` is created atomically (temporary folder + rename) and
holds the model and `receipt.json`. Publishing the same UNet again reuses its version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from components.common.config import PublishConfig
from components.common.errors import T2IError
from components.common.io import write_json_atomic
from components.common.models import check_model_dir, weights_sha256


def run(cfg: PublishConfig, model: Path, eval_dir: Path, out: Path) -> dict:
    """Publish `model` if the evaluation in `eval_dir` passed; write `out`/receipt.json.

    Returns the receipt. A failed gate is not an error: the receipt says
    `published: false` and why. Raises T2IError for missing model or metrics.
    """
    metrics_path = Path(eval_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise T2IError(f"{metrics_path}: missing; run `t2i evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    unet_sha = weights_sha256(check_model_dir(Path(model)), "unet")
    receipt = {
        "name": cfg.name,
        "target": cfg.target,
        "unet_sha256": unet_sha,
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
    }
    if not metrics.get("gate_passed"):
        receipt.update(
            published=False,
            reason="evaluation gate failed "
            f"(val_loss_ratio {metrics.get('val_loss_ratio')} > "
            f"{metrics.get('max_val_loss_ratio')})",
        )
    else:
        receipt.update(published=True, **publish_local(Path(model), cfg, unet_sha, receipt))
    write_json_atomic(Path(out) / "receipt.json", receipt)
    return receipt


def publish_local(model: Path, cfg: PublishConfig, unet_sha: str, receipt: dict) -> dict:
    """Copy `model` to the next version folder (or find the version holding it already)."""
    root = Path(cfg.registry) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    versions = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    for v in reversed(versions):
        receipt_path = root / str(v) / "receipt.json"
        if not receipt_path.is_file():  # not published by us (copied by hand?): never reuse
            continue
        old = json.loads(receipt_path.read_text())
        if old.get("unet_sha256") == unet_sha:
            return {"version": v, "path": str(root / str(v)), "new": False}
    version = (versions[-1] + 1) if versions else 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root))
    try:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
        info = {
            "version": version,
            "path": str(root / str(version)),
            "new": True,
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp / "receipt.json", {**receipt, **info, "published": True})
        try:
            tmp.rename(root / str(version))  # fails if a concurrent publish took the number
        except OSError:
            raise T2IError(f"{root / str(version)} appeared while publishing; retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
