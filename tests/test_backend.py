"""The local runner with the KFP backend's semantics (pipelines/backend.py), on a toy
pipeline: the execution cache keyed as the backend keys it, uncached tasks, retries,
conditions, loops with collected artifacts, and the exit handler's status words."""

import json
from pathlib import Path

import pytest
from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Output

from pipelines.backend import LocalBackend, evaluate_condition

IMAGE = "python:3.11"  # never pulled: the runner runs tasks as subprocesses


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def produce(text: str, ledger: str, data: Output[Dataset]) -> str:
    import os

    with open(ledger, "a") as f:
        f.write("produce\n")
    os.makedirs(os.path.dirname(data.path), exist_ok=True)
    with open(data.path, "w") as f:
        f.write(text.upper())
    return text[::-1]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def consume(reversed_text: str, ledger: str, data: Input[Dataset], out: Output[Dataset]):
    import os

    with open(ledger, "a") as f:
        f.write("consume\n")
    os.makedirs(os.path.dirname(out.path), exist_ok=True)
    with open(data.path) as f, open(out.path, "w") as g:
        g.write(f.read() + reversed_text)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def effect(ledger: str, fail_times: int):
    with open(ledger, "a") as f:
        f.write("effect\n")
    with open(ledger) as f:
        if sum(line == "effect\n" for line in f) <= fail_times:
            raise SystemExit(3)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def part(index: int, ledger: str, piece: Output[Dataset]):
    import os

    os.makedirs(os.path.dirname(piece.path), exist_ok=True)
    with open(piece.path, "w") as f:
        f.write(str(index * 10))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather(pieces: Input[list[Dataset]], ledger: str) -> int:
    total = 0
    for p in pieces:
        with open(p.path) as f:
            total += int(f.read())
    return total


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(ledger: str, status: dsl.PipelineTaskFinalStatus):
    with open(ledger, "a") as f:
        f.write(f"status {status.state} {status.error_message or ''}\n")


@dsl.pipeline(name="toy")
def toy(text: str = "abc", ledger: str = "", fail_times: int = 0, go: bool = True):
    done = report(ledger=ledger).set_caching_options(False)
    with dsl.ExitHandler(done):
        made = produce(text=text, ledger=ledger).set_caching_options(True)
        used = consume(
            reversed_text=made.outputs["Output"], ledger=ledger, data=made.outputs["data"]
        ).set_caching_options(True)
        with dsl.If(go == True):  # noqa: E712
            effect(ledger=ledger, fail_times=fail_times).set_caching_options(False).set_retry(
                num_retries=2
            ).after(used)
        with dsl.ParallelFor(items=[1, 2, 3]) as i:
            piece = part(index=i, ledger=ledger).set_caching_options(True)
        gather(pieces=dsl.Collected(piece.outputs["piece"]), ledger=ledger).set_caching_options(
            True
        )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.yaml"
    compiler.Compiler().compile(toy, str(path))
    return path


def lines(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines() if ledger.is_file() else []


def test_a_second_run_reuses_cached_tasks_and_runs_the_uncached(package, tmp_path):
    ledger = tmp_path / "ledger.txt"
    backend = LocalBackend(tmp_path / "root")
    first = backend.run(package, {"ledger": str(ledger)}, "run-1")
    assert first.state == "COMPLETE"
    assert lines(ledger) == ["produce", "consume", "effect", "status COMPLETE "]
    assert first.task("gather").parameters["Output"] == 60  # 10 + 20 + 30, collected
    out = Path(first.task("consume").artifacts["out"][0].uri)
    assert out.read_text() == "ABCcba"
    ledger.unlink()
    second = backend.run(package, {"ledger": str(ledger)}, "run-2")
    # Cached: produce, consume, the parts, gather; their outputs (the same artifacts)
    # are handed on. Uncached: the effect and the exit task run again.
    assert lines(ledger) == ["effect", "status COMPLETE "]
    for name in ("produce", "consume", "gather"):
        assert second.task(name).state == "CACHED", name
    assert (
        second.task("consume").artifacts["out"][0].id
        == first.task("consume").artifacts["out"][0].id
    )
    assert second.task("effect").state == "COMPLETE"


def test_a_changed_input_reruns_that_task_and_those_fed_its_new_artifact(package, tmp_path):
    ledger = tmp_path / "ledger.txt"
    backend = LocalBackend(tmp_path / "root")
    backend.run(package, {"ledger": str(ledger)}, "run-1")
    ledger.unlink()
    changed = backend.run(package, {"ledger": str(ledger), "text": "xyz"}, "run-2")
    assert lines(ledger)[:2] == ["produce", "consume"]  # a new artifact: a new cache key
    assert Path(changed.task("consume").artifacts["out"][0].uri).read_text() == "XYZzyx"
    assert changed.task("gather").state == "CACHED"  # its inputs did not change
    # Another pipeline name never shares cache entries (the backend filters by it).
    other = package.with_name("other.yaml")
    other.write_text(package.read_text().replace("name: toy", "name: toy-renamed"))
    ledger.unlink()
    backend.run(other, {"ledger": str(ledger), "text": "xyz"}, "run-3")
    assert lines(ledger)[:2] == ["produce", "consume"]


def test_a_backend_with_caching_disabled_runs_everything(package, tmp_path):
    ledger = tmp_path / "ledger.txt"
    LocalBackend(tmp_path / "root").run(package, {"ledger": str(ledger)}, "run-1")
    ledger.unlink()
    LocalBackend(tmp_path / "root", caching=False).run(package, {"ledger": str(ledger)}, "run-2")
    assert lines(ledger)[:2] == ["produce", "consume"]


def test_retries_a_condition_and_the_exit_status_of_a_failed_run(package, tmp_path):
    ledger = tmp_path / "ledger.txt"
    backend = LocalBackend(tmp_path / "root")
    ok = backend.run(package, {"ledger": str(ledger), "fail_times": 1}, "run-1")
    assert ok.task("effect").attempts == 2 and ok.state == "COMPLETE"
    ledger.unlink()
    failed = backend.run(package, {"ledger": str(ledger), "fail_times": 9}, "run-2")
    assert failed.task("effect").attempts == 3 and failed.task("effect").state == "FAILED"
    assert failed.state == "FAILED"
    # The exit task ran and got the backend's words: FAILED, with an empty error.
    assert lines(ledger)[-1] == "status FAILED "
    skipped = backend.run(package, {"ledger": str(ledger), "go": False}, "run-3")
    assert skipped.task("effect").state == "SKIPPED" and skipped.state == "COMPLETE"


def test_conditions_as_kfp_compiles_them():
    values = {"a": True, "n": 3, "s": "x"}
    assert evaluate_condition("inputs.parameter_values['a'] == true", values)
    assert not evaluate_condition("inputs.parameter_values['a'] == false", values)
    assert evaluate_condition(
        "inputs.parameter_values['n'] >= 2 && inputs.parameter_values['s'] == 'x'", values
    )
    assert evaluate_condition("!(inputs.parameter_values['n'] < 2) || false", values)
    with pytest.raises(NotImplementedError):
        evaluate_condition("int(inputs.parameter_values['n']) == 3", values)


def test_the_cache_lives_in_one_json_file_under_the_root(package, tmp_path):
    LocalBackend(tmp_path / "root").run(package, {"ledger": str(tmp_path / "l")}, "run-1")
    store = json.loads((tmp_path / "root" / "backend.json").read_text())
    assert {e["pipeline"] for e in store["cache"]} == {"pipeline/toy"}
    assert all(len(e["fingerprint"]) == 64 for e in store["cache"])
