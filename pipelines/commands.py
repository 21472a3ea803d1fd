"""`t2i pipeline compile | run-local | submit | schedule`."""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from components.common.config import Params
from components.common.errors import ConfigError, T2IError
from components.common.io import atomic_path
from components.publish.registry import is_uri
from pipelines.finetune import build_pipeline


def compile_pipeline(params: Params, output: Path) -> Path:
    """Compile the DAG for `params` to a KFP v2 YAML at `output` (atomically)."""
    from kfp import compiler

    with atomic_path(Path(output), ".yaml") as tmp:
        compiler.Compiler().compile(build_pipeline(params), str(tmp))
    return Path(output)


COMMITTED = Path("pipelines/compiled/finetune.yaml")
LOCAL = Path("artifacts/pipeline/finetune.yaml")
_RUNS = itertools.count(1)


def compile_target(args) -> Path:
    """Where `t2i pipeline compile` writes: `--output`; else the committed YAML, which is
    compiled from params.yaml alone; a compile with overrides or another params file
    goes to artifacts/ so local values never land in the committed file by accident."""
    if args.output is not None:
        return args.output
    default_params = args.params.resolve() == Path("params.yaml").resolve()
    return COMMITTED if default_params and not args.overrides else LOCAL


def run_local(params: Params, root: Path) -> dict:
    """Run the whole DAG here with kfp.local's SubprocessRunner; return its outputs.

    `root/workspace` plays the PVC: it persists between runs under the same root, so a
    second run with unchanged data and config trains nothing, as on a cluster."""
    from kfp import local

    from components.common.remote import is_remote

    source = params.data.source
    if not params.data.dataset_name and not is_remote(source):
        source = str(Path(source).resolve())
        if not Path(source).exists():
            raise ConfigError(
                f"data.source {params.data.source!r}: no such folder or file "
                "(a folder, a .tar / .parquet file, a URI; or set data.dataset_name)"
            )
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Retries are for pods a cluster loses; here a failure is a bug or bad input: at once.
    # kfp.local cannot create a PVC: the local workspace is a folder.
    no_retries = params.pipeline.retries.model_copy(update={"count": 0})
    local_pipeline = {"retries": no_retries, "workspace_create": None}
    params = params.model_copy(
        update={"pipeline": params.pipeline.model_copy(update=local_pipeline)}
    )
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    publish = params.publish
    if not is_uri(publish.registry):
        publish = publish.model_copy(update={"registry": str(Path(publish.registry).resolve())})
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # it is our image
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_RUNS)}"
    # A local run is an experiment: publish skips it unless publish.from_experiments.
    # The run id names the run's notes in the workspace (a pod reads its label).
    # (kfp.local's subprocesses inherit this environment.)
    env = {"T2I_EXPERIMENT": f"run-local {root.name}", "T2I_RUN_ID": run_id}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        task = build_pipeline(params)(
            source=source,
            workspace=str(root / "workspace"),
            publish_params=json.dumps(publish.model_dump()),
        )
    except RuntimeError as e:
        raise T2IError(f"local pipeline run failed: {e}") from None
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary = root / "workspace" / "runs" / run_id / "summary.json"
    return {
        "root": str(root),
        "run_id": run_id,
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "outputs": sorted(getattr(task, "outputs", {}) or {}),
    }


def submit(params: Params, run_name: str | None = None) -> str:
    """Compile and submit one run to the KFP API at `pipeline.host`; return the run id."""
    client = _client(params)
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(params, Path(d) / "finetune.yaml")
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments={},
            run_name=run_name,
            experiment_name=params.pipeline.experiment,
        )
    return run.run_id


def schedule(params: Params) -> str:
    """Create a recurring run (cron `pipeline.schedule_cron`); return its id."""
    client = _client(params)
    experiment = client.create_experiment(params.pipeline.experiment)
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(params, Path(d) / "finetune.yaml")
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=f"{params.pipeline.name}-scheduled",
            cron_expression=params.pipeline.schedule_cron,
            pipeline_package_path=str(package),
            max_concurrency=1,
            no_catchup=True,
        )
    return job.recurring_run_id


def _client(params: Params):
    if not params.pipeline.host:
        raise ConfigError("pipeline.host is not set: the KFP API endpoint to submit to")
    import kfp

    return kfp.Client(host=params.pipeline.host)


def image_warning(image: str) -> str | None:
    """A tag can be moved to other bytes; production pipelines name the image by digest."""
    if "@sha256:" in image:
        return None
    return (
        f"warning: pipeline.image {image} is pinned by a tag, which can be moved; for "
        "production, pin its digest (pipeline.image=REPO@sha256:...; README, Kubernetes)"
    )


def source_warning(params: Params) -> str | None:
    """A relative path means nothing in a pod (the image holds no data)."""
    from components.common.remote import is_remote

    source = params.data.source
    if params.data.dataset_name or is_remote(source) or Path(source).is_absolute():
        return None
    return (
        f"warning: data.source {source} is a path on this machine; in the cluster use a URI "
        "(s3://, gs://, hf://datasets/, dvc://) or an absolute path on pipeline.data_pvc"
    )


def dispatch(params: Params, args) -> str:
    if args.action != "run-local":
        for warning in (image_warning(params.pipeline.image), source_warning(params)):
            if warning:
                print(warning, file=sys.stderr)
    if args.action == "compile":
        target = compile_target(args)
        note = "" if target != LOCAL else f" (local values; {COMMITTED} is left as it is)"
        return f"compiled pipeline -> {compile_pipeline(params, target)}{note}"
    if args.action == "run-local":
        result = run_local(params, args.root)
        said = (result["summary"] or {}).get("text", "finished")
        return f"local pipeline {said}; artifacts under {result['root']}"
    if args.action == "submit":
        return f"submitted run {submit(params)} to {params.pipeline.host}"
    return f"scheduled recurring run {schedule(params)} ({params.pipeline.schedule_cron})"
