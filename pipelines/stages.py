"""What each KFP component does, in one place: run a stage from its JSON params and
artifact paths.

Every component in `ops.py` is a signature and one line, `run_stage(<stage>, locals())`.
Here, for every stage alike:
- `<section>_params` (JSON strings) are validated by the params.yaml schema;
- `workspace` (the PVC's mount path; a folder under `t2i pipeline run-local`; "" for
  none) holds what outlives a pod: the fetched source, pack's and cache's
  content-keyed stores, train's checkpoints keyed by the run, a registry given as a
  relative path, and the run notes (`runs/<run id>/<stage>.json`) the summary reads;
- `run_key` (the fingerprint task's output: source, data fingerprint, config hash) is
  an input of every later task, so KFP's cache keys follow the data;
- a user-caused failure is one line on stderr and exit 2 (config) or 1 (anything else).
The run id comes from the pod's `pipeline/runid` label (T2I_RUN_ID, set by the DAG).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common.config import (
    CacheConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PackConfig,
    PublishConfig,
    TrainConfig,
    validate_section,
)
from components.common.errors import ConfigError, T2IError, first_line
from components.common.io import sha256_json, write_json_atomic

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "pack": PackConfig,
    "cache": CacheConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "publish": PublishConfig,
}
# The config a trained model depends on: a change in any of these retrains.
TRAINED_FROM = ("data", "model", "pack", "cache", "train", "evaluate")
STAGE_ORDER = ("fingerprint", "base_model", "pack", "cache", "train", "evaluate", "publish")
RUN_ID_ENV = "T2I_RUN_ID"
NOTIFY_ENV = "T2I_NOTIFY_URL"


@dataclass(frozen=True)
class Context:
    workspace: Path | None
    run_key: dict[str, Any] | None

    def store(self, kind: str, key: Any) -> Path | None:
        """`<workspace>/<kind>/<key hash>`, or None without a workspace."""
        if self.workspace is None:
            return None
        return self.workspace / kind / sha256_json(key)[:16]

    def run_dir(self) -> Path | None:
        run_id = os.environ.get(RUN_ID_ENV, "")
        if self.workspace is None or not run_id:
            return None
        return self.workspace / "runs" / run_id

    def note(self, stage: str, status: str, summary: str, **extra: Any) -> None:
        """What this stage did, for the run summary (nowhere without a workspace)."""
        folder = self.run_dir()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            note = {"stage": stage, "status": status, "summary": summary, **extra}
            write_json_atomic(folder / f"{stage}.json", note)


def run_stage(stage: str, io: dict[str, Any]) -> Any:
    """Run `stage` with a component's inputs and outputs `io` (its `locals()`)."""
    io = {k: v for k, v in io.items() if k != "run_stage"}  # the component's own import
    workspace = io.pop("workspace", "") or ""
    run_key = io.pop("run_key", "") or ""
    ctx = Context(Path(workspace) if workspace else None, json.loads(run_key) if run_key else None)
    try:
        for name in [k for k in io if k.endswith("_params")]:
            section = name[: -len("_params")]
            raw = json.loads(io.pop(name))
            io[section] = validate_section(SECTIONS[section], raw, section)
        return _STAGES[stage](ctx, **io)
    except T2IError as e:
        ctx.note(stage, "failed", str(e))
        print(f"{stage}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None


# -- the stages ----------------------------------------------------------------------


def fingerprint(ctx: Context, source: str, retrain: str, key: str, reason: str, **sections) -> bool:
    """Whether to train: the data's fingerprint where it lives and the config hash,
    against the lineage of the newest published version. Writes the run key (JSON) and
    the reason to the output parameter files `key` and `reason`."""
    from components.publish.latest import latest_published

    data: DataConfig = sections["data"]
    config = {s: sections[s].model_dump() for s in TRAINED_FROM}
    config["data"].pop("source")  # the content is the fingerprint's; the place may move
    run_key = {
        "source": data.dataset_name or source,
        "data_fingerprint": source_fingerprint(source, data),
        "config_sha256": sha256_json(config),
    }
    latest = latest_published(_registry_here(sections["publish"], ctx))
    changed, why = decide(run_key, latest, retrain)
    for path, text in ((key, json.dumps(run_key, sort_keys=True)), (reason, why)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    ctx.note("fingerprint", "done", why, changed=changed, run_key=run_key)
    short = f"{run_key['data_fingerprint'][:12]} config {run_key['config_sha256'][:12]}"
    print(f"fingerprint: data {short}: {why}")
    return changed


def source_fingerprint(source: str, data: DataConfig) -> str:
    """The data's content fingerprint: of `source`, or of `data.dataset_name`."""
    from components.common import remote

    if data.dataset_name:
        return _dataset_fingerprint(data)
    return remote.fingerprint(source)


def decide(key: dict[str, Any], latest, retrain: str) -> tuple[bool, str]:
    """Whether to train, and why, given the newest published version (or None).
    ConfigError for a `retrain` that is neither on_change nor always."""
    if retrain not in ("on_change", "always"):
        raise ConfigError(
            f"pipeline parameter retrain: {retrain!r} is neither on_change nor always"
        )
    if latest is None:
        return True, "nothing published yet"
    since = f"v{latest.version} ({latest.where})"
    if retrain == "always":
        return True, f"pipeline.retrain: always (latest {since})"
    before = latest.run_key
    if not before:
        return True, f"{since} has no pipeline run key (published outside a pipeline run)"
    if before.get("data_fingerprint") != key["data_fingerprint"]:
        return True, f"data changed since {since}"
    if before.get("config_sha256") != key["config_sha256"]:
        return True, f"config changed since {since}"
    return False, f"data and config unchanged since {since}"


def base_model(ctx: Context, model: ModelConfig, base_model) -> None:
    from components import base_model as stage

    stage.run(model, Path(base_model.path))
    ctx.note("base_model", "done", f"base model {model.source} ready")


def pack(ctx: Context, source: str, data: DataConfig, pack: PackConfig, shards) -> None:
    """Fetch the source (only what changed, into the workspace) and pack it into the
    workspace's store for this source and config, which keeps every unchanged shard."""
    from components import pack_shards as stage
    from components.common import remote

    out = Path(shards.path)
    sources = ctx.store("sources", source)
    store = ctx.store("pack", [source, data.model_dump(), pack.model_dump()])
    with _locked(sources), _locked(store), _scratch(sources) as staging:
        local = Path(source) if data.dataset_name else remote.fetch(source, staging)
        name = data.dataset_name or source
        report = stage.run(data, pack, local, store or out, source_name=name)
        _mirror(store or out, out)
    shards.metadata.update(source=source, samples=report.kept, **_key_metadata(ctx))
    ctx.note("pack", "done", report.summary(), written=report.written, shards=report.shards)
    print(report.summary())


def cache(ctx: Context, cache: CacheConfig, shards, base_model, latents) -> None:
    from components import cache_latents as stage

    out = Path(latents.path)
    store = ctx.store("cache", [_source(ctx), cache.model_dump()])
    with _locked(store):
        report = stage.run(cache, Path(shards.path), Path(base_model.path), store or out)
        _mirror(store or out, out)
    ctx.note("cache", "done", report.summary(), encoded=report.shards_encoded)
    print(report.summary())


def cache_worker(
    ctx: Context, cache: CacheConfig, worker_index: int, num_workers: int, shards, base_model, part
) -> None:
    from components import cache_latents as stage

    # Workers write their own part (the workspace store serves the single cache task).
    report = stage.run(
        cache, Path(shards.path), Path(base_model.path), Path(part.path), worker_index, num_workers
    )
    print(report.summary())


def cache_merge(ctx: Context, num_workers: int, shards, parts, latents) -> None:
    from components import cache_latents as stage

    out = Path(latents.path)
    for part in parts:
        _mirror(Path(part.path), out)
    manifest = stage.merge(Path(shards.path), out, count=num_workers)
    line = f"merged {len(manifest.shards)} latent shards from {num_workers} workers"
    ctx.note("cache", "done", line)
    print(line)


def train(ctx: Context, train: TrainConfig, latents, base_model, model, reports, train_metrics):
    """Train; checkpoints go to the workspace, keyed by the run (data, config), so a
    retried or preempted pod resumes from the last one exactly."""
    from components import train_unet as stage

    checkpoints = ctx.store("checkpoints", [ctx.run_key, train.model_dump()])
    with _locked(checkpoints):
        report = stage.run(
            train,
            Path(latents.path),
            Path(base_model.path),
            Path(model.path),
            Path(reports.path),
            checkpoints or Path(reports.path) / "checkpoints",
        )
    for key, value in dataclasses.asdict(report).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train_metrics.log_metric(key, float(value))
    ctx.note("train", "done", report.summary(), resumed_from_step=report.resumed_from_step)
    print(report.summary())


def evaluate(
    ctx: Context,
    evaluate: EvaluateConfig,
    model,
    base_model,
    latents,
    shards,
    evaluation,
    eval_metrics,
    report,
) -> bool:
    from components import evaluate as stage
    from components.common.records import read_evaluation_record

    out = Path(evaluation.path)
    result = stage.run(
        evaluate, Path(model.path), Path(base_model.path), Path(latents.path), out, None,
        Path(shards.path),
    )  # fmt: skip
    for key, value in read_evaluation_record(out).metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            eval_metrics.log_metric(key, float(value))
    # The self-contained report, shown by the KFP UI's HTML visualisation.
    shutil.copyfile(out / "report.html", report.path)
    ctx.note("evaluate", "done", result.summary(), gate_passed=result.gate_passed)
    print(result.summary())
    return result.gate_passed


def publish(ctx: Context, publish: PublishConfig, model, evaluation, receipt) -> None:
    from components import publish as stage

    result = stage.run(
        _registry_here(publish, ctx),
        Path(model.path),
        Path(evaluation.path),
        Path(receipt.path),
        run_key=ctx.run_key,
    )
    version = result.local.version if result.local else (result.hub.version if result.hub else None)
    ctx.note("publish", "done", result.summary(), published=result.published, version=version)
    print(result.summary())


def summary(ctx: Context, status, summary) -> None:
    """The exit handler: what ran, what was skipped and why, what was published; to the
    `summary` artifact, the run's workspace folder, the log and the webhook."""
    run_dir = ctx.run_dir()
    doc = run_summary(run_dir, status.state, status.error_message)
    Path(summary.path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(summary.path), doc)
    if run_dir is not None:
        write_json_atomic(run_dir / "summary.json", doc)
    print(doc["text"])
    url = os.environ.get(NOTIFY_ENV, "")
    if url:
        notify(url, doc)


def run_summary(run_dir: Path | None, state: str, error: str | None = None) -> dict[str, Any]:
    """The run summary from the stages' notes in `run_dir`."""
    notes = {}
    if run_dir is not None and run_dir.is_dir():
        for path in run_dir.glob("*.json"):
            note = json.loads(path.read_text())
            if isinstance(note, dict) and note.get("stage") in STAGE_ORDER:
                notes[note["stage"]] = note
    stages, skipped_why = {}, None
    decided = notes.get("fingerprint")
    if decided and not decided.get("changed"):
        skipped_why = decided["summary"]
    gate = notes.get("evaluate", {}).get("gate_passed")
    for stage in STAGE_ORDER:
        if stage in notes:
            stages[stage] = {k: v for k, v in notes[stage].items() if k != "stage"}
        elif skipped_why and stage != "fingerprint":
            stages[stage] = {"status": "skipped", "summary": skipped_why}
        elif stage == "publish" and gate is False:
            stages[stage] = {"status": "skipped", "summary": "the evaluation gate failed"}
        elif run_dir is None:
            stages[stage] = {"status": "unknown", "summary": "no workspace: see the KFP UI"}
        else:
            stages[stage] = {"status": "not run", "summary": "reused from KFP's cache, or skipped"}
    published = notes.get("publish", {})
    version = published.get("version") if published.get("published") else None
    head = f"run {state.lower()}"
    if skipped_why:
        head += f": {skipped_why}; nothing trained"
    elif version is not None:
        head += f": published v{version}"
    elif gate is False:
        head += ": the evaluation gate failed, nothing published"
    if error:
        head += f" ({first_line(error)})"
    return {
        "state": state,
        "error": error or None,
        "published_version": version,
        "stages": stages,
        "text": head,
    }


def notify(url: str, doc: dict[str, Any], attempts: int = 3) -> bool:
    """POST the summary as JSON (`text` first: Slack/Teams-style webhooks show it).
    A webhook that fails is a warning, never the run's failure."""
    body = json.dumps({"text": doc["text"], "summary": doc}).encode()
    last = ""
    for _ in range(attempts):
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if 200 <= response.status < 300:
                    return True
                last = f"HTTP {response.status}"
        except OSError as e:  # URLError, HTTPError, timeouts
            last = str(e)
    print(f"summary: warning: the webhook did not take the summary ({last})", file=sys.stderr)
    return False


_STAGES = {
    "fingerprint": fingerprint,
    "base_model": base_model,
    "pack": pack,
    "cache": cache,
    "cache_worker": cache_worker,
    "cache_merge": cache_merge,
    "train": train,
    "evaluate": evaluate,
    "publish": publish,
    "summary": summary,
}


# -- helpers -------------------------------------------------------------------------


def _registry_here(cfg: PublishConfig, ctx: Context) -> PublishConfig:
    """A relative registry path lives on the workspace (never on the pod's own disk)."""
    from components.publish.registry import is_uri

    if is_uri(cfg.registry) or Path(cfg.registry).is_absolute() or ctx.workspace is None:
        return cfg
    return cfg.model_copy(update={"registry": str(ctx.workspace / cfg.registry)})


def _dataset_fingerprint(data: DataConfig) -> str:
    """A `datasets` name: its Hub commit when the Hub is reachable, else the name."""
    from components.common.models import hub_offline

    key = [data.dataset_name, data.dataset_config_name, data.dataset_split]
    if hub_offline():
        print(f"fingerprint: offline, {data.dataset_name} is fingerprinted by its name only")
        return sha256_json(key)
    from huggingface_hub import HfApi

    try:
        sha = (
            HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
            .dataset_info(data.dataset_name)
            .sha
        )
    except Exception as e:
        raise T2IError(
            f"data.dataset_name {data.dataset_name}: cannot read it on the Hub: {e}"
        ) from e
    return sha256_json([*key, sha])


def _source(ctx: Context) -> str:
    return (ctx.run_key or {}).get("source", "")


def _key_metadata(ctx: Context) -> dict[str, str]:
    key = ctx.run_key or {}
    return {k: key[k] for k in ("data_fingerprint", "config_sha256") if k in key}


@contextmanager
def _locked(folder: Path | None) -> Iterator[None]:
    """Hold `<folder>.lock` (an advisory lock on the workspace): a scheduled pipeline
    never overlaps itself (max concurrency 1), but a manual submit may run beside it,
    and two runs must not write one store at once. The second waits, then finds the
    first's work done (unchanged shards, committed latents, a final checkpoint)."""
    if folder is None:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run to finish with {folder}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _scratch(folder: Path | None) -> Iterator[Path]:
    """`folder` (kept), or a temporary folder removed afterwards when `folder` is None."""
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="t2i-source-") as tmp:
        yield Path(tmp)


def _mirror(src: Path, dst: Path) -> None:
    """Copy the files of `src` into `dst` (an output artifact), unless they are one."""
    if Path(src).resolve() == Path(dst).resolve():
        return
    shutil.copytree(src, dst, dirs_exist_ok=True)
