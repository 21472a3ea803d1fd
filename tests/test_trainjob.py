"""Many nodes through Kubeflow Trainer v2.3: the TrainJob manifest against the CRD
schema, the compiled DAG, and the launcher against a Kubernetes API stand-in that runs
a created TrainJob as local `t2i train` processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from components.common.config import load_params
from components.common.errors import ConfigError
from pipelines import trainjob
from pipelines.commands import compile_pipeline

from .conftest import REPO, TRAIN
from .k8s_server import KubeStandIn, LocalTrainer
from .test_pipeline import all_tasks, k8s_of, load

CRDS = json.loads((Path(__file__).parent / "data" / "trainer-v2.3.0-crds.json").read_text())
DIGEST = "ghcr.io/acme/t2i-pipeline@sha256:" + "ab" * 32
MULTI = [
    "pipeline.resources.train.nodes=2",
    "pipeline.resources.train.gpus=8",
    f"pipeline.image={DIGEST}",
    "pipeline.hf_token_secret={name: hf-token, key: token}",
    "pipeline.trainer.queue=gpu-queue",
    "pipeline.trainer.active_deadline_seconds=172800",
    "pipeline.resources.train.node_selector={gpu: h100}",
    "pipeline.resources.train.tolerations=[{key: nvidia.com/gpu, operator: Exists}]",
]


def validate(kind: str, obj: dict) -> None:
    """Against the v2.3.0 CRD's schema; and every field must be one the schema
    declares (the API server would silently drop an unknown one, as it did the pod
    patch fields renamed between v2.0 and v2.2)."""
    crd = CRDS["crds"][kind]
    assert obj["apiVersion"] == f"{crd['group']}/{crd['version']}"
    jsonschema.validate(obj, crd["schema"])

    def known(value, schema, where):
        if isinstance(value, dict) and "properties" in schema:
            for key, inner in value.items():
                if where == "" and key in ("apiVersion", "kind", "metadata"):
                    continue
                assert key in schema["properties"], f"{where}.{key}: not in the {kind} schema"
                known(inner, schema["properties"][key], f"{where}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for item in value:
                known(item, schema["items"], where + "[]")

    known(obj, crd["schema"], "")


def test_the_trainjob_manifest_is_a_valid_v2_3_trainjob(tmp_path):
    params = load_params(
        REPO / "params.yaml", [*MULTI, "pipeline.resources.train.ephemeral_storage=100Gi"]
    )
    name = trainjob.job_name(params.pipeline.name, "run-" + "x" * 80)
    paths = trainjob.JobPaths.under(Path("/workspace/trainjobs") / name, Path("/workspace/ck"))
    job = trainjob.manifest(params, name, trainjob.train_args(params.train, paths))
    validate("TrainJob", job)
    assert len(name) <= 63 and trainjob._NAME.match(name)
    assert name == trainjob.job_name(params.pipeline.name, "run-" + "x" * 80)  # retries agree
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "t2i-torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    t = spec["trainer"]
    assert t["image"] == DIGEST and t["numNodes"] == 2 and t["numProcPerNode"] == 8
    quantities = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8", "ephemeral-storage": "100Gi"}
    assert t["resourcesPerNode"]["limits"] == t["resourcesPerNode"]["requests"] == quantities
    assert t["command"] == ["t2i"] and t["args"][0] == "train"
    env = {e["name"]: e for e in t["env"]}
    assert not set(env) & set(trainjob.PET)  # the Trainer's to set
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert spec["activeDeadlineSeconds"] == 172800
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    (patch,) = spec["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    pod = pod["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {
        "name": "workspace",
        "persistentVolumeClaim": {"claimName": "t2i-workspace"},
    }
    assert pod["containers"][0]["volumeMounts"][0] == {
        "name": "workspace",
        "mountPath": "/workspace",
    }
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["operator"] == "Exists"
    text = yaml.safe_dump(job)
    assert "hf_" not in text and "&id" not in text  # no secret value, no YAML aliases
    # The train section travels in the args, and reads back as it was.
    sets = [a.split("=", 1) for a in t["args"] if a.startswith("train.")]
    back = load_params(None, ["=".join(s) for s in sets]).train
    assert back == params.train


def test_the_runtime_manifest_is_valid_and_the_committed_one_is_current():
    params = load_params(REPO / "params.yaml")
    runtime = trainjob.runtime_manifest(params)
    validate("ClusterTrainingRuntime", runtime)
    template = runtime["spec"]["template"]["spec"]
    assert template["failurePolicy"] == {"maxRestarts": 3}
    assert template["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] == 0
    committed = yaml.safe_load((REPO / "pipelines/k8s/trainer-runtime.yaml").read_text())
    assert committed == runtime, (
        "run `t2i pipeline runtime --output pipelines/k8s/trainer-runtime.yaml`"
    )


def test_the_dag_trains_on_every_gpu_of_the_pod_or_launches_on_many_nodes(tmp_path):
    four = load_params(REPO / "params.yaml", ["pipeline.resources.train.gpus=4"])
    spec, _ = load(compile_pipeline(four, tmp_path / "four.yaml"))
    train = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["resources"]
    assert train["accelerator"]["resourceCount"] == "4"
    launch = all_tasks(spec)["train-op"]["inputs"]["parameters"]["launch"]
    assert json.loads(launch["runtimeValue"]["constant"])["resources"]["train"]["gpus"] == 4
    check = all_tasks(spec)["check-op"]["inputs"]["parameters"]["processes"]
    assert check["runtimeValue"]["constant"] == 4

    many = load_params(REPO / "params.yaml", MULTI)
    spec, platform = load(compile_pipeline(many, tmp_path / "many.yaml"))
    train = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]["resources"]
    assert "accelerator" not in train  # the launcher: its TrainJob's nodes get the GPUs
    assert "emptyDirMounts" not in k8s_of(platform)["exec-train-op"]
    (mount,) = k8s_of(platform)["exec-train-op"]["pvcMount"]  # it stages the inputs
    assert mount["mountPath"] == "/workspace"
    check = all_tasks(spec)["check-op"]["inputs"]["parameters"]["processes"]
    assert check["runtimeValue"]["constant"] == 16  # 2 nodes x 8


def test_many_nodes_need_a_shared_workspace():
    with pytest.raises(ConfigError, match="needs a ReadWriteMany workspace"):
        load_params(None, ["pipeline.resources.train.nodes=2",
                           "pipeline.workspace_create={storage_class: fast}"])  # fmt: skip
    with pytest.raises(ConfigError, match="needs pipeline.workspace_pvc"):
        load_params(None, ["pipeline.resources.train.nodes=2", "pipeline.workspace_pvc=null"])
    with pytest.raises(ConfigError, match="resources.cache.nodes: only train"):
        load_params(None, ["pipeline.resources.cache.nodes=2"])


# -- the launcher against the stand-in ----------------------------------------------------

_LAUNCH = """
import json, sys
from pipelines.stages import run_stage
from tests.test_trainjob import pod_io
run_stage("train", pod_io(*json.loads(sys.argv[1])))
"""


class Artifact:
    def __init__(self, path):
        self.path, self.metadata, self.metrics = str(path), {}, {}

    def log_metric(self, key, value):
        self.metrics[key] = value


def pod_io(workspace: str, latents: str, base: str, out: str, nodes: int = 2) -> dict:
    """A train pod's inputs, as KFP hands them to the component."""
    sets = [f"pipeline.resources.train.nodes={nodes}", "pipeline.resources.train.gpus=0"]
    params = load_params(None, [*sets, f"pipeline.workspace_path={workspace}"])
    from pipelines.finetune import launch_spec

    cfg = TRAIN.model_copy(update={"max_train_steps": 4, "checkpointing_steps": 2,
                                   "train_batch_size": 4, "report_to": "none"})  # fmt: skip
    return {
        "workspace": workspace,
        "train_key": "",
        "launch": launch_spec(params.pipeline),
        "train_params": json.dumps(cfg.model_dump()),
        "latents": Artifact(latents),
        "base_model": Artifact(base),
        "model": Artifact(Path(out) / "model"),
        "reports": Artifact(Path(out) / "reports"),
        "train_metrics": Artifact(Path(out) / "metrics"),
    }


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The stand-in, with the launcher's kube context pointed at it."""
    with KubeStandIn() as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("T2I_RUN_ID", "run-42")
        monkeypatch.setenv("T2I_POLL_S", "0.2")
        yield k8s


