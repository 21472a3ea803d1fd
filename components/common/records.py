"""The stage records: what each stage's output is, typed, versioned, read and written here.

Every stage leaves one record beside its output, and a stage reads the records of its
inputs only through this module (never another stage's internals or dicts by key):

| record             | file                                   | written by |
|--------------------|----------------------------------------|------------|
| `PackManifest`     | `<shards>/manifest.json`               | pack       |
| `LatentManifest`   | `<latents>/manifest.json`              | cache      |
| `BaseModelRecord`  | `<base-model>/base_model.json`         | base-model |
| `TrainRecord`      | `<model>/training_record.json`         | train      |
| `EvaluationRecord` | `<eval>/evaluation.json`               | evaluate   |
| `PublishReceipt`   | `<publish>/receipt.json` (+ registry)  | publish    |

Each record carries its part of the lineage forward (the latent manifest holds the
pack's, the train record the latents' and the base model's), so publish assembles the
whole chain from its two inputs alone, in DVC and in KFP alike. A record written by
another schema version is refused with a message that says which stage to re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.common.errors import T2IError
from components.common.io import check_sha, write_json_atomic

SCHEMA_VERSION = 1

PACK_MANIFEST = "manifest.json"
LATENT_MANIFEST = "manifest.json"
BASE_MODEL_RECORD = "base_model.json"
TRAIN_RECORD = "training_record.json"
EVALUATION_RECORD = "evaluation.json"
RECEIPT = "receipt.json"
LINEAGE = "lineage.json"


STORE_REF = "store.json"  # in an output that holds manifests only: where its shards are


def shard_root(folder: Path) -> Path:
    """Where the shards a manifest in `folder` names are: `folder` itself, or, for an
    output by reference (`store.json` beside the manifest), the workspace store's
    folder, or, for a store in object storage (`pipeline.store`), a local folder of
    the shards downloaded from it (each checked, once per node). T2IError when that
    store is gone."""
    ref = Path(folder) / STORE_REF
    if not ref.is_file():
        return Path(folder)
    doc = json.loads(ref.read_text())
    if "objects" in doc:
        from components.common import objects

        return objects.view(doc["objects"], listed_shards(Path(folder)))
    store = Path(doc["store"])
    if not store.is_dir():
        raise T2IError(
            f"{folder}: its shards live in {store}, which is not there (is the workspace "
            "mounted? was it garbage-collected?); re-run the stage that wrote them"
        )
    return store


def shard_files(folder: Path, names: list[str]) -> dict[str, Path]:
    """{name: file} of the shards `names` of the output `folder`: like `shard_root(folder)
    / name`, but from an object store only these shards are downloaded."""
    ref = Path(folder) / STORE_REF
    if ref.is_file() and "objects" in (doc := json.loads(ref.read_text())):
        from components.common import objects

        shas = dict(listed_shards(Path(folder)))
        missing = [n for n in names if n not in shas]
        if missing:
            raise T2IError(f"{folder}: its manifest names no shard {missing[0]}")
        root = objects.view(doc["objects"], [(n, shas[n]) for n in names])
    else:
        root = shard_root(folder)
    return {n: root / n for n in names}


def shard_file(folder: Path, name: str) -> Path:
    return shard_files(folder, [name])[name]


def listed_shards(folder: Path) -> list[tuple[str, str]]:
    """(name, sha256) of each shard the manifest in `folder` names."""
    doc = json.loads((folder / "manifest.json").read_text())
    return [(s["name"], s["sha256"]) for s in doc.get("shards", [])]


def write_store_ref(folder: Path, store: Path | str, manifest: Path) -> None:
    """Make `folder` (an output artifact) an output by reference: a copy of the store's
    `manifest` (this run's, which the store's own will move on from) and where the
    shards are: a workspace store's folder, or an object store's URI."""
    import shutil

    Path(folder).mkdir(parents=True, exist_ok=True)
    if Path(manifest).resolve() != (Path(folder) / manifest.name).resolve():
        shutil.copyfile(manifest, Path(folder) / manifest.name)
    where = {"objects": store} if isinstance(store, str) else {"store": str(Path(store).resolve())}
    write_json_atomic(Path(folder) / STORE_REF, where)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Versioned(Record):
    schema_version: Literal[1] = SCHEMA_VERSION


# -- pack ---------------------------------------------------------------------------


class PackedShard(Record):
    name: str
    split: Literal["train", "val"]
    sha256: str
    samples: int
    bytes: int


class PackLineage(Record):
    """The data's part of the lineage: where it came from and what was kept."""

    source: str
    source_fingerprint: str
    manifest_sha256: str
    shards: list[PackedShard]
    samples: dict[str, int]
    rejected_by_reason: dict[str, int]
    dataset_name: str | None = None  # a Hugging Face dataset id, when the data is one


