"""Multi-node training's cost on this machine: the TrainJob launcher's overhead, and a
2-"node" run's step against one process, with the baseline in the same run.

- launcher: the KFP train task with `nodes: 2`, against the Kubernetes API stand-in of
  the tests (which runs the TrainJob as 2 local `t2i train` processes, PET_* set),
  timed from the task's start to the TrainJob's creation, to node 0's first training
  step (its first progress line), and to the task's end;
- steps: the same config trained by one process (`data_streams: 2`, batch 2B) and by
  2 nodes of one gloo process each (batch B): img/s of each, from the runs' own
  train_metrics.json.

    python bench/trainjob.py --steps 40 --json docs/bench-results/trainjob-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="per node (one process: twice)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per node (0: default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from make_sample import make_sample

    from components import base_model, cache_latents, pack_shards, train_unet
    from components.common.config import (
        CacheConfig,
        DataConfig,
        ModelConfig,
        PackConfig,
        TrainConfig,
    )
    from tests.k8s_server import KubeStandIn, LocalTrainer
    from tests.test_trainjob import pod_io

    root = Path(tempfile.mkdtemp(prefix="bench-trainjob-"))
    make_sample(root / "src", 96)
    base_model.run(ModelConfig(tiny_vae_steps=8), root / "base")
    pack_shards.run(DataConfig(), PackConfig(val_fraction=0.1, shard_max_samples=16),
                    root / "src", root / "shards")  # fmt: skip
    cache_latents.run(CacheConfig(resolution=32), root / "shards", root / "base", root / "lat")
    cfg = TrainConfig(max_train_steps=args.steps, train_batch_size=2 * args.batch,
                      data_streams=2, checkpointing_steps=10_000, report_to="none")  # fmt: skip
    t0 = time.perf_counter()
    one = train_unet.run(cfg, root / "lat", root / "base", root / "one" / "m", root / "one" / "r",
                         root / "one" / "c")  # fmt: skip
    one_wall = time.perf_counter() - t0

    results = [{"bench": "one process, data_streams 2", "batch": 2 * args.batch,
                "img_s": one.images_per_second, "wall_s": round(one_wall, 1)}]  # fmt: skip
    with KubeStandIn() as k8s:
        env = {**os.environ, "T2I_PROGRESS_EVERY_S": "0.2", "PYTHONPATH": str(REPO)}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        trainer = LocalTrainer(k8s, env=env)
        k8s.on_trainjob = trainer
        (root / "kubeconfig").write_text("")
        os.environ.update(KUBECONFIG=str(k8s.kubeconfig(root / "kubeconfig")),
                          T2I_RUN_ID="bench-1", T2I_POLL_S="0.2")  # fmt: skip
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        from pipelines.stages import run_stage

        io = pod_io(str(root / "ws"), str(root / "lat"), str(root / "base"), str(root / "out"))
        train = json.loads(io["train_params"])
        train.update(max_train_steps=args.steps, train_batch_size=args.batch,
                     checkpointing_steps=10_000, data_streams=None)  # fmt: skip
        io["train_params"] = json.dumps(train)
        started = time.monotonic()
        run_stage("train", io)
        ended = time.monotonic() - started
        created = next(
            t - started
            for r, t in zip(k8s.requests, k8s.times, strict=True)
            if r[0] == "POST" and r[1].endswith("/trainjobs")
        )
        metrics = io["train_metrics"].metrics
    first_step = trainer.first_step_at - started - created
    results.append({"bench": "2 nodes x 1 process (TrainJob through the launcher)",
                    "batch": args.batch, "img_s": metrics["images_per_second"],
                    "task_wall_s": round(ended, 1)})  # fmt: skip
    results.append({"bench": "launcher overhead", "task_start_to_trainjob_created_s":
                    round(created, 2), "created_to_node0_first_step_s": round(first_step, 1),
                    "threads_per_node": args.threads})  # fmt: skip
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "steps": args.steps}) + "\n")


if __name__ == "__main__":
    main()
