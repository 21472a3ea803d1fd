"""`t2i pipeline compile | run-local | submit | schedule`."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from components.common.config import Params
from components.common.errors import ConfigError, T2IError, first_line
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


def run_local(params: Params, root: Path, log=print, caching: bool = True) -> dict:
    """Run the whole DAG here, as a KFP backend would (`pipelines/backend.py`: its
    execution cache, status words and retries); return the run's summary and tasks.

    `root/workspace` plays the PVC and `root/backend.json` the backend's metadata: both
    persist between runs under the same root, so a second run with unchanged data and
    config trains nothing, and a run that changed one stage's config re-runs only that
    stage and those after it, as on a cluster. `log` gets one line per task; each
    task's full log is a file under the run's folder."""
    from components.common.remote import is_remote
    from pipelines.backend import LocalBackend

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
    no_retries = params.pipeline.retries.model_copy(update={"count": 0})
    local_pipeline = {"retries": no_retries, "workspace_create": None}
    params = params.model_copy(
        update={"pipeline": params.pipeline.model_copy(update=local_pipeline)}
    )
    publish = params.publish
    if not is_uri(publish.registry):
        publish = publish.model_copy(update={"registry": str(Path(publish.registry).resolve())})
    package = root / "pipeline.yaml"
    from kfp import compiler

    with atomic_path(package, ".yaml") as tmp:
        compiler.Compiler().compile(build_pipeline(params, in_cluster=False), str(tmp))
    run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_RUNS)}"
    # A local run is an experiment: publish skips it unless publish.from_experiments.
    env = {**os.environ, "T2I_EXPERIMENT": f"run-local {root.name}"}
    backend = LocalBackend(root, caching=caching, on_task=_task_line(log), env=env)
    result = backend.run(
        package,
        {
            "source": source,
            "workspace": str(root / "workspace"),
            "publish_params": json.dumps(publish.model_dump(), sort_keys=True),
        },
        run_id,
    )
    summary = root / "workspace" / "runs" / run_id / "summary.json"
    return {
        "root": str(root),
        "run_id": run_id,
        "state": result.state,
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "tasks": result.tasks,
        "log": str(root / run_id),
    }


def _task_line(log):
    """One line per task: its name, what became of it, its time and its own line."""

    def line(task) -> None:
        said = _stage_line(task) if task.log else ""
        took = f"{task.seconds:5.1f}s" if task.seconds else "     "
        retried = f" (attempt {task.attempts})" if task.attempts > 1 else ""
        log(f"  {task.display_name:<13} {task.state.lower():<9}{took}{retried}  {said}".rstrip())
        if task.state == "FAILED" and task.log:
            tail = [x for x in task.log.read_text().splitlines() if x.strip()][-6:]
            log("    " + "\n    ".join(tail))
            log(f"    full log: {task.log}")

    return line


def _stage_line(task) -> str:
    """The stage's own last line (`<stage>: ...`) from a task's log."""
    lines = task.log.read_text().splitlines()
    stage = task.display_name.replace("-", "_")
    for text in reversed(lines):
        if text.startswith(f"{stage}: "):
            return text[len(stage) + 2 :]
    return ""


# The oldest KFP backend this DAG runs on: the exit handler's PipelineTaskFinalStatus
# and dsl.Collected artifact lists need 2.14 (task retries need 2.5).
MIN_BACKEND = (2, 14, 0)


def backend_version(client) -> str | None:
    """The KFP backend's release (e.g. "2.15.0"), from the v1beta1 healthz's `tag_name`
    (the v2beta1 healthz carries no version); None when the server reports none."""
    api = client._healthz_api.api_client  # the client's own session, auth included
    try:
        data = api.call_api(
            "/apis/v1beta1/healthz",
            "GET",
            response_type="object",
            auth_settings=["Bearer"],
            _return_http_data_only=True,
            _request_timeout=30,
        )
    except Exception as e:  # unreachable, 404 on an older or proxied API, no auth
        raise T2IError(
            f"cannot read the KFP backend's version ({first_line(e, 160)}); is pipeline.host "
            "the KFP API endpoint?"
        ) from e
    tag = (data or {}).get("tag_name") if isinstance(data, dict) else None
    return tag if tag and tag != "unknown" else None


def check_backend(client, host: str) -> str | None:
    """ConfigError when the backend at `host` is older than MIN_BACKEND; a warning
    (returned) when it does not say its version."""
    tag = backend_version(client)
    minimum = ".".join(map(str, MIN_BACKEND))
    if tag is None:
        return (
            f"warning: the KFP backend at {host} does not report its version; this pipeline "
            f"needs {minimum} or newer (PipelineTaskFinalStatus, dsl.Collected)"
        )
    numbers = tuple(int(n) for n in re.findall(r"\d+", tag)[:3])
    if numbers and numbers < MIN_BACKEND:
        raise ConfigError(
            f"the KFP backend at {host} is {tag}; this pipeline needs {minimum} or newer (its "
            "exit handler's PipelineTaskFinalStatus and dsl.Collected): upgrade Kubeflow "
            "Pipelines"
        )
    return None


def submit(params: Params, run_name: str | None = None) -> str:
    """Compile and submit one run to the KFP API at `pipeline.host`; return the run id.
    Refused (before anything is created) on a backend older than MIN_BACKEND."""
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
    """Create a recurring run (cron `pipeline.schedule_cron`); return its id. Refused
    (before anything is created) on a backend older than MIN_BACKEND."""
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
    """A KFP client for `pipeline.host`, once the backend's version is checked."""
    if not params.pipeline.host:
        raise ConfigError("pipeline.host is not set: the KFP API endpoint to submit to")
    import kfp

    client = kfp.Client(host=params.pipeline.host)
    warning = check_backend(client, params.pipeline.host)
    if warning:
        print(warning, file=sys.stderr)
    return client


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