class PackManifest(Versioned):
    """What a pack output holds: its shards (with sha256), counts and rejections."""

    format: str
    source: str = ""  # manifests written before lineage lack it: kept, not repacked
    dataset_name: str | None = None
    source_fingerprint: str
    shards: list[PackedShard]
    samples: dict[str, int]
    rejected: int
    rejected_by_reason: dict[str, int]
    pack_config: dict[str, Any]
    next_serial: int


def read_pack_manifest(shards_dir: Path) -> PackManifest:
    """The committed manifest of a pack output. T2IError when missing or unreadable."""
    return _read(PackManifest, Path(shards_dir) / PACK_MANIFEST, "t2i pack")


def pack_lineage(shards_dir: Path) -> PackLineage:
    """The pack output's lineage, with the manifest file's own sha256 (one read)."""
    path = Path(shards_dir) / PACK_MANIFEST
    data = _read_bytes(path, "t2i pack")
    m = _parse(PackManifest, data, path, "t2i pack")
    return PackLineage(
        source=m.source,
        source_fingerprint=m.source_fingerprint,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        shards=m.shards,
        samples=m.samples,
        rejected_by_reason=m.rejected_by_reason,
        dataset_name=m.dataset_name,
    )


# -- cache --------------------------------------------------------------------------


class LatentShard(Record):
    name: str
    source_name: str
    source_sha256: str
    split: Literal["train", "val"]
    samples: int
    key: str  # the cache key: input shard sha256 + weights hashes + transform settings
    sha256: str
    # cache.buckets: each sample's bucket (an index into LatentManifest.buckets), in order
    sample_buckets: list[int] | None = None


class CacheLineage(Record):
    """The cache's part of the lineage: its settings, the weights in every key, and
    each latent shard's key and sha256."""

    cache_config: dict[str, Any]
    model: dict[str, Any]
    shards: list[dict[str, str]]  # {"name", "key", "sha256"}


class LatentManifest(Versioned):
    """What a latent shard set holds.

    One latent shard per packed shard, named by its cache key. Each sample is
    `{key}.safetensors` with the VAE posterior `mean` and `logvar` (and `mean_flip`,
    `logvar_flip` with `random_flip`), `input_ids` and, with `cache.text_embeddings`,
    `encoder_hidden_states`; plus `{key}.json` (caption, original size, crop).
    """

    shards: list[LatentShard]
    samples: dict[str, int]
    cache_config: dict[str, Any]
    resolution: int
    latent_shape: list[int]  # of a square image; with buckets, each bucket's own
    vae_scaling_factor: float
    # SD3/FLUX's VAEs: latents are (z - shift) * scale
    vae_shift_factor: float | None = None
    buckets: list[tuple[int, int]] | None = None  # (width, height) in pixels
    model: dict[str, Any]  # the weights' hashes and settings in every cache key
    pack: PackLineage

    def lineage(self) -> CacheLineage:
        return CacheLineage(
            cache_config=self.cache_config,
            model=self.model,
            shards=[{"name": s.name, "key": s.key, "sha256": s.sha256} for s in self.shards],
        )


