"""`t2i pipeline compile | run-local | submit | schedule`."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from components.common.config import Params
from components.common.errors import ConfigError, T2IError
from components.common.io import atomic_path, sha256_tree
from pipelines.finetune import build_pipeline


def compile_pipeline(params: Params, output: Path) -> Path:
    """Compile the DAG for `params` to a KFP v2 YAML at `output` (atomically)."""
    from kfp import compiler

    with atomic_path(Path(output), ".yaml") as tmp:
        compiler.Compiler().compile(build_pipeline(params), str(tmp))
    return Path(output)


def source_fingerprint(source: Path) -> str:
    """Content hash of a local source folder (empty for a remote URI)."""
    return sha256_tree(source) if source.is_dir() else ""


def run_local(params: Params, root: Path) -> dict:
    """Run the whole DAG here with kfp.local's SubprocessRunner; return its outputs."""
    from kfp import local

    source = Path(params.data.source).resolve()
    if not source.is_dir():
        raise ConfigError(f"data.source {params.data.source!r}: no such folder")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    publish = params.publish.model_copy(
        update={"registry": str(Path(params.publish.registry).resolve())}
    )
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # it is our image
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    try:
        task = build_pipeline(params)(
            source=str(source),
            source_fingerprint=source_fingerprint(source),
            publish_params=json.dumps(publish.model_dump()),
        )
    except RuntimeError as e:
        raise T2IError(f"local pipeline run failed: {e}") from None
    return {"root": str(root), "outputs": sorted(getattr(task, "outputs", {}) or {})}


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


def dispatch(params: Params, args) -> str:
    if args.action == "compile":
        return f"compiled pipeline -> {compile_pipeline(params, args.output)}"
    if args.action == "run-local":
        result = run_local(params, args.root)
        return f"local pipeline run finished; artifacts under {result['root']}"
    if args.action == "submit":
        return f"submitted run {submit(params)} to {params.pipeline.host}"
    return f"scheduled recurring run {schedule(params)} ({params.pipeline.schedule_cron})"
