"""A Kubernetes API server stand-in on 127.0.0.1, for the real `kubernetes` client.

It serves the endpoints the project calls: PersistentVolumeClaims (get, create),
Kubeflow Trainer TrainJobs (`trainer.kubeflow.org/v1alpha1`: create, get, list,
delete, patch status), pods (list by label) and their logs, and `/version`. Every
request is recorded as (method, path, query, body). Objects live in memory; a test
reaches them through `objects` and can make a created TrainJob *run* by giving
`on_trainjob` (called in a thread with the job; it sets the job's status itself).
`kubeconfig(path)` writes a kubeconfig that points the client here.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
CORE = "/api/v1/namespaces/"


class KubeStandIn:
    def __init__(self, on_trainjob: Callable[[dict], None] | None = None):
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.times: list[float] = []  # time.monotonic() of each request
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name)
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> text
        self.on_trainjob = on_trainjob
        self.lock = threading.RLock()
        self.forbidden: set[str] = set()  # kinds whose writes answer 403
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _send(self, code: int, obj, content_type="application/json") -> None:
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
                with stand_in.lock:
                    stand_in.requests.append((self.command, url.path, query, body))
                    stand_in.times.append(time.monotonic())
                code, obj = stand_in.route(self.command, url.path, query, body)
                if isinstance(obj, str):
                    self._send(code, obj.encode(), "text/plain")
                else:
                    self._send(code, obj)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> KubeStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def kubeconfig(self, path: Path, namespace: str = "team") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {
                    "name": "stand-in",
                    "context": {"cluster": "stand-in", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "stand-in",
        }
        Path(path).write_text(json.dumps(config))
        return Path(path)

    # -- what tests look at -------------------------------------------------------------

    def calls(self, method: str, prefix: str) -> list[tuple[str, str, dict, dict | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] == method and r[1].startswith(prefix)]

    def set_status(self, namespace: str, name: str, conditions: list[dict], **extra) -> None:
        """Set a TrainJob's status conditions (as the Trainer controller would)."""
        with self.lock:
            job = self.objects[("trainjob", namespace, name)]
            job["status"] = {"conditions": conditions, **extra}

    def add_pod(self, namespace: str, name: str, labels: dict, log: str = "") -> None:
        with self.lock:
            self.objects[("pod", namespace, name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "status": {"phase": "Running"},
            }
            self.logs[(namespace, name)] = log

    def append_log(self, namespace: str, pod: str, text: str) -> None:
        with self.lock:
            self.logs[(namespace, pod)] = self.logs.get((namespace, pod), "") + text

    # -- routing ------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict, body: dict | None):
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        if path.startswith(CORE):
            namespace, rest = path[len(CORE) :].split("/", 1)
            if rest.startswith("persistentvolumeclaims"):
                return self._simple("persistentvolumeclaim", "PersistentVolumeClaim", method,
                                    namespace, rest, body)  # fmt: skip
            if rest == "pods":
                return 200, self._list("pod", namespace, query.get("labelSelector"))
            if rest.startswith("pods/") and rest.endswith("/log"):
                return self._log(namespace, rest.split("/")[1], query)
        if path.startswith(TRAINER):
            namespace, rest = path[len(TRAINER) :].split("/", 1)
            if rest.startswith("trainjobs"):
                return self._trainjob(method, namespace, rest, body)
        return 404, _status(404, "NotFound", f"no route {method} {path}")

    def _simple(self, kind, kind_name, method, namespace, rest, body):
        parts = rest.split("/")
        name = parts[1] if len(parts) > 1 else (body or {}).get("metadata", {}).get("name")
        key = (kind, namespace, name)
        with self.lock:
            if method == "GET" and len(parts) > 1:
                if key not in self.objects:
                    return 404, _status(404, "NotFound", f'{kind}s "{name}" not found')
                return 200, self.objects[key]
            if method == "POST":
                if kind in self.forbidden:
                    return 403, _status(403, "Forbidden", f"{kind}s is forbidden: cannot create")
                if key in self.objects:
                    return 409, _status(409, "AlreadyExists", f'{kind}s "{name}" already exists')
                obj = {**body, "kind": kind_name}
                obj.setdefault("metadata", {})["namespace"] = namespace
                obj["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
                obj["metadata"].setdefault("creationTimestamp", "2026-12-02T00:00:00Z")
                self.objects[key] = obj
                return 201, obj
            if method == "DELETE" and key in self.objects:
                return 200, self.objects.pop(key)
        return 404, _status(404, "NotFound", f'{kind}s "{name}" not found')

    def _trainjob(self, method, namespace, rest, body):
        parts = rest.split("/")
        if method == "GET" and len(parts) == 1:
            return 200, self._list("trainjob", namespace, None, "TrainJobList")
        created = method == "POST"
        code, obj = self._simple("trainjob", "TrainJob", method, namespace, rest, body)
        if created and code == 201:
            obj["apiVersion"] = "trainer.kubeflow.org/v1alpha1"
            if self.on_trainjob is not None:
                threading.Thread(target=self.on_trainjob, args=(obj,), daemon=True).start()
        return code, obj

    def _list(self, kind, namespace, selector, list_kind="PodList"):
        wanted = dict(p.split("=", 1) for p in selector.split(",")) if selector else {}
        with self.lock:
            items = [
                o
                for (k, ns, _), o in self.objects.items()
                if k == kind
                and ns == namespace
                and all(o["metadata"].get("labels", {}).get(a) == b for a, b in wanted.items())
            ]
        return {"apiVersion": "v1", "kind": list_kind, "items": items, "metadata": {}}

    def _log(self, namespace, pod, query):
        """A pod's log. With follow=true the reply waits (up to 30 s) until the pod has
        finished (status.phase Succeeded/Failed), as the API server streams it."""
        if query.get("follow") == "true":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with self.lock:
                    phase = self.objects.get(("pod", namespace, pod), {}).get("status", {})
                    if phase.get("phase") in ("Succeeded", "Failed"):
                        break
                time.sleep(0.05)
        with self.lock:
            if (namespace, pod) not in self.logs:
                return 404, _status(404, "NotFound", f'pods "{pod}" not found')
            return 200, self.logs[(namespace, pod)]


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class LocalTrainer:
    """Plays Kubeflow Trainer for the stand-in: a created TrainJob runs as `numNodes`
    local `t2i` processes with the PET_* variables the torch plugin injects (the PVC is
    the same local folder: the manifest's mount path is a path here), its node-0 pod
    and log registered with the stand-in; `Complete` or `Failed` is set from their exit
    codes. `fail_node` makes that node fail at once (a node that cannot start)."""

    def __init__(
        self, stand_in: KubeStandIn, env: dict | None = None, fail_node: int | None = None
    ):
        self.stand_in, self.env, self.fail_node = stand_in, env, fail_node
        self.processes: list = []
        self.first_step_at: float | None = None  # time.monotonic() of node 0's first step

    def __call__(self, job: dict) -> None:
        import os
        import socket
        import subprocess
        import sys

        meta, trainer = job["metadata"], job["spec"]["trainer"]
        name, namespace = meta["name"], meta["namespace"]
        nodes, per_node = trainer.get("numNodes", 1), trainer.get("numProcPerNode", 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base_env = dict(self.env if self.env is not None else os.environ)
        base_env.update({v["name"]: v["value"] for v in trainer.get("env", []) if "value" in v})
        command = trainer["command"]
        if command[0] == "t2i":  # the image's entry point, here this Python's
            command = [sys.executable, "-m", "components.cli", *command[1:]]
        procs = []
        for rank in range(nodes):
            env = {
                **base_env,
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": str(per_node),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
            }
            argv = [*command, *trainer["args"]]
            if rank == self.fail_node:
                argv = [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(1)"]
            procs.append(
                subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        self.processes += procs
        pod = f"{name}-node-0-0-abcde"
        labels = {
            "jobset.sigs.k8s.io/jobset-name": name,
            "batch.kubernetes.io/job-completion-index": "0",
        }
        self.stand_in.add_pod(namespace, pod, labels)
        for line in procs[0].stdout:  # node 0's log, as the pod's
            text = line.decode("utf-8", "replace")
            if self.first_step_at is None and text.startswith("train: ") and " 0/" not in text:
                self.first_step_at = time.monotonic()  # its first progress line: a step done
            self.stand_in.append_log(namespace, pod, text)
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):  # JobSet fails the job when a node fails
                for other in procs:
                    if other.poll() is None:
                        other.kill()
            time.sleep(0.05)
        codes = [p.wait() for p in procs]
        with self.stand_in.lock:
            self.stand_in.objects[("pod", namespace, pod)]["status"]["phase"] = (
                "Failed" if any(codes) else "Succeeded"
            )
            if ("trainjob", namespace, name) not in self.stand_in.objects:
                return  # deleted meanwhile
        if any(codes):
            node = next(i for i, c in enumerate(codes) if c)
            self.stand_in.set_status(
                namespace,
                name,
                [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "JobFailed",
                        "message": f"jobset failed: node {node} exited with code {codes[node]}",
                    }
                ],
            )
        else:
            self.stand_in.set_status(
                namespace, name, [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]
            )