def read_latent_manifest(latents: Path) -> LatentManifest:
    return _read(LatentManifest, Path(latents) / LATENT_MANIFEST, "t2i cache")


def verify_latents(latents: Path, split: str | None = None) -> LatentManifest:
    """Check every listed latent shard's sha256 (of `split`, or all); return the manifest.
    T2IError naming the first shard that is missing or changed.

    A shard is hashed once (cache records the sha256 of each shard it writes): its
    sha256 is kept with its size, mtime and inode in the hash cache
    (`StatIndex.outside`), and a later start or resume, on any rank, trusts a shard
    whose stat is unchanged. A shard written again (a flipped byte included) has
    another mtime and is hashed, and caught, again."""
    from components.common.stat_index import StatIndex

    manifest = read_latent_manifest(latents)
    wanted = [s for s in manifest.shards if split is None or s.split == split]
    files = shard_files(latents, [s.name for s in wanted])
    hashes = StatIndex.outside(next(iter(files.values())).parent if files else latents)
    try:
        for shard in wanted:
            check_sha(files[shard.name], shard.sha256, hashes)
    finally:
        hashes.save()
    return manifest


def load_latent_split(latents: Path, split: str) -> list[dict[str, Any]]:
    """Every cached sample of `split` as tensors (floats as fp32, ids as int64), with
    its first caption, after verifying each shard's sha256."""
    from safetensors.torch import load as st_load

    from components.common.captions import pick_caption
    from components.common.shards import read_shard

    manifest = verify_latents(latents, split)
    files = shard_files(latents, [s.name for s in manifest.shards if s.split == split])
    samples = []
    for shard in manifest.shards:
        if shard.split != split:
            continue
        for record in read_shard(files[shard.name]):
            tensors = pick_caption(st_load(record["safetensors"]), 0)
            samples.append(
                {k: v.float() if v.is_floating_point() else v.long() for k, v in tensors.items()}
            )
    return samples


# -- base model ---------------------------------------------------------------------


class BaseModelRecord(Versioned):
    source: str  # "tiny", a hub id or a local folder
    hub_id: str | None = None  # set when the source is a Hugging Face Hub model
    revision: str | None = None  # the commit actually fetched, for hub models
    unet_sha256: str
    license: str | None = None  # from the base model's card, when it has one
    # `license: other` cards name the license (e.g. flux-1-dev-non-commercial-license)
    license_name: str | None = None
    license_link: str | None = None
    seed: int | None = None  # tiny only


def read_base_model_record(model: Path) -> BaseModelRecord | None:
    """The record of a base-model stage output; None for a folder made elsewhere."""
    path = Path(model) / BASE_MODEL_RECORD
    return _read(BaseModelRecord, path, "t2i base-model") if path.is_file() else None


# -- train --------------------------------------------------------------------------


class AdapterRecord(Record):
    """A LoRA adapter: what it is and the UNet it applies to. The model folder holds
    `weights` (diffusers format, for `pipeline.load_lora_weights`) and, when `merged`,
    the base pipeline with the adapter merged into its UNet."""

    kind: Literal["lora"] = "lora"
    weights: str  # file name in the model folder
    rank: int
    alpha: float
    target_modules: list[str]
    merged: bool
    base_unet_sha256: str  # weights_sha256 of the UNet it was trained on


