"""Training on many nodes through Kubeflow Trainer v2.3: the TrainJob, and its launcher.

Kubeflow Trainer (`trainer.kubeflow.org/v1alpha1`, v2.3; `runtimePatches` is the pod
patch field's name since v2.2) runs `t2i train` on `numNodes` nodes. Its torch plugin
gives every node `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`
and `PET_MASTER_PORT`; `t2i train` starts torchrun with them, so N nodes x G processes
train the global batches of one process with `data_streams: N*G`. The nodes read the
latents and base model from, and write checkpoints and the model to, the workspace
volume (ReadWriteMany); rank 0 writes the checkpoints.

The launcher (the KFP train task with `nodes > 1`, and `t2i pipeline trainjob
--submit --wait`) uses the `kubernetes` client directly, which the project already has
(kfp depends on it): a deterministic name, `runtimePatches` for the volumes and
a plain create/get/delete is all it needs, where the kubeflow SDK's TrainerClient
would add a dependency, look up runtimes and name jobs itself. It:
- creates the TrainJob, or re-attaches to it (a retried launcher pod finds its own);
- follows it with no time-out of its own (a job may wait suspended in a Kueue queue,
  then train for days; `pipeline.trainer.active_deadline_seconds` bounds it if set);
- streams node 0's log into its own;
- on `Failed`, fails with the condition's reason and message; on SIGTERM (the run
  cancelled) or its own failure, deletes the TrainJob.
Trainer v2 has no elastic training (v1's ElasticPolicy is gone): a lost node fails the
job, which the runtime's JobSet failurePolicy restarts whole (`max_restarts`); every
node then resumes from the last checkpoint on the shared volume.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.common.config import Params
from components.common.errors import T2IError, first_line
from pipelines.kube import api_reason

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINER_RELEASE = "v2.3.0"
MANAGER = "t2i-pipeline"
NODE = "node"  # the replicated job and container of the torch runtime
# What the Trainer sets on every node; never set by us (it would be overwritten, or worse).
PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, at most 63


class JobFailed(T2IError):
    """The TrainJob ran and failed (its condition's reason and message)."""


def job_name(prefix: str, run_id: str, task: str = "train") -> str:
    """The TrainJob's name: the same for every attempt of one run's task (a retried
    launcher re-attaches), an RFC 1035 label of at most 63 characters."""
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    stem = re.sub(r"^[^a-z]+", "", stem)[: 63 - len(task) - len(digest) - 2].rstrip("-")
    name = f"{stem or 't2i'}-{task}-{digest}"
    assert _NAME.match(name), name
    return name


@dataclass(frozen=True)
class JobPaths:
    """Where the job's nodes find their inputs and put their outputs (on the volume)."""

    latents: Path
    base_model: Path
    model: Path
    reports: Path
    checkpoints: Path

    @property
    def metrics(self) -> Path:
        return self.reports

    @classmethod
    def under(cls, root: Path, checkpoints: Path) -> JobPaths:
        """A launcher's layout: `<root>/inputs/{latents,base-model}`, `<root>/model`, ..."""
        root = Path(root)
        return cls(
            root / "inputs" / "latents",
            root / "inputs" / "base-model",
            root / "model",
            root / "reports",
            Path(checkpoints),
        )


def train_args(train, paths: JobPaths, checked: bool = True) -> list[str]:
    """`t2i train`'s arguments on every node. The train section travels in the args:
    `--params /dev/null` (the schema's defaults) and a `--set` per key that differs
    (JSON values, which YAML reads back as they were), so the job needs no file of
    ours on the volume and `kubectl describe` shows the whole config."""
    from components.common.config import TrainConfig

    defaults = TrainConfig().model_dump(mode="json")
    args = ["train", "--params", "/dev/null"]
    for key, value in sorted(train.model_dump(mode="json").items()):
        if value != defaults.get(key):
            args += ["--set", f"train.{key}={json.dumps(value)}"]
    args += ["--latents", str(paths.latents), "--model", str(paths.base_model)]
    args += ["--out", str(paths.model), "--reports", str(paths.reports)]
    args += ["--checkpoints", str(paths.checkpoints), "--metrics", str(paths.metrics)]
    return args + (["--checked"] if checked else [])


def manifest(params: Params, name: str, args: list[str], namespace: str | None = None) -> dict:
    """The TrainJob for `params` (pipeline.resources.train, pipeline.trainer, the image,
    the workspace PVC and secrets by name), running `t2i <args>` on every node."""
    p = params.pipeline
    res = p.resources["train"]
    quantities: dict[str, str] = {}
    if res.cpu:
        quantities["cpu"] = res.cpu
    if res.memory:
        quantities["memory"] = res.memory
    if res.gpus:
        quantities[res.accelerator] = str(res.gpus)
    if res.ephemeral_storage:
        quantities["ephemeral-storage"] = res.ephemeral_storage
    env = [
        {"name": "T2I_IMAGE", "value": p.image},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "T2I_HASH_CACHE", "value": f"{p.workspace_path}/.hashes"},
    ]
    if "@" in p.image:
        env.append({"name": "T2I_IMAGE_DIGEST", "value": p.image.split("@", 1)[1]})
    if p.hf_token_secret:
        ref = {"name": p.hf_token_secret.name, "key": p.hf_token_secret.key}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    if p.store and p.storage_secret:  # the nodes read the latents from the object store
        for key in p.storage_secret.keys:
            ref = {"name": p.storage_secret.name, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    labels = {"app.kubernetes.io/part-of": "t2i-pipeline", "app.kubernetes.io/name": p.name[:63]}
    if p.trainer.queue:
        labels[QUEUE_LABEL] = p.trainer.queue
    job: dict = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "runtimeRef": {
                "name": p.trainer.runtime,
                "apiGroup": GROUP,
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": {
                "image": p.image,
                "command": ["t2i"],
                "args": list(args),
                "numNodes": res.nodes,
                "numProcPerNode": max(1, res.gpus),
                "resourcesPerNode": {"requests": dict(quantities), "limits": dict(quantities)},
                "env": env,
            },
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": _patch(params)}],
        },
    }
    if namespace:
        job["metadata"]["namespace"] = namespace
    if p.trainer.active_deadline_seconds:
        job["spec"]["activeDeadlineSeconds"] = p.trainer.active_deadline_seconds
    return job


