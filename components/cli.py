"""`t2i`: one entry point, one subcommand per stage (see docs/ARCHITECTURE.md).

Exit status: 0 success; 2 a usage or config error (the message names the flag or
key); 1 any other failure, one line on stderr (traceback with --debug or T2I_DEBUG=1).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from components.common.config import load_params
from components.common.errors import ConfigError, T2IError, first_line


def _base_model(p, a):
    from components import base_model

    r = base_model.run(p.model, a.out)
    return f"base model ({r.source}) written to {r.out}"


def _pack(p, a):
    from components import pack_shards
    from components.common import remote

    source = str(a.source or p.data.source)
    # The source's stat index (unchanged files are not read again): artifacts/index/.
    index = Path("artifacts/index") / f"{remote.staging_key(source)}.json"
    if a.merge and a.worker_index is not None:
        raise ConfigError("--merge commits every worker's part: give it no --worker-index")
    if not a.merge and (a.worker_index is None) != (a.num_workers is None):
        raise ConfigError("--worker-index and --num-workers go together")
    name = source if remote.is_remote(source) else None
    if remote.is_remote(source):  # fetched (only what changed) into artifacts/sources/
        local = remote.fetch(source, Path("artifacts/sources") / remote.staging_key(source))
    else:
        local = Path(source)
    if a.worker_index is not None or a.merge:  # fan-out: a part of the listing, or the merge
        from components.pack_shards import fanout

        if a.merge:
            report = fanout.merge(p.data, p.pack, local, a.out, a.num_workers, source_name=name)
            return report.summary() + f" -> {a.out}"
        part = fanout.run_worker(p.data, p.pack, local, a.out, a.worker_index, a.num_workers, index)
        return part.summary() + f" -> {fanout.part_dir(a.out, a.worker_index, a.num_workers)}"
    report = pack_shards.run(p.data, p.pack, local, a.out, source_name=name, index=index)
    return report.summary() + f" -> {a.out}"


def _cache(p, a):
    from components import cache_latents

    if a.merge:
        manifest = cache_latents.merge(a.shards, a.out)
        return f"merged {len(manifest.shards)} latent shards -> {a.out}"
    if (a.worker_index is None) != (a.num_workers is None):
        raise ConfigError("--worker-index and --num-workers go together")
    r = cache_latents.run(p.cache, a.shards, a.model, a.out, a.worker_index, a.num_workers)
    if p.cache.buckets and a.worker_index is None and os.environ.get("RANK", "0") == "0":
        _bucket_report(p, a.out)
    return r.summary() + f" -> {a.out}"


def _bucket_report(p, latents: Path) -> None:
    """With buckets, what each one holds and what an epoch of this params file's train
    batch trains of it, before training: printed, and `buckets.json` in the latents."""
    from components.common.io import write_json_atomic
    from components.common.records import read_latent_manifest
    from components.train_unet.data import LatentStream

    try:
        stream = LatentStream.from_manifest(
            Path(latents),
            read_latent_manifest(latents),
            p.train.max_train_samples,
            batch_size=p.train.train_batch_size,
            seed=p.train.seed,
            streams=p.train.data_streams,
        )
        rows, line = stream.bucket_table(), stream.epoch_summary()[0]
    except ConfigError as e:  # no bucket fills a batch: said now, refused by train
        rows, line = [], str(e)
    write_json_atomic(
        Path(latents) / "buckets.json",
        {"train_batch_size": p.train.train_batch_size, "processes": 1, "buckets": rows},
    )
    print(f"{line} (with train.train_batch_size {p.train.train_batch_size}, one process)")


def _train(p, a):
    from components import train_unet

    launched = "WORLD_SIZE" in os.environ  # a rank of a launch: its launcher checked
    trainer = "PET_NNODES" in os.environ
    if not launched:
        processes = _trainer_processes() if trainer else a.num_processes
        check_before_training(p, a.latents, a.model, processes, evaluate_too=not a.checked)
    if not launched and (trainer or a.num_processes > 1):
        return _launch(p, a)
    r = train_unet.run(p.train, a.latents, a.model, a.out, a.reports, a.checkpoints, a.metrics)
    return r.summary() + f"; model -> {a.out}"


def _trainer_processes() -> int:
    """All processes of a Trainer job: nodes x processes per node (`auto`: this node's
    GPUs, or one on a CPU node)."""
    import torch

    nodes = int(os.environ["PET_NNODES"].split(":")[-1])
    per_node = os.environ.get("PET_NPROC_PER_NODE", "1")
    if not per_node.isdigit():
        per_node = str(torch.cuda.device_count() or 1)
    return nodes * int(per_node)


def check_before_training(p, latents, model, processes: int, evaluate_too: bool = True) -> None:
    """Everything the data and params decide that would fail later, checked before a
    step is trained: the run's own settings, the base model, the data streams and
    buckets, and (unless the caller checked it: `--checked`) what evaluate will need of
    the data (its validation split)."""
    from components import evaluate, train_unet
    from components.train_unet.setup import check_environment, resolve_precision

    check_environment(resolve_precision(p.train))
    train_unet.check_data(p.train, latents, processes, model)
    if evaluate_too:
        evaluate.check_inputs(p.evaluate, latents)


def _launch(p, a) -> str:
    """Re-run this command as DDP processes under torchrun: `--num-processes` on this
    machine (one per GPU; gloo on CPU), or, under Kubeflow Trainer (PET_* set), this
    node's share of the job, torchrun taking the job's shape from PET_*. Settings are
    checked before (`check_before_training`), so a bad one fails once per node."""
    import subprocess

    argv, skip = [], False
    for arg in a.argv:
        if skip or arg.startswith("--num-processes"):
            skip = arg == "--num-processes" and not skip
            continue
        argv.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if "PET_NNODES" in os.environ:  # torchrun reads the job's shape from PET_*
        what = f"node {os.environ.get('PET_NODE_RANK', '?')} of {os.environ['PET_NNODES']}"
    else:
        cmd += ["--standalone", "--nproc_per_node", str(a.num_processes)]
        what = f"{a.num_processes} processes"
    done = subprocess.run([*cmd, "-m", "components.cli", *argv])
    if done.returncode:
        raise T2IError(f"training ({what}) failed (exit {done.returncode})")
    return f"trained ({what}); model -> {a.out}"


def _evaluate(p, a):
    from components import evaluate

    r = evaluate.run(p.evaluate, a.model, a.base_model, a.latents, a.out, a.metrics, a.shards)
    return r.summary() + f"; grid, metrics, report -> {a.out}"


def _publish(p, a):
    from components import publish

    return publish.run(p.publish, a.model, a.eval, a.out).summary()


def _store(p, a):
    from pipelines.store import gc, gc_objects

    uri = a.store or p.pipeline.store
    registry = Path(a.registry) if a.registry else None
    given = a.workspace or (None if uri else p.pipeline.workspace_path)
    workspace = Path(given) if given else None
    if workspace is not None and not workspace.is_dir():
        raise ConfigError(f"--workspace {workspace}: no such folder (the workspace, mounted)")
    lines = [gc(workspace, a.keep_runs, registry, delete=a.delete)] if workspace else []
    if uri:
        lines.append(gc_objects(uri, a.keep_runs, workspace, registry, delete=a.delete))
    return "\n".join(lines)


def _pipeline(p, a):
    from pipelines import commands

    return commands.dispatch(p, a)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: params.yaml)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (repeatable)",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = argparse.ArgumentParser(prog="t2i", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name, func, help_, **paths):
        sp = sub.add_parser(name, parents=[common], help=help_)
        for flag, default in paths.items():
            sp.add_argument(
                f"--{flag.replace('_', '-')}",
                dest=flag,
                type=str if flag == "source" else Path,  # a source may be a URI
                default=Path(default) if default else None,
            )
        sp.set_defaults(func=func)
        return sp

    stage("base-model", _base_model, "build or fetch the base model", out="artifacts/base-model")
    pack = stage(
        "pack", _pack, "images + captions -> WebDataset shards", source=None, out="data/shards"
    )
    pack.add_argument("--worker-index", type=int, help="pack only part i of the listing")
    pack.add_argument("--num-workers", type=int, help="n, with --worker-index (or --merge)")
    pack.add_argument("--merge", action="store_true", help="commit the workers' parts")
    cache = stage(
        "cache",
        _cache,
        "shards -> VAE latent moments + token ids",
        shards="data/shards",
        model="artifacts/base-model",
        out="data/latents",
    )
    cache.add_argument("--worker-index", type=int, help="encode only shards i, i+n, ...")
    cache.add_argument("--num-workers", type=int, help="n, with --worker-index")
    cache.add_argument("--merge", action="store_true", help="write the manifest from parts")
    train = stage(
        "train",
        _train,
        "fine-tune the UNet on cached latents",
        latents="data/latents",
        model="artifacts/base-model",
        out="artifacts/model",
        reports="artifacts/train",
        checkpoints="artifacts/checkpoints",
        metrics=None,
    )
    train.add_argument(
        "--num-processes", type=int, default=1, help="DDP processes (one per GPU; gloo on CPU)"
    )
    train.add_argument(
        "--checked",
        action="store_true",
        help="the caller checked the data against evaluate's settings (a pipeline's check)",
    )
    stage(
        "evaluate",
        _evaluate,
        "base vs fine-tuned: metrics, grid, report",
        model="artifacts/model",
        base_model="artifacts/base-model",
        latents="data/latents",
        shards="data/shards",
        out="artifacts/eval",
        metrics=None,
    )
    stage(
        "publish",
        _publish,
        "publish the model if the gate passed",
        model="artifacts/model",
        eval="artifacts/eval",
        out="artifacts/publish",
    )
    store = stage("store", _store, "the workspace's shard stores: garbage collection")
    store.add_argument("action", choices=["gc"])
    store.add_argument("--workspace", help="the workspace (default: pipeline.workspace_path)")
    store.add_argument("--store", help="an object store (default: pipeline.store)")
    store.add_argument("--keep-runs", type=int, default=5, help="runs whose shards are kept")
    store.add_argument("--registry", help="a registry folder: published versions' shards kept")
    store.add_argument("--delete", action="store_true", help="delete (default: a dry run)")
    pipe = stage("pipeline", _pipeline, "compile, run locally, submit or schedule the KFP DAG")
    pipe.add_argument(
        "action", choices=["compile", "run-local", "submit", "schedule", "trainjob", "runtime"]
    )
    pipe.add_argument(
        "--output",
        type=Path,
        help="compile: where to write (default: pipelines/compiled/finetune.yaml from "
        "params.yaml alone; with --set or another --params, artifacts/pipeline/finetune.yaml)",
    )
    pipe.add_argument(
        "--root",
        type=Path,
        default=Path("artifacts/kfp-local"),
        help="run-local: pipeline root for the local run's artifacts",
    )
    job = pipe.add_argument_group("trainjob (Kubeflow Trainer, without KFP)")
    job.add_argument("--name", help="the TrainJob's name (default: from pipeline.name)")
    for flag, what in (
        ("latents", "the latents"),
        ("model", "the base model"),
        ("out", "the trained model"),
        ("checkpoints", "the checkpoints"),
    ):
        job.add_argument(f"--{flag}", help=f"{what} on the shared volume (default: under "
                         "pipeline.workspace_path)")  # fmt: skip
    job.add_argument("--submit", action="store_true", help="create it in the kube context")
    job.add_argument("--wait", action="store_true", help="with --submit: follow it to the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error, naming the flag
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = args.debug or os.environ.get("T2I_DEBUG") == "1"
    if not debug:  # library chatter (e.g. "torchvision not installed") is not for users
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        params = load_params(args.params, args.overrides)
        message = args.func(params, args)
        if os.environ.get("RANK", "0") == "0":  # one line per command, not per process
            print(message)
        return 0
    except ConfigError as e:
        _fail(e, debug)
        return 2
    except KeyboardInterrupt:
        print("t2i: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        _fail(e, debug)
        return 1


def _fail(err: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    known = isinstance(err, T2IError)
    detail = first_line(err)
    cause = detail if known else f"{type(err).__name__}: {detail}"
    hint = "" if known or debug else " (run with --debug for the traceback)"
    print(f"t2i: error: {cause}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