def trainjob_command(params: Params, args) -> str:
    """`t2i pipeline trainjob`: the TrainJob the train task would create, as YAML (to
    stdout or `--output`), for `kubectl apply -f -`; `--submit` creates it in the
    current kube context and `--wait` follows it like the KFP launcher does."""
    import yaml

    from pipelines import kube, trainjob

    p = params.pipeline
    if not p.workspace_pvc:
        raise ConfigError("t2i pipeline trainjob needs pipeline.workspace_pvc: the nodes share it")
    root = Path(p.workspace_path)
    name = args.name or trainjob.job_name(p.name, time.strftime("manual-%Y%m%d-%H%M%S"))
    paths = trainjob.JobPaths(
        Path(args.latents or root / "latents"),
        Path(args.model or root / "base-model"),
        Path(args.out or root / "trainjobs" / name / "model"),
        root / "trainjobs" / name / "reports",
        Path(args.checkpoints or root / "checkpoints"),
    )
    job = trainjob.manifest(params, name, trainjob.train_args(params.train, paths, checked=False))
    text = yaml.safe_dump(job, sort_keys=False)
    if args.output:
        with atomic_path(Path(args.output), ".yaml") as tmp:
            tmp.write_text(text)
    if not args.submit:
        if not args.output:
            print(text, end="")
        return f"TrainJob {name}: " + (f"written to {args.output}" if args.output else "above")
    api, namespace = kube.api_client()
    launcher = trainjob.Launcher(api, namespace, poll_s=float(os.environ.get("T2I_POLL_S", "10")))
    if not args.wait:
        launcher.submit(job)
        return f"TrainJob {namespace}/{name} submitted"
    trainjob.run_job(launcher, job)
    return f"TrainJob {namespace}/{name} complete; model -> {paths.model}"


def dispatch(params: Params, args) -> str:
    if args.action in ("compile", "submit", "schedule"):
        for warning in (image_warning(params.pipeline.image), source_warning(params)):
            if warning:
                print(warning, file=sys.stderr)
    if args.action == "compile":
        target = compile_target(args)
        note = "" if target != LOCAL else f" (local values; {COMMITTED} is left as it is)"
        return f"compiled pipeline -> {compile_pipeline(params, target)}{note}"
    if args.action == "run-local":
        print(f"local pipeline run under {args.root} (backend semantics: cached tasks reused)")
        result = run_local(params, args.root)
        said = (result["summary"] or {}).get("text", result["state"].lower())
        where = f"task logs under {result['log']}"
        if result["state"] != "COMPLETE":
            raise T2IError(f"local pipeline {said}; {where}")
        return f"local pipeline {said}; {where}"
    if args.action == "trainjob":
        return trainjob_command(params, args)
    if args.action == "runtime":
        import yaml

        from pipelines.trainjob import runtime_manifest

        text = yaml.safe_dump(runtime_manifest(params), sort_keys=False)
        if args.output:
            with atomic_path(Path(args.output), ".yaml") as tmp:
                tmp.write_text(text)
            return f"ClusterTrainingRuntime {params.pipeline.trainer.runtime} -> {args.output}"
        print(text, end="")
        return f"ClusterTrainingRuntime {params.pipeline.trainer.runtime}: above"
    if args.action == "submit":
        return f"submitted run {submit(params)} to {params.pipeline.host}"
    return f"scheduled recurring run {schedule(params)} ({params.pipeline.schedule_cron})"