def _patch(params: Params) -> dict:
    """The pod patch: the workspace (and data) PVC and /dev/shm, node selector and
    tolerations of the train stage."""
    p = params.pipeline
    res = p.resources["train"]
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": p.workspace_pvc}}]
    mounts = [{"name": "workspace", "mountPath": p.workspace_path}]
    if res.shm_size:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    pod: dict = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    return {
        "template": {
            "spec": {
                "replicatedJobs": [
                    {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
                ]
            }
        }
    }


def runtime_manifest(params: Params) -> dict:
    """Our ClusterTrainingRuntime (`pipeline.trainer.runtime`): Trainer's torch-distributed
    runtime with a JobSet failurePolicy that restarts the whole job `max_restarts` times
    when a node fails, and Jobs that never retry a pod themselves (backoffLimit 0), so a
    restart is always every node together, resuming from the shared checkpoint."""
    p = params.pipeline
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": p.trainer.runtime, "labels": {f"{GROUP}/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": p.trainer.max_restarts},
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {
                                    "labels": {f"{GROUP}/trainjob-ancestor-step": "trainer"}
                                },
                                "spec": {
                                    "backoffLimit": 0,
                                    "template": {
                                        "spec": {
                                            "restartPolicy": "Never",
                                            "containers": [{"name": NODE, "image": p.image}],
                                        }
                                    },
                                },
                            },
                        }
                    ],
                }
            },
        },
    }


