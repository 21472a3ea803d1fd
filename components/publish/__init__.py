"""publish: the evaluated model, with its card and lineage, to a registry and/or the Hub.

Only a model whose evaluation passed the gate is published. A version holds the
diffusers folder, `README.md` (the model card), `lineage.json` (data, cache, base
model, training, evaluation, code) and the evaluation images under `eval/`.

- `target: local`: `<registry>/<name>/<version>/` (`registry.py`);
- `target: hub`: one commit and a tag in `hub_model_id` (`hub.py`);
- `target: both`: the registry first, then the Hub.

Publishing the same UNet again makes no new version anywhere. An experiment
(`dvc exp run`, which sets DVC_EXP_NAME; `t2i pipeline run-local`, T2I_EXPERIMENT)
publishes nothing unless `publish.from_experiments`. `out/receipt.json` says what was
published where (or why not), with the lineage.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.common.config import PublishConfig
from components.common.errors import ConfigError, T2IError
from components.common.io import json_bytes, sha256_file
from components.common.models import (
    ADAPTER_WEIGHTS,
    check_model_dir,
    denoiser_part,
    is_adapter,
    trained_weights_sha256,
)
from components.common.records import (
    EVALUATION_RECORD,
    LINEAGE,
    RECEIPT,
    TRAIN_RECORD,
    EvaluationRecord,
    PublishReceipt,
    read_evaluation_record,
    read_train_record,
    write_record,
)
from components.publish.card import render_card
from components.publish.hub import hub_token, publish_hub
from components.publish.lineage import build_lineage
from components.publish.registry import is_uri, publish_local, publish_remote

# What a complete diffusers SD folder from `t2i train` holds (globs, each must match).
_REQUIRED = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model*.safetensors",
    "text_encoder/config.json",
    "text_encoder/model*.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    TRAIN_RECORD,
]
# Files of the model folder that the version replaces with its own.
_NOT_COPIED = {"README.md", LINEAGE, RECEIPT}


class GateFailed(T2IError):
    """The evaluation gate failed: the receipt says which check; nothing was published."""


def run(
    cfg: PublishConfig,
    model: Path,
    eval_dir: Path,
    out: Path,
    run_key: dict[str, Any] | None = None,
) -> PublishReceipt:
    """Publish `model` (evaluated in `eval_dir`) to `cfg.target`; write `out`/receipt.json.
    `run_key` (a pipeline run's data fingerprint and config hash) goes into the lineage.

    Raises ConfigError when the target cannot work here (no token, offline, no
    license), T2IError for an incomplete model folder, an evaluation of another model
    or a Hub failure, and GateFailed (after writing the receipt) when the gate failed.
    A receipt from an earlier run is removed first, so only a finished run leaves one.
    """
    model, eval_dir, out = Path(model), Path(eval_dir), Path(out)
    (out / RECEIPT).unlink(missing_ok=True)
    check_complete(model)
    train, evaluation = read_train_record(model), read_evaluation_record(eval_dir)
    unet_sha = trained_weights_sha256(model)
    if evaluation.unet_sha256 != unet_sha:
        raise T2IError(
            f"{eval_dir / EVALUATION_RECORD}: evaluates another model than {model}; "
            "re-run `t2i evaluate` on it"
        )
    lineage = build_lineage(cfg.name, train, evaluation, run_key)
    receipt = PublishReceipt(
        name=cfg.name,
        target=cfg.target,
        unet_sha256=unet_sha,
        published=False,
        experiment=experiment_name(),
        passed=evaluation.passed,
        checks=evaluation.checks,
        metrics=evaluation.metrics,
        lineage=lineage,
    )
    if receipt.experiment and not cfg.from_experiments:
        verdict = "passed" if evaluation.passed else "failed"
        receipt.reason = (
            f"experiment {receipt.experiment!r} (gate {verdict}): experiments publish only "
            f"with publish.from_experiments: true; {_how_to_publish()}"
        )
        write_record(receipt, out / RECEIPT)
        return receipt
    if not evaluation.passed:
        why = "; ".join(c.describe() for c in evaluation.failed_checks())
        receipt.reason = f"evaluation gate failed: {why}"
        write_record(receipt, out / RECEIPT)
        raise GateFailed(f"not published: {receipt.reason} (receipt: {out / RECEIPT})")
    hub = cfg.target in ("hub", "both")
    token = hub_token() if hub else None  # before any work: no half-published targets
    base_license = train.base_model.license if train.base_model else None
    license_ = cfg.license or base_license
    if cfg.license and base_license and cfg.license != base_license and not cfg.license_override:
        name = train.base_model.license_name
        raise ConfigError(
            f"publish.license {cfg.license!r} contradicts the base model's card "
            f"({base_license}{f': {name}' if name else ''}), whose terms bind the fine-tune; "
            "remove publish.license to inherit it, or set publish.license_override: true "
            "if you hold the rights to license it otherwise"
        )
    if hub and not license_:
        raise ConfigError(
            "publish.license is required for the Hub and the base model's card names none; "
            "set it (e.g. creativeml-openrail-m for SD 1.x fine-tunes, or your own)"
        )
    files = version_files(model, eval_dir, evaluation)
    skipped: list[str] = []  # said once published (a failure stays one line)
    with tempfile.TemporaryDirectory(prefix="t2i-exports-") as tmp:
        exported = exports(cfg, model, train, Path(tmp), skipped)
        files.update({name: path for name, (path, _) in exported.items()})
        lineage["exports"] = {name: entry for name, (_, entry) in exported.items()}
        receipt.lineage = lineage
        docs = _Documents(cfg, license_, train, evaluation, lineage)
        if cfg.target in ("local", "both"):
            receipt.local = _publish_to_registry(cfg, files, docs, receipt)
        if hub:
            receipt.hub = publish_hub(cfg, files, unet_sha, docs.for_hub, token)
    receipt.published, receipt.published_at = True, _now()
    write_record(receipt, out / RECEIPT)
    for line in skipped:
        print(f"publish: {line}", file=sys.stderr, flush=True)
    return receipt


def exports(
    cfg: PublishConfig, model: Path, train, folder: Path, skipped: list[str] | None = None
) -> dict[str, tuple[Path, dict]]:
    """{file name in the version: (the file written in `folder`, its lineage entry)}:
    the single-file checkpoint of a full pipeline and the kohya file of a LoRA, with
    `publish.single_file`. A model the layout cannot express gets none, and the reason
    (one line) in `skipped`."""
    from components.publish import single_file

    if not cfg.single_file:
        return {}
    found: dict[str, tuple[Path, dict]] = {}
    from components.common.families import BY_NAME

    family = BY_NAME[getattr(train, "family", "sd")]
    if family.denoiser != "unet":
        return _transformer_exports(cfg, model, train, folder, family, skipped)
    if train.adapter is not None:
        name = f"{cfg.name}.kohya.safetensors"
        path = single_file.export_kohya_lora(
            model / ADAPTER_WEIGHTS, folder / name, train.adapter.alpha
        )
        found[name] = (path, _entry(path, "kohya LoRA (lora_unet_*, lora_down/lora_up, alpha)"))
    if (model / "unet" / "config.json").is_file():  # a full pipeline (or a LoRA merged)
        name = f"{cfg.name}.safetensors"
        try:
            path = single_file.export_checkpoint(model, folder / name, half=cfg.single_file_half)
        except single_file.Unsupported as e:
            if skipped is not None:
                skipped.append(str(e))
        else:
            from components.common.families import family_of

            dtype = "fp16" if cfg.single_file_half else "as trained"
            layout = "SGM" if family_of(model).micro_conditioning else "LDM"
            found[name] = (path, _entry(path, f"single-file checkpoint ({layout} layout, {dtype})"))
    return found


def _transformer_exports(cfg, model, train, folder, family, skipped):
    """SD3's and FLUX's: the LoRA with kohya keys on the original modules, and the
    transformer (SD3: with the VAE) in the original layout, where the loaders can read
    its sizes."""
    from components.publish import transformer_file

    found: dict[str, tuple[Path, dict]] = {}
    if train.adapter is not None:
        name = f"{cfg.name}.kohya.safetensors"
        path = transformer_file.export_kohya_lora(
            model / ADAPTER_WEIGHTS, folder / name, family.name, train.adapter.alpha
        )
        kind = f"kohya LoRA ({family.label} original modules: lora_unet_*, fused qkv, alpha)"
        found[name] = (path, _entry(path, kind))
    if (model / "transformer" / "config.json").is_file():
        name = f"{cfg.name}.safetensors"
        try:
            path = transformer_file.export_checkpoint(
                model, folder / name, family.name, half=cfg.single_file_half
            )
        except transformer_file.Unsupported as e:
            if skipped is not None:
                skipped.append(str(e))
        else:
            dtype = "fp16" if cfg.single_file_half else "as trained"
            what = "MMDiT + VAE" if family.name == "sd3" else "transformer only"
            kind = f"single-file checkpoint ({family.label} original layout, {what}, {dtype})"
            found[name] = (path, _entry(path, kind))
    return found


def _entry(path: Path, kind: str) -> dict:
    return {"format": kind, "sha256": sha256_file(path), "bytes": path.stat().st_size}


class _Documents:
    """The card and `lineage.json` of a version: both name the version and the target."""

    def __init__(self, cfg, license_, train, evaluation, lineage):
        self.cfg, self.license = cfg, license_
        self.train, self.evaluation, self.lineage = train, evaluation, lineage

    def for_hub(self, version: int) -> dict[str, bytes]:
        return self._make(version, "hub", self.cfg.hub_model_id)

    def for_registry(self, version: int) -> dict[str, bytes]:
        return self._make(version, "local", None)

    def _make(self, version: int, target: str, repo_id: str | None) -> dict[str, bytes]:
        cfg = self.cfg
        tag = cfg.tag_format.format(version=version)
        doc = {**self.lineage, "published_as": {"target": target, "version": version, "tag": tag}}
        card = render_card(
            repo_id=repo_id,
            name=cfg.name,
            local_path=str(Path(cfg.registry) / cfg.name / str(version)),
            license_=self.license,
            version=version,
            train=self.train,
            evaluation=self.evaluation,
            lineage=doc,
        )
        return {"README.md": card.encode(), LINEAGE: json_bytes(doc)}


def _how_to_publish() -> str:
    """What publishes an experiment's model, in the context that ran it."""
    if os.environ.get("DVC_EXP_NAME"):
        return "to publish this one, `dvc exp apply` it, commit, and run `dvc repro -f -s publish`"
    return (
        "to publish it, run the local pipeline again with --set publish.from_experiments=true "
        "(every stage before publish then comes from the cache), or submit the pipeline to "
        "the cluster (`t2i pipeline submit`)"
    )


def experiment_name() -> str | None:
    """The experiment this process runs in: DVC's `dvc exp run` sets DVC_EXP_NAME; a
    local KFP run (`t2i pipeline run-local`) sets T2I_EXPERIMENT."""
    return os.environ.get("DVC_EXP_NAME") or os.environ.get("T2I_EXPERIMENT") or None


def _publish_to_registry(cfg, files: dict[str, Path], docs: _Documents, receipt: PublishReceipt):
    def fill(folder: Path, version: int) -> None:
        for rel, src in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, folder / rel)
        for rel, data in docs.for_registry(version).items():
            (folder / rel).write_bytes(data)
        done = receipt.model_copy(update={"published": True, "published_at": _now()})
        write_record(done, folder / RECEIPT)

    if is_uri(cfg.registry):
        root = f"{cfg.registry.rstrip('/')}/{cfg.name}"
        return publish_remote(root, receipt.unet_sha256, fill)
    return publish_local(Path(cfg.registry) / cfg.name, receipt.unet_sha256, fill)