def launch_in_subprocess(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, json.dumps([str(a) for a in args])],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_the_launcher_trains_on_two_nodes_and_a_retried_launcher_reattaches(
    cluster, latents, tiny_model, tmp_path
):
    """The first launcher pod dies (SIGKILL) after creating the TrainJob; its retry
    re-attaches to that job (one created), follows it to Complete, streams node 0's
    log and puts the trained model, which diffusers loads, in its KFP output."""
    from pipelines.stages import run_stage

    cluster.on_trainjob = LocalTrainer(cluster)
    ws = tmp_path / "ws"
    args = (ws, latents, tiny_model, tmp_path / "attempt1")
    first = launch_in_subprocess(args)
    wait_for(lambda: cluster.calls("POST", "/apis/trainer.kubeflow.org/"))
    first.kill()
    first.wait()
    io = pod_io(str(ws), str(latents), str(tiny_model), str(tmp_path / "attempt2"))
    run_stage("train", io)
    creates = cluster.calls("POST", "/apis/trainer.kubeflow.org/")
    assert len(creates) == 2 and len([o for o in cluster.objects if o[0] == "trainjob"]) == 1
    assert io["train_metrics"].metrics["steps"] == 4
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(io["model"].path)
    assert pipe.unet is not None
    (job,) = [o for k, o in cluster.objects.items() if k[0] == "trainjob"]
    args = job["spec"]["trainer"]["args"]
    assert "--checked" in args and args[args.index("--latents") + 1].startswith(str(ws))
    log = cluster.logs[("team", f"{job['metadata']['name']}-node-0-0-abcde")]
    assert "train:" in log  # node 0's progress lines reached the launcher's log