# -- following a job ---------------------------------------------------------------------


def condition(job: dict, kind: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


class Launcher:
    """Creates (or re-attaches to) a TrainJob and follows it to the end."""

    def __init__(self, api, namespace: str, log: Callable[[str], None] = print, poll_s=10.0):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace, self.log, self.poll_s = namespace, log, poll_s
        self._stop = threading.Event()

    def submit(self, job: dict) -> bool:
        """Create `job`; False when it exists already (this launcher re-attaches)."""
        from kubernetes.client.rest import ApiException

        name = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
        except ApiException as e:
            if e.status == 409:
                where = f"{self.namespace}/{name}"
                self.log(f"trainjob: re-attaching to {where} (an earlier attempt made it)")
                return False
            raise T2IError(
                f"TrainJob {self.namespace}/{name}: cannot create it ({api_reason(e)})"
            ) from e
        self.log(f"trainjob: created {self.namespace}/{name}")
        return True

    def get(self, name: str) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as e:
            raise T2IError(
                f"TrainJob {self.namespace}/{name}: cannot read it ({api_reason(e)})"
            ) from e

    def delete(self, name: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
            self.log(f"trainjob: deleted {self.namespace}/{name}")
        except ApiException as e:
            if e.status != 404:
                self.log(f"trainjob: warning: could not delete {name} ({api_reason(e)})")

    def follow(self, name: str) -> dict:
        """Wait for `name` to complete (streaming node 0's log); the finished job.
        T2IError with the Failed condition's reason and message when it fails."""
        logs = threading.Thread(target=self._stream_node0, args=(name,), daemon=True)
        logs.start()
        said_suspended = False
        try:
            while True:
                job = self.get(name)
                if condition(job, "Complete"):
                    return job
                failed = condition(job, "Failed")
                if failed:
                    reason, message = failed.get("reason", "Failed"), failed.get("message", "")
                    raise JobFailed(
                        f"TrainJob {self.namespace}/{name} failed: {reason}: {first_line(message)}"
                    )
                if condition(job, "Suspended") and not said_suspended:
                    queue = job["metadata"].get("labels", {}).get(QUEUE_LABEL)
                    where = f" in Kueue queue {queue}" if queue else ""
                    self.log(f"trainjob: {name} is suspended{where}, waiting to be admitted")
                    said_suspended = True
                time.sleep(self.poll_s)
        finally:
            self._stop.set()
            logs.join(timeout=5)

    def _stream_node0(self, name: str) -> None:
        """Node 0's log, line by line, into ours; again when its pod is replaced (a
        restarted job)."""
        selector = (
            f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0"
        )
        seen: set[str] = set()
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
                fresh = [p for p in pods.items if p.metadata.name not in seen]
                if not fresh:
                    self._stop.wait(self.poll_s)
                    continue
                pod = fresh[0].metadata.name
                seen.add(pod)
                stream = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container=NODE, follow=True, _preload_content=False
                )
                for line in stream.stream():
                    for text in line.decode("utf-8", "replace").splitlines():
                        self.log(f"[{name} node 0] {text}")
                    if self._stop.is_set():
                        break
            except Exception:  # a log that cannot be read is not the job's failure
                self._stop.wait(self.poll_s)


def run_job(launcher: Launcher, job: dict) -> dict:
    """Create or re-attach, follow to the end; delete the job on SIGTERM (the run was
    cancelled) or on the launcher's own failure, keep it when it failed (its pods and
    logs are what a user looks at). The finished job."""
    name = job["metadata"]["name"]

    def cancelled(signum, frame):
        launcher.log(f"trainjob: cancelled (signal {signum})")
        sys.exit(143)  # through the handler below, which deletes the job

    previous = signal.signal(signal.SIGTERM, cancelled)
    try:
        launcher.submit(job)
        return launcher.follow(name)
    except JobFailed:
        raise
    except BaseException:
        launcher.delete(name)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