class TrainRecord(Versioned):
    """What a trained model is: its config, how far it went, and what it came from.
    `unet_sha256` identifies the trained weights: the UNet's hash, or for an adapter
    the hash of its weights file."""

    unet_sha256: str
    config: dict[str, Any]
    config_sha256: str  # the run fingerprint: config, data and base UNet
    steps: int
    seed: int
    resumed_from_step: int
    initial_loss: float
    final_loss: float
    images_per_second: float
    # (step, loss) of the training loss curve, at most ~500 points (for reports).
    loss_curve: list[tuple[int, float]] = Field(default_factory=list)
    base_model: BaseModelRecord | None
    latents: CacheLineage
    pack: PackLineage
    environment: dict[str, Any]
    adapter: AdapterRecord | None = None  # set for a LoRA run (train.lora_rank > 0)
    family: str = "sd"  # the model family (families.py): sd, sdxl, sd3, flux


def read_train_record(model: Path) -> TrainRecord:
    return _read(TrainRecord, Path(model) / TRAIN_RECORD, "t2i train")


# -- evaluate -----------------------------------------------------------------------


class GateCheck(Record):
    name: str
    value: float
    threshold: float
    comparison: Literal["<=", ">="]
    passed: bool

    def describe(self) -> str:
        verdict = "passed" if self.passed else "failed"
        bound = f"{self.comparison} {self.threshold:g}"
        return f"{self.name} {self.value:.4g} (must be {bound}): {verdict}"


class EvalSample(Record):
    prompt: str
    seed: int
    images: dict[str, str]  # model ("base", "tuned") -> file under the evaluation folder


class Comparison(Record):
    """One metric of both models, as reports and the model card show it."""

    key: str  # metrics.json keys: base_<key>, tuned_<key>
    label: str
    base: float
    tuned: float
    better: Literal["lower", "higher"]


class EvaluationRecord(Versioned):
    """The evaluation's decision: metrics, every gate check, and the samples made."""

    unet_sha256: str  # of the model that was evaluated
    metrics: dict[str, float]
    comparisons: list[Comparison]
    checks: list[GateCheck]
    passed: bool
    samples: list[EvalSample]
    grid: str
    report: str

    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def read_evaluation_record(eval_dir: Path) -> EvaluationRecord:
    return _read(EvaluationRecord, Path(eval_dir) / EVALUATION_RECORD, "t2i evaluate")


# -- publish ------------------------------------------------------------------------


class LocalPublication(Record):
    version: int
    path: str
    new: bool


class HubPublication(Record):
    repo_id: str
    url: str
    commit: str
    tag: str | None
    version: int
    new: bool


class PublishReceipt(Versioned):
    name: str
    target: str
    unet_sha256: str
    published: bool
    reason: str | None = None
    experiment: str | None = None  # the experiment that ran it (DVC_EXP_NAME, run-local)
    passed: bool | None = None  # the evaluation gate's verdict
    checks: list[GateCheck] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    local: LocalPublication | None = None
    hub: HubPublication | None = None
    published_at: str | None = None
    lineage: dict[str, Any] | None = None  # what lineage.json holds, as published

    def summary(self) -> str:
        if not self.published:
            return f"not published: {self.reason}"
        parts = []
        if self.local is not None:
            state = "new" if self.local.new else "unchanged, already"
            parts.append(f"{self.name} version {self.local.version} ({state}) -> {self.local.path}")
        if self.hub is not None:
            h, state = self.hub, "new" if self.hub.new else "unchanged, already"
            parts.append(f"{h.url} commit {h.commit[:12]} tag {h.tag} ({state})")
        return "published " + "; ".join(parts)


def read_receipt(path: Path) -> PublishReceipt:
    return _read(PublishReceipt, Path(path), "t2i publish")


# -- shared -------------------------------------------------------------------------

R = TypeVar("R", bound=Record)


def write_record(record: Record, path: Path) -> None:
    """Write a record atomically (sorted keys, so the same record gives the same bytes)."""
    write_json_atomic(Path(path), record.model_dump(mode="json"))


def _read(kind: type[R], path: Path, stage: str) -> R:
    return _parse(kind, _read_bytes(path, stage), path, stage)


