"""What each KFP component does, in one place: run a stage from its JSON params and
artifact paths.

Every component in `ops.py` is a signature and one line, `run_stage(<stage>, locals())`.
Here, for every stage alike:
- `<section>_params` (JSON strings) are validated by the params.yaml schema;
- `workspace` (the PVC's mount path; a folder under `t2i pipeline run-local`; "" for
  none) holds what outlives a pod: the fetched source, pack's and cache's
  content-keyed stores, train's checkpoints keyed by the run, a registry given as a
  relative path, and the run notes (`runs/<run id>/<stage>.json`) the summary reads;
- the fingerprint task decides whether to train, against what the last run decided
  (`decisions/<publish.name>.json` on the workspace, written by the summary), and hands
  each stage the part of the key it depends on (`data_key` to pack; `train_key` to
  train, the run id under `retrain: always`); `run_key` reaches publish's lineage;
- every stage leaves a note (`runs/<run id>/<stage>.json`): running, done or failed
  with its one line; the summary reads them;
- a user-caused failure is one line on stderr and exit 2 (config) or 1 (anything else),
  noted as final: a retried attempt of that stage in the same run exits at once with
  the same line (KFP retries every non-zero exit; only a lost pod is worth a retry).
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
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
STAGE_ORDER = (
    "fingerprint", "base_model", "pack", "cache", "check", "train", "evaluate", "publish"
)  # fmt: skip
RUN_ID_ENV = "T2I_RUN_ID"
NOTIFY_ENV = "T2I_NOTIFY_URL"
# The run states both vocabularies use: the backend's (MLMD execution states, what
# its exit handler receives) and kfp.local's.
SUCCEEDED_STATES = {"COMPLETE", "CACHED", "SUCCEEDED"}
CANCELLED_STATES = {"CANCELED", "CANCELLED"}
# The note a stage writes (the cache's workers and merge report as the cache).
NOTE_OF = {
    "cache_merge": "cache", "cache_worker": "cache", "pack_merge": "pack", "pack_worker": "pack"
}  # fmt: skip


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

    def read_note(self, stage: str) -> dict | None:
        folder = self.run_dir()
        path = folder / f"{stage}.json" if folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None


def run_stage(stage: str, io: dict[str, Any]) -> Any:
    """Run `stage` with a component's inputs and outputs `io` (its `locals()`)."""
    io = {k: v for k, v in io.items() if k != "run_stage"}  # the component's own import
    workspace = io.pop("workspace", "") or ""
    run_key = io.pop("run_key", "") or ""
    ctx = Context(Path(workspace) if workspace else None, json.loads(run_key) if run_key else None)
    note = NOTE_OF.get(stage, stage)
    earlier = ctx.read_note(note)
    if earlier and earlier.get("status") == "failed" and earlier.get("final"):
        # A retried attempt of a stage whose failure a retry cannot fix (bad config or
        # data): the same line, at once, without loading anything.
        print(f"{stage}: {earlier['summary']} (failed before; not retried)", file=sys.stderr)
        raise SystemExit(earlier.get("exit", 1))
    if stage not in ("summary", "cache_worker", "pack_worker"):
        ctx.note(note, "running", f"{stage} started")
    try:
        for name in [k for k in io if k.endswith("_params")]:
            section = name[: -len("_params")]
            raw = json.loads(io.pop(name))
            io[section] = validate_section(SECTIONS[section], raw, section)
        return _STAGES[stage](ctx, **io)
    except T2IError as e:
        code = 2 if isinstance(e, ConfigError) else 1
        ctx.note(note, "failed", first_line(e), final=True, exit=code)
        print(f"{stage}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def say(stage: str, line: str) -> None:
    """A stage's one-line summary, as the last line of its log."""
    print(f"{stage}: {line}", flush=True)


# -- the stages ----------------------------------------------------------------------


def fingerprint(
    ctx: Context,
    source: str,
    retrain: str,
    key: str,
    reason: str,
    data_key: str,
    train_key: str,
    **sections,
) -> bool:
    """Whether to train: the data's fingerprint where it lives and the config hash,
    against what the last run decided (else the latest published version's lineage).
    Every section is validated here, before any other task runs. Writes the run key
    (JSON), the reason, pack's `data_key` (the data fingerprint) and train's
    `train_key` (the run id under `retrain: always`, so every run trains; else empty)
    to the output parameter files."""
    data: DataConfig = sections["data"]
    config = {s: sections[s].model_dump() for s in TRAINED_FROM}
    config["data"].pop("source")  # the content is the fingerprint's; the place may move
    config["data"].pop("fingerprint")  # how it is computed, not what the model learns
    run_key = {
        "source": data.dataset_name or source,
        "data_fingerprint": source_fingerprint(source, data, source_index(ctx, source)),
        "config_sha256": sha256_json(config),
        "publish_sha256": sha256_json(sections["publish"].model_dump()),
    }
    record = decision_record(ctx, sections["publish"])
    last = read_decision(record) or _latest(sections["publish"], ctx)
    changed, why = decide(run_key, last, retrain)
    nonce = (os.environ.get(RUN_ID_ENV) or str(time.time_ns())) if retrain == "always" else ""
    outputs = {
        key: json.dumps(run_key, sort_keys=True),
        reason: why,
        data_key: run_key["data_fingerprint"],
        train_key: nonce,
    }
    for path, text in outputs.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    ctx.note(
        "fingerprint",
        "done",
        why,
        changed=changed,
        run_key=run_key,
        decision_record=str(record) if record else None,
    )
    short = f"{run_key['data_fingerprint'][:12]} config {run_key['config_sha256'][:12]}"
    say("fingerprint", f"data {short}: {why}")
    return changed


@dataclass(frozen=True)
class LastRun:
    """What the last run that trained decided: its run key and what became of it."""

    run_key: dict[str, Any]
    run_id: str
    published_version: int | None
    gate_passed: bool | None

    def describe(self) -> str:
        if self.published_version is not None:
            outcome = f"published v{self.published_version}"
        elif self.gate_passed is False:
            outcome = "the gate failed, not published"
        else:
            outcome = "not published"
        return f"the last run ({self.run_id}: {outcome})"


def decision_record(ctx: Context, publish: PublishConfig) -> Path | None:
    """Where the pipeline keeps its last decision for this model (None: no workspace)."""
    if ctx.workspace is None:
        return None
    return ctx.workspace / "decisions" / f"{publish.name}.json"


def read_decision(record: Path | None) -> LastRun | None:
    if record is None or not record.is_file():
        return None
    try:
        doc = json.loads(record.read_text())
        return LastRun(doc["run_key"], doc["run_id"], doc.get("published_version"),
                       doc.get("gate_passed"))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: decided afresh (and rewritten by this run's summary)


def _latest(publish: PublishConfig, ctx: Context):
    from components.publish.latest import latest_published

    return latest_published(_registry_here(publish, ctx))


def source_fingerprint(source: str, data: DataConfig, index: Path | None = None) -> str:
    """The data's content fingerprint: of `source` (a local folder through its stat
    `index`, unless `data.fingerprint: content`), or of `data.dataset_name`."""
    from components.common import remote

    if data.dataset_name:
        return _dataset_fingerprint(data)
    return remote.fingerprint(source, index, trust_stat=data.fingerprint == "stat")


def source_index(ctx: Context, source: str) -> Path | None:
    """Where a local source's stat index lives on the workspace (the data may be on a
    read-only volume): the fingerprint task and pack share it."""
    return ctx.workspace / "index" / f"{sha256_json(source)[:16]}.json" if ctx.workspace else None


def decide(key: dict[str, Any], last, retrain: str) -> tuple[bool, str]:
    """Whether to train, and why, given what the last run decided (a `LastRun`) or,
    without that record, the latest published version (a `Published`), or None.
    ConfigError for a `retrain` that is neither on_change nor always."""
    if retrain not in ("on_change", "always"):
        raise ConfigError(
            f"pipeline parameter retrain: {retrain!r} is neither on_change nor always"
        )
    if last is None:
        return True, "nothing trained or published yet"
    since = last.describe()
    if retrain == "always":
        return True, f"pipeline.retrain: always (since {since})"
    before = last.run_key
    if not before:
        return True, f"{since} has no pipeline run key (published outside a pipeline run)"
    if before.get("data_fingerprint") != key["data_fingerprint"]:
        return True, f"data changed since {since}"
    if before.get("config_sha256") != key["config_sha256"]:
        return True, f"config changed since {since}"
    if before.get("publish_sha256", key.get("publish_sha256")) != key.get("publish_sha256"):
        return True, (
            f"publish settings changed since {since} (the stages before publish come from "
            "KFP's cache)"
        )
    return False, f"data and config unchanged since {since}"


def workspace(ctx: Context, pvc_name: str, create: str, shared: bool = False) -> None:
    """Make sure the workspace PVC exists (created when `create` holds a claim), and is
    ReadWriteMany when `shared` by several train nodes."""
    from pipelines.kube import ensure_pvc

    said = ensure_pvc(pvc_name, json.loads(create) if create else None, shared=shared)
    say("workspace", said)


def base_model(ctx: Context, model: ModelConfig, base_model) -> None:
    from components import base_model as stage

    stage.run(model, Path(base_model.path))
    ctx.note("base_model", "done", f"base model {model.source} ready")
    say("base_model", f"base model {model.source} ready")


def pack(
    ctx: Context, source: str, data_key: str, data: DataConfig, pack: PackConfig, shards
) -> None:
    """Fetch the source (only what changed, into the workspace) and pack it into the
    workspace's store for this source and config, which keeps every unchanged shard.
    `data_key` (the data's fingerprint) is only a cache key: KFP re-runs pack when
    the data changed, though the source's name did not."""
    from components import pack_shards as stage

    out = Path(shards.path)
    store = _pack_store(ctx, source, data, pack)
    with _locked(store), _fetched(ctx, source, data, hold=True) as (local, index):
        report = stage.run(data, pack, local, store or out, source_name=data.dataset_name or source,
                           index=index, keep_unlisted=store is not None)  # fmt: skip
        _by_reference(ctx, "pack", store, out, extra=("rejected.jsonl",))
    _packed(ctx, "pack", source, data_key, report, shards)


def pack_worker(
    ctx: Context,
    source: str,
    data_key: str,
    data: DataConfig,
    pack: PackConfig,
    worker_index: int,
    num_workers: int,
    part,
) -> None:
    """Worker `worker_index` of `num_workers`: its part of the source's listing (by key
    hash), processed against the store's output into `<store>/.parts/`; the merge
    commits. Workers hold the source's lock only while fetching."""
    from components.pack_shards import fanout

    store = _pack_store(ctx, source, data, pack)
    if store is None:  # the config refuses this; a hand-written DAG might not
        raise ConfigError("pipeline.pack_workers > 1 needs pipeline.workspace_pvc")
    with _fetched(ctx, source, data, hold=False) as (local, index):
        report = fanout.run_worker(data, pack, local, store, worker_index, num_workers, index)
    folder = fanout.part_dir(store, worker_index, num_workers)
    Path(part.path).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / fanout.PART, Path(part.path) / fanout.PART)
    say("pack_worker", report.summary())


def pack_merge(
    ctx: Context,
    source: str,
    data_key: str,
    data: DataConfig,
    pack: PackConfig,
    num_workers: int,
    parts,
    shards,
) -> None:
    """Commit the pack workers' parts in the store, as one pack task would have."""
    from components.pack_shards import fanout

    out = Path(shards.path)
    store = _pack_store(ctx, source, data, pack)
    if store is None:
        raise ConfigError("pipeline.pack_workers > 1 needs pipeline.workspace_pvc")
    with _locked(store), _fetched(ctx, source, data, hold=True) as (local, _):
        name = data.dataset_name or source
        report = fanout.merge(data, pack, local, store, num_workers, source_name=name,
                              keep_unlisted=True)  # fmt: skip
        _by_reference(ctx, "pack", store, out, extra=("rejected.jsonl",))
    _packed(ctx, "pack_merge", source, data_key, report, shards)


def _pack_store(ctx: Context, source: str, data: DataConfig, pack: PackConfig) -> Path | None:
    """The workspace's store of shards for this source and pack config."""
    return ctx.store("pack", [source, data.model_dump(exclude={"fingerprint"}), pack.model_dump()])


@contextmanager
def _fetched(ctx: Context, source: str, data: DataConfig, hold: bool):
    """(the source as a local path, its stat index): a path as it is, a URI fetched
    (only what changed) into the workspace. `hold`: keep the source's lock until done
    (a pack), or only while fetching (pack workers, which run side by side)."""
    from components.common import remote

    sources = ctx.store("sources", source)
    with ExitStack() as stack:
        stack.enter_context(_locked(sources))
        staging = stack.enter_context(_scratch(sources))
        local = Path(source) if data.dataset_name else remote.fetch(source, staging)
        if not hold and sources is not None:
            stack.pop_all().close()  # the lock released; the staging (kept) stays
        # A path: the index the fingerprint task just filled; a fetched copy: its own.
        index = source_index(ctx, source if str(local) == source else f"copy of {source}")
        yield local, index


def _packed(ctx: Context, stage: str, source: str, data_key: str, report, shards) -> None:
    shards.metadata.update(source=source, samples=report.kept, data_fingerprint=data_key)
    ctx.note("pack", "done", report.summary(), written=report.written, shards=report.shards)
    say(stage, report.summary())


def cache(ctx: Context, processes: int, cache: CacheConfig, shards, base_model, latents) -> None:
    """Encode the shards into the workspace's store (only what is new); with `processes`
    > 1 (the stage's GPUs) as that many torchrun processes, one per GPU."""
    from components import cache_latents as stage

    out = Path(latents.path)
    store = _cache_store(ctx, shards, cache)
    with _locked(store):
        if processes > 1:
            args = ["--shards", shards.path, "--model", base_model.path, "--out", str(store or out)]
            _torchrun("cache", processes, {"cache": cache.model_dump(mode="json")}, args)
            line = f"cached with {processes} processes"
            encoded = None
        else:
            report = stage.run(cache, Path(shards.path), Path(base_model.path), store or out,
                               keep_unlisted=store is not None)  # fmt: skip
            line, encoded = report.summary(), report.shards_encoded
        _by_reference(ctx, "cache", store, out)
    ctx.note("cache", "done", line, encoded=encoded)
    say("cache", line)


def _torchrun(command: str, processes: int, sections: dict, args: list[str]) -> None:
    """`t2i <command>` as `processes` DDP processes of this pod (torchrun, one per GPU),
    with `sections` as its params file. T2IError when it fails (the ranks' own lines
    are in the log above)."""
    import subprocess

    import yaml

    with tempfile.TemporaryDirectory(prefix="t2i-params-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(sections, sort_keys=True))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(processes), "-m", "components.cli", command]
        done = subprocess.run([*cmd, "--params", str(params), *args])
    if done.returncode:
        raise T2IError(f"{command} with {processes} processes failed (exit {done.returncode})")


def cache_worker(
    ctx: Context, cache: CacheConfig, worker_index: int, num_workers: int, shards, base_model, part
) -> None:
    """Encode shards i, i+n, ... With a workspace, into the cache task's store (the
    workers' shard files never collide; their part files are merged there) and the
    `part` artifact holds only the part file; without one, into `part`."""
    from components import cache_latents as stage

    store = _cache_store(ctx, shards, cache)
    out = store or Path(part.path)
    report = stage.run(
        cache, Path(shards.path), Path(base_model.path), out, worker_index, num_workers
    )
    if store is not None:
        name = f"part-{worker_index:04d}-of-{num_workers:04d}.json"
        Path(part.path).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store / name, Path(part.path) / name)
    say("cache_worker", report.summary())


def cache_merge(ctx: Context, cache: CacheConfig, num_workers: int, shards, parts, latents) -> None:
    from components import cache_latents as stage

    out = Path(latents.path)
    store = _cache_store(ctx, shards, cache)  # where the workers wrote, with a workspace
    if store is not None:
        with _locked(store):
            manifest = stage.merge(Path(shards.path), store, count=num_workers, keep_unlisted=True)
            _by_reference(ctx, "cache", store, out)
    else:
        for part in parts:
            _mirror(Path(part.path), out)
        manifest = stage.merge(Path(shards.path), out, count=num_workers)
        _by_reference(ctx, "cache", None, out)
    line = f"merged {len(manifest.shards)} latent shards from {num_workers} workers"
    ctx.note("cache", "done", line)
    say("cache_merge", line)


def _cache_store(ctx: Context, shards, cache: CacheConfig) -> Path | None:
    """The workspace's store for these shards and this cache config (None without one)."""
    return ctx.store("cache", [_packed_source(Path(shards.path)), cache.model_dump()])


def check(
    ctx: Context, processes: int, train: TrainConfig, evaluate: EvaluateConfig, latents, base_model
) -> None:
    """Before training: what the data and the configs decide that would fail later."""
    from components import evaluate as evaluate_stage
    from components import train_unet

    left = train_unet.check_data(train, Path(latents.path), processes, Path(base_model.path))
    evaluate_stage.check_inputs(evaluate, Path(latents.path))
    line = left or "every sample fills a batch"
    ctx.note("check", "done", line)
    say("check", line)


def train(
    ctx: Context,
    train_key: str,
    train: TrainConfig,
    latents,
    base_model,
    model,
    reports,
    train_metrics,
    launch: str = "",
):
    """Train; checkpoints go to the workspace, keyed by what the run trains on (the
    latent shards, the train config, `train_key`), so a retried or preempted pod
    resumes from the last one exactly, and another run never touches them.

    `launch` (JSON: the pipeline's train resources, trainer settings, image, workspace
    and secrets by name) says where: in this process (one GPU or none), as one torchrun
    process per GPU of this pod, or, on several nodes, as a Kubeflow Trainer TrainJob
    this task launches and follows (`pipelines/trainjob.py`)."""
    from components.common.records import read_latent_manifest
    from components.train_unet.monitor import TrainReport

    spec = _launch_spec(launch)
    resources = spec.resources["train"]
    shards = [s.sha256 for s in read_latent_manifest(Path(latents.path)).shards]
    checkpoints = ctx.store("checkpoints", [shards, train.model_dump(), train_key])
    checkpoints = checkpoints or Path(reports.path) / "checkpoints"
    with _locked(checkpoints):
        if resources.nodes > 1:
            report = _train_on_nodes(ctx, spec, train, latents, base_model, model, reports,
                                     checkpoints)  # fmt: skip
        elif resources.gpus > 1:
            args = ["--latents", latents.path, "--model", base_model.path, "--out", model.path]
            args += ["--reports", reports.path, "--checkpoints", str(checkpoints), "--checked"]
            _torchrun("train", resources.gpus, {"train": train.model_dump(mode="json")}, args)
            report = TrainReport(
                **json.loads((Path(reports.path) / "train_metrics.json").read_text())
            )
        else:
            from components import train_unet as stage

            report = stage.run(
                train,
                Path(latents.path),
                Path(base_model.path),
                Path(model.path),
                Path(reports.path),
                checkpoints,
            )
    for key, value in dataclasses.asdict(report).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train_metrics.log_metric(key, float(value))
    ctx.note("train", "done", report.summary(), resumed_from_step=report.resumed_from_step)
    say("train", report.summary())


def _launch_spec(launch: str):
    """The pipeline settings the train task launches with (a `PipelineConfig`)."""
    from components.common.config import PipelineConfig

    return PipelineConfig.model_validate(json.loads(launch)) if launch else PipelineConfig()


def _train_on_nodes(ctx, spec, train, latents, base_model, model, reports, checkpoints):
    """Train on `resources.train.nodes` nodes through Kubeflow Trainer: the inputs are
    put on the shared workspace, the TrainJob created (or re-attached to) and
    followed, and its model copied into this task's output."""
    from components.common.config import Params
    from components.train_unet.monitor import TrainReport
    from pipelines import kube, trainjob

    if ctx.workspace is None:
        raise ConfigError("resources.train.nodes > 1 needs the workspace (the nodes share it)")
    run_id = os.environ.get(RUN_ID_ENV) or "local"
    name = trainjob.job_name(spec.name, run_id)
    paths = trainjob.JobPaths.under(ctx.workspace / "trainjobs" / name, Path(checkpoints))
    _stage_inputs(Path(latents.path), paths.latents)
    _stage_inputs(Path(base_model.path), paths.base_model)
    job = trainjob.manifest(Params(pipeline=spec), name, trainjob.train_args(train, paths))
    api, namespace = kube.api_client()
    launcher = trainjob.Launcher(api, namespace, log=lambda line: print(line, flush=True),
                                 poll_s=float(os.environ.get("T2I_POLL_S", "10")))  # fmt: skip
    trainjob.run_job(launcher, job)
    _mirror(paths.model, Path(model.path))
    _mirror(paths.reports, Path(reports.path))
    return TrainReport(**json.loads((paths.metrics / "train_metrics.json").read_text()))


def _stage_inputs(src: Path, dst: Path) -> None:
    """Copy an input artifact onto the workspace for the job's nodes, once (a retried
    launcher finds it there)."""
    done = dst.with_name(dst.name + ".copied")
    if done.is_file():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    done.write_text("")


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
    say("evaluate", result.summary())
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
    say("publish", result.summary())


def summary(ctx: Context, status, summary) -> None:
    """The exit handler: what ran, what was skipped and why, what was published, and on
    a failure which stage failed and its line; to the `summary` artifact, the run's
    workspace folder, the log and the webhook. A run that succeeded after deciding to
    train leaves its decision for the next run's fingerprint to compare with."""
    run_dir = ctx.run_dir()
    doc = run_summary(run_dir, status.state, status.error_message)
    Path(summary.path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(summary.path), doc)
    if run_dir is not None:
        write_json_atomic(run_dir / "summary.json", doc)
        if doc["outcome"] == "succeeded":
            keep_decision(run_dir, doc)
    say("summary", doc["text"])
    url = os.environ.get(NOTIFY_ENV, "")
    if url:
        notify(url, doc)


def read_notes(run_dir: Path | None) -> dict[str, dict]:
    notes = {}
    if run_dir is not None and run_dir.is_dir():
        for path in run_dir.glob("*.json"):
            try:
                note = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(note, dict) and note.get("stage") in STAGE_ORDER:
                notes[note["stage"]] = note
    return notes


def outcome_of(state: str) -> str:
    """succeeded, failed or cancelled, from either vocabulary (the backend's MLMD states
    COMPLETE/FAILED/CANCELED, kfp.local's SUCCEEDED/FAILURE...)."""
    word = (state or "").upper()
    if word in SUCCEEDED_STATES:
        return "succeeded"
    if word in CANCELLED_STATES:
        return "cancelled"
    return "failed"


def run_summary(run_dir: Path | None, state: str, error: str | None = None) -> dict[str, Any]:
    """The run summary from the stages' notes in `run_dir`. The backend hands the exit
    task its state with an empty error, so a failure's cause comes from the notes: the
    stage that failed and its one line, or the stage that started and never finished."""
    notes = read_notes(run_dir)
    outcome = outcome_of(state)
    stages, skipped_why = {}, None
    decided = notes.get("fingerprint")
    if decided and decided.get("status") == "done" and not decided.get("changed"):
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
        elif outcome == "succeeded":
            stages[stage] = {"status": "cached", "summary": "reused from KFP's cache"}
        else:
            stages[stage] = {"status": "not run", "summary": "not reached"}
    failed_stage, cause = _failure(notes, outcome, error)
    published = notes.get("publish", {})
    version = published.get("version") if published.get("published") else None
    head = f"run {outcome}"
    if failed_stage or cause:
        head += f": {failed_stage + ': ' if failed_stage else ''}{cause}"
    elif skipped_why:
        head += f": {skipped_why}; nothing trained"
    elif version is not None:
        head += f": published v{version}"
    elif gate is False:
        head += ": the evaluation gate failed, nothing published"
    if error and cause != first_line(error):
        head += f" ({first_line(error)})"
    return {
        "state": state,
        "outcome": outcome,
        "error": error or None,
        "failed_stage": failed_stage,
        "published_version": version,
        "stages": stages,
        "text": head,
    }


def _failure(notes: dict, outcome: str, error: str | None) -> tuple[str | None, str | None]:
    """(the failed stage, its line) of a run that did not succeed."""
    if outcome == "succeeded":
        return None, None
    for stage in STAGE_ORDER:
        if notes.get(stage, {}).get("status") == "failed":
            return stage, notes[stage]["summary"]
    for stage in STAGE_ORDER:
        if notes.get(stage, {}).get("status") == "running":
            return stage, (
                "started and did not finish (its pod was lost, killed or out of memory; "
                "see its log)"
            )
    if outcome == "cancelled":
        return None, None
    return None, first_line(error) if error else "no stage said why; see the KFP UI"


def keep_decision(run_dir: Path, doc: dict) -> None:
    """After a successful run that trained, write what it decided and what became of it
    to the record the next run's fingerprint compares with."""
    notes = read_notes(run_dir)
    decided = notes.get("fingerprint", {})
    record = decided.get("decision_record")
    if not record or not decided.get("changed"):
        return
    write_json_atomic(
        Path(record),
        {
            "run_key": decided["run_key"],
            "run_id": run_dir.name,
            "published_version": doc["published_version"],
            "gate_passed": notes.get("evaluate", {}).get("gate_passed"),
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


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
    "workspace": workspace,
    "fingerprint": fingerprint,
    "base_model": base_model,
    "pack": pack,
    "cache": cache,
    "cache_worker": cache_worker,
    "pack_worker": pack_worker,
    "pack_merge": pack_merge,
    "cache_merge": cache_merge,
    "check": check,
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


def _packed_source(shards: Path) -> str:
    """The source a pack output was made from (its manifest names it)."""
    from components.common.records import read_pack_manifest

    return read_pack_manifest(shards).source


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


def _by_reference(ctx: Context, stage: str, store: Path | None, out: Path, extra=()) -> None:
    """The output artifact of a stage that wrote into the workspace's `store`: this
    run's manifest and where the shards are (`store.json`), not a copy of the shards,
    so a run uploads and every consumer downloads kilobytes, whatever the data's size.
    With `pipeline.store` (an object store, T2I_STORE) the new shards are uploaded there
    and `store.json` names it, with or without a workspace. Without either the stage
    wrote into `out` itself. The manifest is also kept under the run's notes (and, with
    an object store, in it), for `t2i store gc`."""
    from components.common import objects
    from components.common.records import listed_shards, write_store_ref

    uri = os.environ.get(objects.STORE_ENV) or None
    if store is None and uri is None:
        return
    folder = store if store is not None else out
    manifest = folder / "manifest.json"
    if uri is not None:
        doc = json.loads(manifest.read_text())
        count, size = objects.upload(folder, uri, listed_shards(folder))
        say(stage, f"{count} new shards ({size / 1e6:.1f} MB) uploaded to {uri}")
        if store is None:  # the artifact keeps the manifest (and rejected.jsonl) only
            for path in out.iterdir():
                if path.is_file() and path.name not in ("manifest.json", *extra):
                    path.unlink()
        run_id = os.environ.get(RUN_ID_ENV, "")
        if run_id:
            objects.ObjectStore(uri).put_json(f"runs/{run_id}/{stage}-manifest.json", doc)
    elif (folder / objects.UPLOADED).exists():  # the object store given up: back here
        count = objects.restore(folder, listed_shards(folder))
        say(stage, f"{count} shards downloaded back from {objects.store_of(folder)}")
    write_store_ref(out, uri if uri is not None else store, manifest)
    if store is None:
        return
    for name in extra:
        if (store / name).is_file():
            shutil.copyfile(store / name, out / name)
    run_dir = ctx.run_dir()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store / "manifest.json", run_dir / f"{stage}-manifest.json")
        write_json_atomic(run_dir / f"{stage}-store.json", {"store": str(store)})


def _mirror(src: Path, dst: Path) -> None:
    """Copy the files of `src` into `dst` (an output artifact), unless they are one."""
    if Path(src).resolve() == Path(dst).resolve():
        return
    shutil.copytree(src, dst, dirs_exist_ok=True)
