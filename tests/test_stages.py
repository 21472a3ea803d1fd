"""The one way components run a stage (pipelines/stages.py): the decision to train,
the run summary and its webhook, one-line failures, and a retried train pod resuming
from its checkpoint on the workspace."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.common.config import TrainConfig
from components.common.errors import ConfigError
from components.publish.latest import Published
from pipelines import stages
from pipelines.stages import Context, decide, run_stage, run_summary

KEY = {"source": "s3://d/x", "data_fingerprint": "a" * 64, "config_sha256": "b" * 64}


class Artifact(SimpleNamespace):
    """What KFP hands a component: a path, metadata, and log_metric for Metrics."""

    def __init__(self, path: Path):
        super().__init__(path=str(path), metadata={}, metrics={})

    def log_metric(self, key: str, value: float) -> None:
        self.metrics[key] = value


def published(run_key: dict) -> Published:
    return Published(3, "registry /ws/registry/m", {"run_key": run_key})


def test_decide_trains_only_when_data_or_config_changed():
    assert decide(KEY, None, "on_change") == (True, "nothing trained or published yet")
    same = published(KEY)
    assert decide(KEY, same, "on_change") == (
        False,
        "data and config unchanged since v3 (registry /ws/registry/m)",
    )
    assert decide(KEY, same, "always")[0] is True
    data = published({**KEY, "data_fingerprint": "c" * 64})
    assert decide(KEY, data, "on_change") == (
        True,
        "data changed since v3 (registry /ws/registry/m)",
    )
    config = published({**KEY, "config_sha256": "c" * 64})
    assert decide(KEY, config, "on_change")[1].startswith("config changed since v3")
    outside = published({})  # published by `dvc repro`: no run key to compare with
    assert decide(KEY, outside, "on_change")[0] is True
    # Only publish's settings changed (e.g. publish.from_experiments turned on): a run,
    # in which every stage before publish comes from KFP's cache.
    then = published({**KEY, "publish_sha256": "p" * 64})
    assert decide({**KEY, "publish_sha256": "q" * 64}, then, "on_change")[1].startswith(
        "publish settings changed since v3"
    )
    # What the last run decided (its record) is what a run compares with, not "newest".
    last = stages.LastRun(KEY, "run-7", None, False)
    assert decide(KEY, last, "on_change") == (
        False,
        "data and config unchanged since the last run (run-7: the gate failed, not published)",
    )
    with pytest.raises(ConfigError, match="retrain: 'sometimes' is neither"):
        decide(KEY, same, "sometimes")


def test_the_fingerprint_ignores_where_the_data_is_but_not_what_it_is(
    tmp_path, sample_source, monkeypatch
):
    from components.common.config import load_params

    def key_of(source: str, *sets: str) -> dict:
        params = load_params(None, [f"data.source={source}", *sets])
        sections = {s: getattr(params, s) for s in stages.SECTIONS}
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        ctx = Context(None, None)
        files = {n: str(out / n) for n in ("key", "reason", "data_key", "train_key")}
        stages.fingerprint(ctx, source, "on_change", **files, **sections)
        assert (out / "data_key").read_text() == json.loads((out / "key").read_text())[
            "data_fingerprint"
        ]
        assert (out / "train_key").read_text() == ""  # on_change: train's cache key is stable
        return json.loads((out / "key").read_text())

    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(sample_source, moved)
    a, b = key_of(str(sample_source)), key_of(str(moved))
    assert a["data_fingerprint"] == b["data_fingerprint"]
    assert a["config_sha256"] == b["config_sha256"]  # the path is not config
    assert key_of(str(moved), "train.learning_rate=5e-4")["config_sha256"] != a["config_sha256"]
    (moved / "0000.png").write_bytes(b"changed")
    assert key_of(str(moved))["data_fingerprint"] != a["data_fingerprint"]


def _note(run_dir: Path, stage: str, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{stage}.json").write_text(json.dumps({"stage": stage, **fields}))


def test_summary_says_what_ran_what_was_skipped_and_why(tmp_path):
    run = tmp_path / "runs" / "r1"
    _note(run, "fingerprint", status="done", summary="data changed since v1", changed=True)
    _note(run, "pack", status="done", summary="packed 64", written=2, shards=8)
    _note(run, "train", status="done", summary="trained 4 steps")
    _note(run, "evaluate", status="done", summary="gate passed", gate_passed=True)
    _note(run, "publish", status="done", summary="v2", published=True, version=2)
    doc = run_summary(run, "SUCCEEDED")
    assert doc["text"] == "run succeeded: published v2" and doc["published_version"] == 2
    assert doc["stages"]["cache"]["status"] == "cached"  # a KFP cache hit writes no note
    assert doc["stages"]["pack"]["written"] == 2

    unchanged = tmp_path / "runs" / "r2"
    why = "data and config unchanged since v2 (registry /ws/r)"
    _note(unchanged, "fingerprint", status="done", summary=why, changed=False)
    doc = run_summary(unchanged, "SUCCEEDED")
    assert doc["text"] == f"run succeeded: {why}; nothing trained"
    assert doc["stages"]["train"] == {"status": "skipped", "summary": why}

    failed = tmp_path / "runs" / "r3"
    _note(failed, "fingerprint", status="done", summary="nothing published yet", changed=True)
    _note(failed, "train", status="failed", summary="train.lr: bad")
    doc = run_summary(failed, "FAILED", "task train failed\nmore")
    assert doc["text"] == "run failed: train: train.lr: bad (task train failed)"
    assert doc["stages"]["train"]["status"] == "failed" and doc["failed_stage"] == "train"
    # The backend's exit handler gets MLMD states and an empty error: the cause comes
    # from the notes, and a stage that started but never finished is named.
    assert run_summary(failed, "FAILED", "")["text"] == "run failed: train: train.lr: bad"
    lost = tmp_path / "runs" / "r4"
    _note(lost, "fingerprint", status="done", summary="nothing published yet", changed=True)
    _note(lost, "train", status="running", summary="train started")
    doc = run_summary(lost, "FAILED", "")
    assert doc["text"].startswith("run failed: train: started and did not finish")
    for word in ("COMPLETE", "CACHED", "SUCCEEDED"):
        assert run_summary(run, word)["text"] == "run succeeded: published v2", word
    assert run_summary(run, "CANCELED")["outcome"] == "cancelled"
    # Without a workspace the summary still has the state, and says where to look.
    assert run_summary(None, "SUCCEEDED")["stages"]["pack"]["status"] == "unknown"


@pytest.fixture
def webhook():
    """A recording HTTP server on 127.0.0.1: every POST body; answers `codes` in turn."""
    seen, codes = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Content-Type"], json.loads(body)))
            self.send_response(codes.pop(0) if codes else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/t2i", seen, codes
    server.shutdown()


def test_the_summary_task_writes_the_summary_and_posts_it(tmp_path, webhook, monkeypatch, capsys):
    url, seen, codes = webhook
    monkeypatch.setenv("T2I_RUN_ID", "run-7")
    monkeypatch.setenv("T2I_NOTIFY_URL", url)
    _note(tmp_path / "ws" / "runs" / "run-7", "fingerprint", status="done", changed=False,
          summary="data and config unchanged since v3 (hub acme/shapes)")  # fmt: skip
    codes.append(503)  # the first post fails: retried
    status = {"state": "SUCCEEDED", "error": {}, "pipeline_task_name": "exit-handler-1"}
    from kfp.dsl import PipelineTaskFinalStatus

    final = PipelineTaskFinalStatus(status["state"], "job", "exit-handler-1", None, None)
    out = Artifact(tmp_path / "summary")
    run_stage(
        "summary",
        {"workspace": str(tmp_path / "ws"), "status": final, "summary": out, "run_stage": None},
    )
    doc = json.loads(Path(out.path).read_text())
    text = "run succeeded: data and config unchanged since v3 (hub acme/shapes); nothing trained"
    assert doc["text"] == text
    assert json.loads((tmp_path / "ws" / "runs" / "run-7" / "summary.json").read_text()) == doc
    assert len(seen) == 2
    path, kind, body = seen[-1]
    assert path == "/hooks/t2i" and kind == "application/json"
    assert body["text"] == text and body["summary"]["stages"]["train"]["status"] == "skipped"
    assert text in capsys.readouterr().out


def test_a_webhook_that_fails_is_a_warning_not_a_failure(webhook, capsys):
    url, seen, codes = webhook
    codes.extend([500, 500, 500])
    assert stages.notify(url, {"text": "run succeeded"}) is False
    assert len(seen) == 3
    assert "warning: the webhook did not take the summary" in capsys.readouterr().err


def test_a_bad_param_is_one_line_exit_2_and_a_failure_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("T2I_RUN_ID", "run-9")
    io = {
        "workspace": str(tmp_path / "ws"),
        "run_key": json.dumps(KEY),
        "model_params": json.dumps({"source": "tiny", "tiny_vae_steps": -1}),
        "base_model": Artifact(tmp_path / "base"),
    }
    with pytest.raises(SystemExit) as exit_:
        run_stage("base_model", io)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("base_model: ") and "model.tiny_vae_steps" in line
    note = json.loads((tmp_path / "ws" / "runs" / "run-9" / "base_model.json").read_text())
    assert note["status"] == "failed" and "tiny_vae_steps" in note["summary"]


def test_a_retried_train_pod_resumes_from_its_checkpoint_on_the_workspace(
    latents, tiny_model, tmp_path, monkeypatch
):
    """The first pod dies after its step-10 checkpoint; the retry (a new pod: fresh
    output folders, the same workspace and inputs) resumes at step 10."""
    from components.train_unet import checkpoints

    cfg = TrainConfig(
        train_batch_size=8, max_train_steps=20, checkpointing_steps=10, lr_scheduler="constant"
    )
    real_save = checkpoints.save

    def preempted(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("the node was preempted")  # not a T2IError: a crash

    def pod(attempt: int) -> dict:
        outs = {n: Artifact(tmp_path / f"attempt{attempt}" / n) for n in ("model", "reports")}
        return {
            "workspace": str(tmp_path / "ws"),
            "train_key": "",
            "train_params": json.dumps(cfg.model_dump()),
            "latents": Artifact(latents),
            "base_model": Artifact(tiny_model),
            "train_metrics": Artifact(tmp_path / f"attempt{attempt}" / "metrics"),
            **outs,
        }

    monkeypatch.setattr(checkpoints, "save", preempted)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", pod(1))
    monkeypatch.setattr(checkpoints, "save", real_save)
    retry = pod(2)
    run_stage("train", retry)
    assert retry["train_metrics"].metrics["resumed_from_step"] == 10
    assert retry["train_metrics"].metrics["steps"] == 20
    saved = list((tmp_path / "ws" / "checkpoints").glob("*/*/checkpoint-*"))
    assert {p.name for p in saved} >= {"checkpoint-10", "checkpoint-20"}
    # A run with retrain: always gets its own checkpoints: nothing to resume from.
    other = pod(3)
    other["train_key"] = "run-3"
    run_stage("train", other)
    assert other["train_metrics"].metrics["resumed_from_step"] == 0


def test_two_runs_take_turns_on_a_workspace_store(tmp_path, capsys, monkeypatch):
    """A store is locked while a stage writes it: the second run waits for the first."""
    import fcntl

    store = tmp_path / "ws" / "pack" / "abc"
    order, blocked = [], threading.Event()
    real_flock = fcntl.flock

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:  # the blocking wait, after the non-blocking try failed
            blocked.set()
        return real_flock(fd, operation)

    def second():
        with stages._locked(store):
            order.append("second")

    monkeypatch.setattr(stages.fcntl, "flock", flock)
    with stages._locked(store):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert blocked.wait(10)  # the second run is waiting on the lock now
        order.append("first done")
    waiter.join(timeout=5)
    assert order == ["first done", "second"]
    assert f"waiting for another run to finish with {store}" in capsys.readouterr().out


def test_a_retried_attempt_of_a_deterministic_failure_exits_at_once(tmp_path, monkeypatch, capsys):
    """KFP retries every non-zero exit; a failure a retry cannot fix (bad config or data)
    is noted as final, and the retried attempt exits with the same line at once."""
    monkeypatch.setenv("T2I_RUN_ID", "run-9")
    calls = []

    def pack(ctx, **kw):
        calls.append(1)
        raise ConfigError("pack.shard_max_samples: must be at least 1")

    monkeypatch.setitem(stages._STAGES, "pack", pack)
    io = {"workspace": str(tmp_path / "ws"), "source": "s", "data_key": "d"}
    for attempt in (1, 2):
        with pytest.raises(SystemExit) as exit_:
            run_stage("pack", dict(io))
        assert exit_.value.code == 2, attempt
    assert calls == [1]  # the second attempt never ran the stage
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == "pack: pack.shard_max_samples: must be at least 1 (failed before; not retried)"
    )


def test_the_workspace_pvc_is_made_sure_of_through_the_kubernetes_api(tmp_path, monkeypatch):
    from components.common.errors import T2IError
    from pipelines.kube import ensure_pvc

    from .k8s_server import KubeStandIn

    claim = {"size": "50Gi", "storage_class": "fast", "access_mode": "ReadWriteMany"}
    with KubeStandIn() as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path / "config")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with pytest.raises(T2IError, match="team/ws does not exist: create it .*workspace_create"):
            ensure_pvc("ws", None)
        assert (
            ensure_pvc("ws", claim) == "workspace PVC team/ws created (50Gi, fast, ReadWriteMany)"
        )
        (_, path, _, body) = k8s.calls("POST", "/api/v1/namespaces/team/persistentvolumeclaims")[0]
        assert body["spec"] == {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "50Gi"}},
            "storageClassName": "fast",
        }
        # A later run (whatever KFP's cache holds, whatever the pipeline is called) reuses it.
        assert ensure_pvc("ws", claim) == "workspace PVC team/ws exists (ReadWriteMany)"
        assert ensure_pvc("ws", None) == "workspace PVC team/ws exists (ReadWriteMany)"
        assert len(k8s.calls("POST", "/api/v1/")) == 1
        rwo = {**claim, "access_mode": "ReadWriteOnce"}
        assert "workspace_create asks for ReadWriteOnce" in ensure_pvc("ws", rwo)
        assert ensure_pvc("ws", None, shared=True)  # RWX: several train nodes may share it
        ensure_pvc("single", rwo)
        with pytest.raises(T2IError, match="single exists .ReadWriteOnce., but .* ReadWriteMany"):
            ensure_pvc("single", None, shared=True)
        k8s.forbidden.add("persistentvolumeclaim")
        with pytest.raises(T2IError, match="other: cannot create it .HTTP 403: .*forbidden"):
            ensure_pvc("other", claim)


def test_the_registrys_latest_is_what_was_last_published(trained, evaluation, tmp_path):
    """Publishing the weights of an existing version again makes it the latest (data
    that went back to what v1 was trained on), without a new number."""
    from components import publish
    from components.common.config import PublishConfig
    from components.publish.registry import latest_version

    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    root = tmp_path / "registry" / "m"
    assert latest_version(str(root))[0] == 1
    (root / "2").mkdir()  # a newer version (another model), as a later publish leaves it
    for f in (root / "1").iterdir():
        if f.is_file():
            (root / "2" / f.name).write_bytes(f.read_bytes())
    receipt = json.loads((root / "2" / "receipt.json").read_text())
    (root / "2" / "receipt.json").write_text(json.dumps({**receipt, "unet_sha256": "other"}))
    (root / "latest.json").write_text('{"version": 2}')
    assert latest_version(str(root))[0] == 2
    again = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert again.local.version == 1 and not again.local.new
    assert latest_version(str(root))[0] == 1


def test_the_dags_check_task_fails_before_train_with_one_line(
    latents, tiny_model, tmp_path, monkeypatch, capsys
):
    from components.common.config import EvaluateConfig

    monkeypatch.setenv("T2I_RUN_ID", "run-5")
    io = {
        "workspace": str(tmp_path / "ws"),
        "processes": 1,
        "train_params": json.dumps(TrainConfig().model_dump()),
        "evaluate_params": json.dumps(EvaluateConfig(heldout_captions=99).model_dump()),
        "latents": Artifact(latents),
        "base_model": Artifact(tiny_model),
    }
    with pytest.raises(SystemExit) as exit_:
        run_stage("check", io)
    assert exit_.value.code == 2
    note = json.loads((tmp_path / "ws" / "runs" / "run-5" / "check.json").read_text())
    assert note["status"] == "failed" and "evaluate.heldout_captions=99" in note["summary"]
    doc = run_summary(tmp_path / "ws" / "runs" / "run-5", "FAILED", "")
    assert doc["text"].startswith("run failed: check: evaluate.heldout_captions=99")


@pytest.mark.slow
def test_a_pod_with_two_gpus_caches_and_trains_with_two_processes(
    latents, shards, tiny_model, tmp_path, monkeypatch
):
    """`resources.<stage>.gpus: 2` in one pod: cache and train run as 2 torchrun
    processes (gloo here), the cache encoding the same shards as one process and
    train the global batches of one process with `data_streams: 2`."""
    import torch
    from safetensors.torch import load_file

    from components import train_unet
    from components.common.config import load_params
    from pipelines.finetune import launch_spec

    from .conftest import CACHE, TRAIN

    monkeypatch.setenv("T2I_RUN_ID", "run-2gpu")
    ws = tmp_path / "ws"
    out = Artifact(tmp_path / "latents")
    run_stage("cache", {"workspace": str(ws), "processes": 2,
                        "cache_params": json.dumps(CACHE.model_dump()),
                        "shards": Artifact(shards), "base_model": Artifact(tiny_model),
                        "latents": out})  # fmt: skip
    got = json.loads((Path(out.path) / "manifest.json").read_text())["shards"]
    want = json.loads((latents / "manifest.json").read_text())["shards"]
    assert [s["key"] for s in got] == [s["key"] for s in want]

    cfg = TRAIN.model_copy(update={"max_train_steps": 3, "report_to": "none", "data_streams": 2,
                                   "train_batch_size": 4, "shuffle_buffer": 8})  # fmt: skip
    two = load_params(None, ["pipeline.resources.train.gpus=2"]).pipeline
    io = {
        "workspace": str(ws),
        "train_key": "",
        "launch": launch_spec(two),
        "train_params": json.dumps(cfg.model_dump()),
        "latents": Artifact(latents),
        "base_model": Artifact(tiny_model),
        "model": Artifact(tmp_path / "two" / "model"),
        "reports": Artifact(tmp_path / "two" / "reports"),
        "train_metrics": Artifact(tmp_path / "two" / "metrics"),
    }
    run_stage("train", io)
    assert io["train_metrics"].metrics["steps"] == 3
    one = cfg.model_copy(update={"train_batch_size": 8})
    train_unet.run(one, latents, tiny_model, tmp_path / "one", tmp_path / "r", tmp_path / "c")
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "two" / "model" / unet), load_file(tmp_path / "one" / unet)
    base = load_file(tiny_model / unet)

    def norm(x, y):
        return sum((x[k] - y[k]).double().pow(2).sum().item() for k in x) ** 0.5

    assert norm(a, b) / norm(b, base) < 0.01 and torch.is_tensor(next(iter(a.values())))
