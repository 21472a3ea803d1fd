"""A local runner for compiled KFP pipelines with the KFP backend's semantics.

`kfp.local` runs a pipeline function in-process and skips what a Kubeflow cluster
does between tasks: it keeps no execution cache between runs, ignores the platform
spec and reports its own status words. This runner executes the compiled package
(`pipelines/compiled/*.yaml`, the IR a cluster runs) the way the v2 backend's driver
and launcher do, as read from kubeflow/pipelines `backend/src/v2`:

- **Caching** (`driver/cache.go`, `cacheutils/cache.go`): a task with
  `cachingOptions.enableCache` gets a fingerprint, the sha256 of its cache key: the
  input parameter values, the *names* of its input artifacts (the metadata store's
  artifact ids, never their content), its output artifact and parameter specs, the
  image, command and arguments, and the names of the PVCs it mounts. The newest
  successful execution with that fingerprint *in a pipeline of the same name* is
  reused: the task does not run and its outputs (parameters and the very same
  artifacts) are handed on. Only executions that succeeded are recorded. Tasks with
  caching off always run.
- **Status words**: executions end `COMPLETE`, `CACHED` or `FAILED`; the exit handler's
  `PipelineTaskFinalStatus` carries the exit DAG's state (`COMPLETE` / `FAILED`) with an
  empty error (`driver/resolve.go`).
- **Retries**: a failed task with a `retryPolicy` runs again up to `maxRetryCount`
  times (Argo's retryStrategy; the backoff is not waited here).
- **Conditions, loops, exit handlers**: `triggerPolicy.condition` (the CEL subset KFP's
  compiler emits: `inputs.parameter_values['...']` compared with literals, `&&`, `||`,
  `!`), `parameterIterator` over raw items with `dsl.Collected` artifact lists, and
  `ALL_UPSTREAM_TASKS_COMPLETED` for the exit task.
- **Platform spec**: `fieldPathAsEnv` of the run id label (`pipeline/runid`) becomes the
  variable; PVC names join the cache key. Secrets come from this process's environment.

Not mimicked: pods, images and resources (every task runs as a subprocess with this
Python), PVC mounts (pass the workspace folder as a pipeline parameter), importers,
`parameterExpressionSelector`, parallel execution (tasks run one at a time in
dependency order), backoff waits, and the namespace (one per cache file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.common.io import write_json_atomic

COMPLETE, CACHED, FAILED, SKIPPED = "COMPLETE", "CACHED", "FAILED", "SKIPPED"
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


@dataclass
class Artifact:
    id: int
    uri: str
    schema_title: str
    metadata: dict = field(default_factory=dict)

    def runtime(self) -> dict:
        """As the executor input holds it (RuntimeArtifact: the name is the id)."""
        return {
            "name": str(self.id),
            "uri": self.uri,
            "type": {"schemaTitle": self.schema_title},
            "metadata": self.metadata,
        }


@dataclass
class TaskResult:
    """One task of a run: its state, attempts, outputs and log (None for a DAG)."""

    name: str
    state: str
    parameters: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, list[Artifact]] = field(default_factory=dict)
    attempts: int = 0
    seconds: float = 0.0
    log: Path | None = None
    display_name: str = ""


@dataclass
class RunResult:
    run_id: str
    state: str  # COMPLETE or FAILED (the root DAG's)
    tasks: dict[str, TaskResult]

    def task(self, name: str) -> TaskResult:
        """A task by name (`pack-op`), wherever it sits in the DAG."""
        return self.tasks[name]


class Store:
    """The backend's metadata: artifacts by id and the execution cache (task table),
    in one JSON file under the runner's root."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = (
            json.loads(self.path.read_text())
            if self.path.is_file()
            else {"next_artifact_id": 1, "artifacts": {}, "cache": []}
        )

    def new_artifact(self, uri: str, schema_title: str) -> Artifact:
        artifact = Artifact(self.data["next_artifact_id"], uri, schema_title)
        self.data["next_artifact_id"] += 1
        return artifact

    def save_artifact(self, artifact: Artifact) -> None:
        self.data["artifacts"][str(artifact.id)] = {
            "uri": artifact.uri,
            "schema_title": artifact.schema_title,
            "metadata": artifact.metadata,
        }

    def artifact(self, artifact_id: int) -> Artifact:
        a = self.data["artifacts"][str(artifact_id)]
        return Artifact(int(artifact_id), a["uri"], a["schema_title"], a["metadata"])

    def cached(self, fingerprint: str, pipeline: str) -> dict | None:
        """The newest successful execution of `fingerprint` in pipeline `pipeline`."""
        for entry in reversed(self.data["cache"]):
            if entry["fingerprint"] == fingerprint and entry["pipeline"] == pipeline:
                return entry
        return None

    def record(self, fingerprint: str, pipeline: str, run_id: str, result: TaskResult) -> None:
        self.data["cache"].append(
            {
                "fingerprint": fingerprint,
                "pipeline": pipeline,
                "run_id": run_id,
                "parameters": result.parameters,
                "artifacts": {k: [a.id for a in v] for k, v in result.artifacts.items()},
            }
        )

    def commit(self) -> None:
        write_json_atomic(self.path, self.data)