def _read_bytes(path: Path, stage: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise T2IError(f"{path}: missing; run `{stage}` first") from None
    except OSError as e:
        raise T2IError(f"{path}: unreadable ({e}); run `{stage}` again") from None


def _parse(kind: type[R], data: bytes, path: Path, stage: str) -> R:
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise T2IError(f"{path}: not JSON ({e}); run `{stage}` again") from None
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise T2IError(
            f"{path}: not a {kind.__name__} of schema {SCHEMA_VERSION} "
            f"({where}: {first['msg']}); run `{stage}` again"
        ) from None


def environment() -> dict[str, Any]:
    """Code and machine: the project's git commit (and dirty flag) when run from a
    checkout, else the package version; library versions; the device; the container
    image (`T2I_IMAGE`, `T2I_IMAGE_DIGEST`, set by the KFP pipeline)."""
    import torch

    env: dict[str, Any] = {"package_version": _package_version(), **_git_state()}
    for lib in ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate"):
        env[f"{lib}_version"] = _dist_version(lib)
    env["python_version"] = platform.python_version()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    image = os.environ.get("T2I_IMAGE")
    if image:
        env["image"] = image
        digest = os.environ.get("T2I_IMAGE_DIGEST") or (
            image.split("@", 1)[1] if "@" in image else None
        )
        env["image_digest"] = digest
    return env


def dvc_state() -> dict[str, Any] | None:
    """Under `dvc repro` / `dvc exp run` (DVC sets DVC_ROOT): `dvc.lock`'s sha256, each
    locked stage's outputs' md5, the data the pack stage read (its non-code deps, with
    md5: for a `dvc add`ed folder, the md5 its .dvc file names) and the .dvc files of
    that data (md5, and for `dvc import` the source repo and revision). None outside DVC.
    """
    root = os.environ.get("DVC_ROOT")
    if not root:
        return None
    lock = Path(root) / "dvc.lock"
    state: dict[str, Any] = {"stage": os.environ.get("DVC_STAGE"), "lock_sha256": None}
    if os.environ.get("DVC_EXP_NAME"):
        state["experiment"] = os.environ["DVC_EXP_NAME"]
    if not lock.is_file():
        return state
    import yaml

    data = lock.read_bytes()
    state["lock_sha256"] = hashlib.sha256(data).hexdigest()
    stages = (yaml.safe_load(data) or {}).get("stages", {})
    state["stages"] = {
        name: {o["path"]: o.get("md5") for o in stage.get("outs", [])}
        for name, stage in stages.items()
    }
    deps = stages.get("pack", {}).get("deps", [])
    state["data"] = {
        d["path"]: d.get("md5") for d in deps if not d["path"].startswith("components")
    }
    state["tracked_data"] = _dvc_files(Path(root), state["data"])
    return state


def _dvc_files(root: Path, paths: dict[str, Any]) -> dict[str, Any]:
    """{.dvc file: {md5, repo?}} for the data paths that a .dvc file tracks."""
    import yaml

    found: dict[str, Any] = {}
    for path in paths:
        dvc_file = root / f"{path.rstrip('/')}.dvc"
        if not dvc_file.is_file():
            continue
        doc = yaml.safe_load(dvc_file.read_text()) or {}
        outs = doc.get("outs") or [{}]
        entry: dict[str, Any] = {"md5": outs[0].get("md5"), "path": outs[0].get("path")}
        repo = (doc.get("deps") or [{}])[0].get("repo")
        if repo:  # `dvc import`: where the data came from
            entry["repo"] = {"url": repo.get("url"), "rev_lock": repo.get("rev_lock")}
        found[dvc_file.relative_to(root).as_posix()] = entry
    return found


_ROOT = Path(__file__).resolve().parents[2]


def _git_state() -> dict[str, Any]:
    if not (_ROOT / ".git").exists():
        return {}
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(_ROOT), *args], capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


def _package_version() -> str | None:
    return _dist_version("t2i-pipeline")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