def test_a_failed_node_fails_the_task_in_one_line_and_keeps_the_job(
    cluster, latents, tiny_model, tmp_path, capsys
):
    from pipelines.stages import run_stage

    def fail(job):
        cluster.set_status(job["metadata"]["namespace"], job["metadata"]["name"], [
            {"type": "Failed", "status": "True", "reason": "JobFailed",
             "message": "jobset failed: node 1 exited with code 1\nmore"}])  # fmt: skip

    cluster.on_trainjob = fail
    io = pod_io(str(tmp_path / "ws"), str(latents), str(tiny_model), str(tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_:
        run_stage("train", io)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train: TrainJob team/t2i-finetune-train-")
    assert err[-1].endswith("failed: JobFailed: jobset failed: node 1 exited with code 1")
    assert not cluster.calls("DELETE", "/apis/")  # its pods and logs are what a user reads


def test_sigterm_deletes_the_trainjob(cluster, latents, tiny_model, tmp_path):
    launcher = launch_in_subprocess((tmp_path / "ws", latents, tiny_model, tmp_path / "o"))
    wait_for(lambda: cluster.calls("POST", "/apis/trainer.kubeflow.org/"))
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)  # the run was cancelled
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 143, out
    (delete,) = cluster.calls("DELETE", "/apis/trainer.kubeflow.org/")
    assert delete[1].endswith("/trainjobs/" + trainjob.job_name("t2i-finetune", "run-42"))
    assert not [k for k in cluster.objects if k[0] == "trainjob"]


def test_t2i_pipeline_trainjob_prints_submits_and_waits(cluster, tmp_path, capsys):
    from components.cli import main

    sets = ["--set", "pipeline.resources.train.nodes=2", "--set", "pipeline.resources.train.gpus=0"]
    assert main(["pipeline", "trainjob", *sets, "--name", "manual-1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("TrainJob manual-1")[0])
    validate("TrainJob", printed)
    assert main(["pipeline", "trainjob", *sets, "--name", "manual-1", "--output",
                 str(tmp_path / "job.yaml")]) == 0  # fmt: skip
    assert yaml.safe_load((tmp_path / "job.yaml").read_text()) == printed
    assert main(["pipeline", "trainjob", *sets, "--name", "manual-1", "--submit"]) == 0
    assert ("trainjob", "team", "manual-1") in cluster.objects
    cluster.on_trainjob = None
    cluster.set_status("team", "manual-1", [{"type": "Complete", "status": "True"}])
    assert main(["pipeline", "trainjob", *sets, "--name", "manual-1", "--submit", "--wait"]) == 0
    assert "complete" in capsys.readouterr().out