def load_package(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec or {}) of a compiled package."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    platform = docs[1] if len(docs) > 1 else {}
    return docs[0], platform.get("platforms", {}).get("kubernetes", {})


class LocalBackend:
    """Runs compiled packages under `root` (outputs in `<root>/<run id>/`, the metadata
    in `<root>/backend.json`). `caching=False` plays a backend with caching disabled.
    `on_task(result)` is called as each task ends."""

    def __init__(
        self,
        root: Path,
        caching: bool = True,
        on_task: Callable[[TaskResult], None] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.caching = caching
        self.on_task = on_task or (lambda result: None)
        self.env = env

    def run(self, package: Path, parameters: dict[str, Any], run_id: str) -> RunResult:
        spec, platform = load_package(package)
        store = Store(self.root / "backend.json")
        run = _Run(self, spec, platform, store, run_id)
        root_inputs = spec["root"].get("inputDefinitions", {}).get("parameters", {})
        values = {k: v.get("defaultValue") for k, v in root_inputs.items()}
        unknown = set(parameters) - set(values)
        if unknown:
            raise ValueError(f"unknown pipeline parameters: {sorted(unknown)}")
        values.update(parameters)
        try:
            state = run.dag(spec["root"]["dag"], values, {}, prefix="")
        finally:
            store.commit()
        return RunResult(run_id, state, run.results)


class _Run:
    def __init__(self, backend: LocalBackend, spec, platform, store: Store, run_id: str):
        self.backend, self.spec, self.store, self.run_id = backend, spec, store, run_id
        self.executors = platform.get("deploymentSpec", {}).get("executors", {})
        self.pipeline = "pipeline/" + spec["pipelineInfo"]["name"]
        self.results: dict[str, TaskResult] = {}
        self.folder = backend.root / run_id
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- DAGs ----------------------------------------------------------------------

    def dag(self, dag: dict, parameters: dict, artifacts: dict, prefix: str) -> str:
        """Run a DAG's tasks in dependency order; its state."""
        tasks = dag.get("tasks", {})
        done: dict[str, TaskResult] = {}
        failed = False
        for name in _order(tasks):
            task = tasks[name]
            upstream = [done[d] for d in task.get("dependentTasks", [])]
            all_completed = task.get("triggerPolicy", {}).get("strategy") == (
                "ALL_UPSTREAM_TASKS_COMPLETED"
            )
            if not all_completed and any(u.state in (FAILED, SKIPPED) for u in upstream):
                why = FAILED if any(u.state == FAILED for u in upstream) else SKIPPED
                done[name] = self._skip(task, prefix + name, why)
                continue
            result = self.task(name, task, parameters, artifacts, done, prefix)
            done[name] = result
            failed |= result.state == FAILED
        return FAILED if failed else COMPLETE

    def task(self, name, task, parameters, artifacts, done, prefix) -> TaskResult:
        inputs = self._inputs(task, parameters, artifacts, done)
        component = self.spec["components"][task["componentRef"]["name"]]
        condition = task.get("triggerPolicy", {}).get("condition")
        if condition and not evaluate_condition(condition, inputs["parameters"]):
            return self._skip(task, prefix + name, SKIPPED, component)
        if "dag" in component:
            return self._sub_dag(name, task, component, inputs, prefix)
        return self._container(name, task, component, inputs, prefix)

    def _sub_dag(self, name, task, component, inputs, prefix) -> TaskResult:
        dag = component["dag"]
        iterator = task.get("parameterIterator")
        result = TaskResult(prefix + name, COMPLETE, display_name=_display(task, name))
        if iterator is None:
            result.state = self.dag(dag, inputs["parameters"], inputs["artifacts"], prefix)
            self.results[result.name] = result
            return result
        items = json.loads(iterator["items"]["raw"])
        collected: dict[str, list[Artifact]] = {}
        for i, item in enumerate(items):
            params = {**inputs["parameters"], iterator["itemInput"]: item}
            inner = f"{prefix}{name}-{i}/"
            state = self.dag(dag, params, inputs["artifacts"], inner)
            result.state = FAILED if state == FAILED else result.state
            for out, selector in dag.get("outputs", {}).get("artifacts", {}).items():
                for sel in selector["artifactSelectors"]:
                    producer = self.results.get(inner + sel["producerSubtask"])
                    if producer is not None:
                        collected.setdefault(out, []).extend(
                            producer.artifacts.get(sel["outputArtifactKey"], [])
                        )
        result.artifacts = collected
        self.results[result.name] = result
        return result

    def _skip(self, task, name, state, component=None) -> TaskResult:
        """A task that does not run (its condition is false, or an upstream task failed
        or was skipped); the tasks of a skipped DAG are skipped with it."""
        result = TaskResult(name, SKIPPED, display_name=_display(task, name.rsplit("/", 1)[-1]))
        self.results[name] = result
        component = component or self.spec["components"][task["componentRef"]["name"]]
        prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for inner, inner_task in component.get("dag", {}).get("tasks", {}).items():
            self._skip(inner_task, prefix + inner, state)
        return result

    # -- inputs ----------------------------------------------------------------------

    def _inputs(self, task, parameters, artifacts, done) -> dict:
        params, arts = {}, {}
        for key, spec in task.get("inputs", {}).get("parameters", {}).items():
            params[key] = self._parameter(spec, parameters, done)
        for key, spec in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in spec:
                arts[key] = artifacts[spec["componentInputArtifact"]]
            else:
                producer = spec["taskOutputArtifact"]
                arts[key] = done[producer["producerTask"]].artifacts[producer["outputArtifactKey"]]
        return {"parameters": params, "artifacts": arts}

    def _parameter(self, spec: dict, parameters: dict, done: dict) -> Any:
        if "componentInputParameter" in spec:
            return parameters[spec["componentInputParameter"]]
        if "taskOutputParameter" in spec:
            out = spec["taskOutputParameter"]
            return done[out["producerTask"]].parameters.get(out["outputParameterKey"])
        if "runtimeValue" in spec:
            return spec["runtimeValue"]["constant"]
        if "taskFinalStatus" in spec:
            producer = done[spec["taskFinalStatus"]["producerTask"]]
            return {
                "state": producer.state,
                "pipelineTaskName": producer.name,
                "pipelineJobResourceName": self.run_id,
                "error": {},  # the backend leaves the error empty (resolve.go)
            }
        raise NotImplementedError(f"input parameter spec {sorted(spec)} is not mimicked")

    # -- containers --------------------------------------------------------------------

    def _container(self, name, task, component, inputs, prefix) -> TaskResult:
        label = component["executorLabel"]
        container = self.spec["deploymentSpec"]["executors"][label]["container"]
        k8s = self.executors.get(label, {})
        full = prefix + name
        task_root = self.folder / full.replace("/", "_")
        outputs = component.get("outputDefinitions", {})
        result = TaskResult(full, FAILED, display_name=_display(task, name))
        out_artifacts = {
            key: [
                self.store.new_artifact(str(task_root / key), spec["artifactType"]["schemaTitle"])
            ]
            for key, spec in outputs.get("artifacts", {}).items()
        }
        executor_input = {
            "inputs": {
                "parameterValues": _as_protojson(inputs["parameters"]),
                "artifacts": {
                    k: {"artifacts": [a.runtime() for a in v]}
                    for k, v in inputs["artifacts"].items()
                },
            },
            "outputs": {
                "parameters": {
                    k: {"outputFile": str(task_root / "parameters" / k)}
                    for k in outputs.get("parameters", {})
                },
                "artifacts": {
                    k: {"artifacts": [{**v[0].runtime(), "name": ""}]}
                    for k, v in out_artifacts.items()
                },
                "outputFile": str(task_root / "executor_output.json"),
            },
        }
        fingerprint = None
        if self.backend.caching and task.get("cachingOptions", {}).get("enableCache"):
            fingerprint = _fingerprint(executor_input, outputs, container, k8s)
            hit = self.store.cached(fingerprint, self.pipeline)
            if hit is not None:
                result.state = CACHED
                result.parameters = hit["parameters"]
                result.artifacts = {
                    k: [self.store.artifact(i) for i in ids] for k, ids in hit["artifacts"].items()
                }
                self._done(result)
                return result
        retries = int(task.get("retryPolicy", {}).get("maxRetryCount", 0))
        started = time.perf_counter()
        task_root.mkdir(parents=True, exist_ok=True)
        result.log = task_root / "log.txt"
        for attempt in range(1, retries + 2):
            result.attempts = attempt
            if self._execute(container, k8s, executor_input, result.log, attempt):
                result.state = COMPLETE
                break
        result.seconds = time.perf_counter() - started
        if result.state == COMPLETE:
            result.parameters = _output_parameters(executor_input, outputs)
            result.artifacts = _output_artifacts(executor_input, out_artifacts)
            for artifacts in result.artifacts.values():
                for artifact in artifacts:
                    self.store.save_artifact(artifact)
            if fingerprint is not None:
                self.store.record(fingerprint, self.pipeline, self.run_id, result)
        self._done(result)
        return result

    def _done(self, result: TaskResult) -> None:
        self.results[result.name] = result
        self.backend.on_task(result)

    def _execute(self, container, k8s, executor_input, log: Path, attempt: int) -> bool:
        """One attempt, as a subprocess; True when it exited 0."""
        args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
        env = dict(self.backend.env if self.backend.env is not None else os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for var in container.get("env", []):
            env[var["name"]] = var["value"]
        for var in k8s.get("fieldPathAsEnv", []):
            if var["fieldPath"] == RUN_ID_FIELD:
                env[var["name"]] = self.run_id
        with open(log, "a") as out:
            out.write(f"--- attempt {attempt}\n")
            out.flush()
            done = subprocess.run(
                [*container["command"], *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return done.returncode == 0


def _as_protojson(value: Any) -> Any:
    """Values as the backend hands them to the executor: numbers are protobuf doubles,
    and protojson writes a whole one without a fraction (2.0 -> 2)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _as_protojson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_protojson(v) for v in value]
    return value


def _fingerprint(executor_input: dict, outputs: dict, container: dict, k8s: dict) -> str:
    """sha256 of the task's cache key, as `cacheutils.GenerateCacheKey` builds it."""
    inputs = executor_input["inputs"]
    key = {
        "inputArtifactNames": {
            k: {"artifactNames": [a["name"] for a in v["artifacts"]]}
            for k, v in inputs["artifacts"].items()
        },
        "inputParameterValues": inputs["parameterValues"],
        "outputArtifactsSpec": {
            k: {"type": v["artifacts"][0]["type"], "metadata": {}}
            for k, v in executor_input["outputs"]["artifacts"].items()
        },
        "outputParametersSpec": {
            k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()
        },
        "containerSpec": {
            "image": container["image"],
            "cmdArgs": [*container["command"], *container["args"]],
            "pvcNames": sorted({m["constant"] for m in k8s.get("pvcMount", []) if "constant" in m}),
        },
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _output_parameters(executor_input: dict, outputs: dict) -> dict[str, Any]:
    """The task's output parameters: the executor's output file, else each parameter's
    own file (what `dsl.OutputPath` writes), parsed by its type."""
    out_file = Path(executor_input["outputs"]["outputFile"])
    written = json.loads(out_file.read_text()) if out_file.is_file() else {}
    values = dict(written.get("parameterValues", {}))
    for key, spec in outputs.get("parameters", {}).items():
        if key in values:
            continue
        path = Path(executor_input["outputs"]["parameters"][key]["outputFile"])
        if path.is_file():
            text = path.read_text()
            values[key] = text if spec["parameterType"] == "STRING" else json.loads(text)
    return values


def _output_artifacts(executor_input: dict, made: dict[str, list[Artifact]]) -> dict:
    """The output artifacts, with the metadata the executor logged (Metrics, ...)."""
    out_file = Path(executor_input["outputs"]["outputFile"])
    written = json.loads(out_file.read_text()).get("artifacts", {}) if out_file.is_file() else {}
    for key, artifacts in made.items():
        logged = written.get(key, {}).get("artifacts", [])
        if logged and logged[0].get("metadata"):
            artifacts[0].metadata = logged[0]["metadata"]
    return made


def _order(tasks: dict) -> list[str]:
    """Task names in dependency order (ties by name)."""
    order, seen = [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in sorted(tasks[name].get("dependentTasks", [])):
            visit(dep)
        order.append(name)

    for name in sorted(tasks):
        visit(name)
    return order


def _display(task: dict, name: str) -> str:
    return task.get("taskInfo", {}).get("name", name)


# -- conditions (the CEL subset KFP's compiler emits) ----------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<ref>inputs\.parameter_values\['(?P<key>[^']+)'\])|(?P<op>==|!=|<=|>=|&&|\|\||[<>!()])"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<str>'[^']*'|\"[^\"]*\")|(?P<word>true|false|null))"
)


def evaluate_condition(text: str, values: dict[str, Any]) -> bool:
    """Evaluate a `triggerPolicy.condition` against the task's input parameters."""
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise NotImplementedError(f"condition not mimicked: {text!r} (at {text[pos:]!r})")
        pos = m.end()
        if m.group("ref"):
            tokens.append(("value", values.get(m.group("key"))))
        elif m.group("op"):
            tokens.append(("op", m.group("op")))
        elif m.group("num"):
            num = m.group("num")
            tokens.append(("value", float(num) if "." in num else int(num)))
        elif m.group("str"):
            tokens.append(("value", m.group("str")[1:-1]))
        else:
            tokens.append(("value", {"true": True, "false": False, "null": None}[m.group("word")]))
    parser = _Parser(tokens)
    result = parser.either()
    if parser.pos != len(tokens):
        raise NotImplementedError(f"condition not mimicked: {text!r}")
    return bool(result)


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def _take(self):
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def either(self):
        left = self.both()
        while self._peek() == ("op", "||"):
            self._take()
            right = self.both()
            left = bool(left) or bool(right)
        return left

    def both(self):
        left = self.compare()
        while self._peek() == ("op", "&&"):
            self._take()
            right = self.compare()
            left = bool(left) and bool(right)
        return left

    def compare(self):
        left = self.unary()
        kind, op = self._peek()
        if kind == "op" and op in ("==", "!=", "<", ">", "<=", ">="):
            self._take()
            right = self.unary()
            return {
                "==": lambda: left == right,
                "!=": lambda: left != right,
                "<": lambda: left < right,
                ">": lambda: left > right,
                "<=": lambda: left <= right,
                ">=": lambda: left >= right,
            }[op]()
        return left

    def unary(self):
        kind, value = self._take()
        if kind == "op" and value == "!":
            return not self.unary()
        if kind == "op" and value == "(":
            inner = self.either()
            self._take()  # ")"
            return inner
        return value