def check_complete(model: Path) -> None:
    """T2IError naming what a model folder lacks (a crashed or partial copy): a
    pipeline, or a LoRA adapter (+ a merged pipeline when its record says so)."""
    required = _REQUIRED
    if is_adapter(model):
        required = [ADAPTER_WEIGHTS, TRAIN_RECORD]
        adapter = read_train_record(model).adapter
        if adapter is not None and adapter.merged:
            required += _REQUIRED
    else:
        check_model_dir(model)
    part = denoiser_part(model) if (Path(model) / "model_index.json").is_file() else "unet"
    required = [g.replace("unet/", f"{part}/") for g in required]  # (SD3: transformer/)
    missing = [g for g in required if not any(Path(model).glob(g))]
    if missing:
        raise T2IError(
            f"{model}: incomplete model folder (lacks {', '.join(missing)}); "
            "re-run `t2i train` to write it"
        )


def version_files(model: Path, eval_dir: Path, evaluation: EvaluationRecord) -> dict[str, Path]:
    """{path in the version: file}: the model folder, then the evaluation's images,
    report and records under `eval/`."""
    files = {
        p.relative_to(model).as_posix(): p
        for p in sorted(model.rglob("*"))
        if p.is_file() and p.relative_to(model).as_posix() not in _NOT_COPIED
    }
    evaluated = [evaluation.grid, evaluation.report, EVALUATION_RECORD, "metrics.json"]
    evaluated += [f for s in evaluation.samples for f in s.images.values()]
    for rel in evaluated:
        path = eval_dir / rel
        if not path.is_file():
            raise T2IError(f"{path}: missing from the evaluation; re-run `t2i evaluate`")
        files[f"eval/{rel}"] = path
    return files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
