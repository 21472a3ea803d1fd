"""`t2i pipeline submit / schedule` against a local HTTP server that records requests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from components.common.config import load_params
from components.common.errors import ConfigError
from pipelines import commands

REPO = Path(__file__).resolve().parents[1]


class Backend:
    """What the fake server says of itself: its release on the v1beta1 healthz."""

    tag_name = "2.15.0"


@pytest.fixture
def kfp_api():
    """A fake KFP API: answers every call, remembers (method, path, json body); the
    v1beta1 healthz carries the release tag as the real API server's does."""
    seen: list[tuple[str, str, dict]] = []
    backend = Backend()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            path = self.path.split("?")[0]
            seen.append((self.command, path, body))
            reply = {
                "experiment_id": "exp-1",
                "run_id": "run-1",
                "recurring_run_id": "job-1",
                "experiments": [{"experiment_id": "exp-1", "display_name": "t2i-finetune"}],
            }
            if path == "/apis/v1beta1/healthz":
                reply = {"commit_sha": "abc", "tag_name": backend.tag_name, "multi_user": False}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen, backend
    server.shutdown()


def posts(seen, path):
    return [body for method, p, body in seen if method == "POST" and p == path]


def test_submit_posts_the_compiled_pipeline_into_the_experiment(kfp_api):
    host, seen, _ = kfp_api
    params = load_params(REPO / "params.yaml", [f"pipeline.host={host}"])
    assert commands.submit(params) == "run-1"
    (run,) = posts(seen, "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-1"
    body = run["pipeline_spec"]
    # With a Kubernetes platform spec the client sends both, side by side.
    spec = body.get("pipeline_spec", body)
    assert spec["pipelineInfo"]["name"] == params.pipeline.name
    executors = body["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "emptyDirMounts" in executors["exec-train-op"]
    assert "pvcMount" in executors["exec-train-op"]
    assert set(spec["root"]["dag"]["tasks"]) == {"workspace-op", "exit-handler-1", "summary-op"}
    # The data fingerprint is computed in the cluster by the DAG's first task: the client
    # sends no argument for it (nor any other), so the run takes the compiled defaults.
    assert run["runtime_config"]["parameters"] == {}
    assert "source_fingerprint" not in spec["root"]["inputDefinitions"]["parameters"]


def test_schedule_creates_one_recurring_run_with_the_cron(kfp_api):
    host, seen, _ = kfp_api
    params = load_params(
        REPO / "params.yaml", [f"pipeline.host={host}", "pipeline.schedule_cron=0 30 2 * * *"]
    )
    assert commands.schedule(params) == "job-1"
    (job,) = posts(seen, "/apis/v2beta1/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True
    assert job["experiment_id"] == "exp-1"
    assert not job.get("runtime_config", {}).get("parameters")  # no client-side fingerprint
    spec = job["pipeline_spec"].get("pipeline_spec", job["pipeline_spec"])
    fingerprint = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["fingerprint-op"]
    assert fingerprint["cachingOptions"] == {}  # runs every time: it decides


def test_submit_without_host_is_a_config_error():
    with pytest.raises(ConfigError, match="pipeline.host"):
        commands.submit(load_params(REPO / "params.yaml"))


@pytest.mark.parametrize("action", ["submit", "schedule"])
def test_a_backend_older_than_the_minimum_is_refused_before_anything_is_created(kfp_api, action):
    host, seen, backend = kfp_api
    backend.tag_name = "2.13.1"
    params = load_params(REPO / "params.yaml", [f"pipeline.host={host}"])
    with pytest.raises(ConfigError, match="is 2.13.1; this pipeline needs 2.14.0 or newer"):
        getattr(commands, action)(params)
    assert ("GET", "/apis/v1beta1/healthz", {}) in seen
    assert not [p for m, p, _ in seen if m == "POST"]  # no experiment, no run, no job


def test_a_backend_that_reports_no_version_gets_a_warning_and_the_run(kfp_api, capsys):
    host, seen, backend = kfp_api
    backend.tag_name = "unknown"  # the API server's default when TAG_NAME is unset
    params = load_params(REPO / "params.yaml", [f"pipeline.host={host}"])
    assert commands.submit(params) == "run-1"
    assert "does not report its version; this pipeline needs 2.14.0" in capsys.readouterr().err
