"""The DVC loop on a copy of the project, as a DVC user runs it: data tracked with
`dvc add`, `dvc repro` (then a no-op), metrics and dvc.lock committed to git, a
remote (`dvc push`, then `dvc pull` on a fresh clone recomputes nothing), more data
(incremental pack), and experiments (`dvc exp run -S`, `dvc exp show`, `dvc metrics
diff main`, `dvc plots diff main`) that publish nothing.

The tests of this module share one project and run in order: each leaves it
committed, as a user would between steps.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from make_sample import make_sample

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "model": {"tiny_vae_steps": 8, "tiny_prediction_type": "epsilon"},
    "pack": {"val_fraction": 0.2, "shard_max_samples": 16},
    "train": {"max_train_steps": 4, "train_batch_size": 4, "checkpointing_steps": 2},
    "evaluate": {"prompts": ["a red circle"], "num_inference_steps": 1, "heldout_captions": 4},
}
ALL = {"base_model", "pack", "cache", "train", "evaluate", "publish"}
GIT_ID = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}
pytestmark = pytest.mark.slow


def venv_env() -> dict:
    """The environment with this venv's bin first, where `dvc` and `t2i` live."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return dict(os.environ, PATH=path, **GIT_ID)


def sh(project: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=project, env=venv_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def unet_sha(project: Path) -> str:
    from components.common.models import weights_sha256

    return weights_sha256(project / "artifacts" / "model", "unet")


def receipt(project: Path) -> dict:
    return json.loads((project / "artifacts" / "publish" / "receipt.json").read_text())


def versions(project: Path) -> list[str]:
    folder = project / "artifacts" / "registry" / "t2i-tiny"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project with the dataset under DVC, reproduced and committed."""
    project = tmp_path_factory.mktemp("dvc") / "project"
    project.mkdir()
    shutil.copytree(
        REPO / "components", project / "components", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    make_sample(project / "data" / "sample", 40)
    sh(project, "git", "init", "-q", "-b", "main")
    sh(project, "dvc", "init", "-q")
    sh(project, "dvc", "add", "-q", "data/sample")  # the dataset is DVC's, not git's

    first = sh(project, "dvc", "repro")
    assert ran(first) == ALL
    assert versions(project) == ["1"]
    assert ran(sh(project, "dvc", "repro")) == set()
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    return project


def test_metrics_and_lock_are_committed_to_git(project):
    tracked = sh(project, "git", "ls-files").split()
    for path in (
        "dvc.lock",
        "data/sample.dvc",
        "metrics/train/train_metrics.json",
        "metrics/train/loss.csv",
        "metrics/eval/metrics.json",
        "metrics/eval/val_loss_by_timestep.csv",
        "metrics/eval/clip_score_by_prompt.csv",
        "metrics/eval/grid.png",
    ):
        assert path in tracked, path
    assert not any(p.startswith(("artifacts/", "data/sample/", "data/shards")) for p in tracked)
    shown = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    metrics = shown[""]["data"]["metrics/train/train_metrics.json"]["data"]
    assert metrics["steps"] == SMALL["train"]["max_train_steps"]


def test_lineage_names_the_dvc_tracked_data_and_the_lock(project):
    dvc = receipt(project)["lineage"]["code"]["dvc"]
    md5 = yaml.safe_load((project / "data" / "sample.dvc").read_text())["outs"][0]["md5"]
    assert dvc["tracked_data"]["data/sample.dvc"]["md5"] == md5
    assert dvc["data"]["data/sample"] == md5
    assert dvc["lock_sha256"] and "train" in dvc["stages"]


def test_push_then_pull_on_a_fresh_clone_recomputes_nothing(project, tmp_path):
    remote = tmp_path / "remote"
    sh(project, "dvc", "remote", "add", "-d", "store", str(remote))
    sh(project, "git", "commit", "-qam", "a DVC remote")
    sh(project, "dvc", "push", "-q")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    started = time.perf_counter()
    sh(clone, "dvc", "pull", "-q")
    pulled = time.perf_counter()
    assert ran(sh(clone, "dvc", "repro")) == set()
    done = time.perf_counter()
    print(f"fresh clone: dvc pull {pulled - started:.1f}s, dvc repro {done - pulled:.1f}s")
    assert unet_sha(clone) == unet_sha(project)
    assert "up to date" in sh(clone, "dvc", "status").lower()


def test_adding_images_repacks_incrementally_and_reruns_downstream(project):
    shards = project / "data" / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    make_sample(project / "data" / "sample", 56)  # the first 40 are the same files
    sh(project, "dvc", "add", "-q", "data/sample")
    out = sh(project, "dvc", "repro")
    assert ran(out) == ALL - {"base_model"}
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    assert set(after) > set(before)  # new shards for the new samples
    kept = [name for name in before if after.get(name) == before[name]]
    assert kept, "every old shard was rewritten: pack is not incremental"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 56
    md5 = yaml.safe_load((project / "data" / "sample.dvc").read_text())["outs"][0]["md5"]
    assert (
        receipt(project)["lineage"]["code"]["dvc"]["tracked_data"]["data/sample.dvc"]["md5"] == md5
    )
    assert versions(project) == ["1", "2"]
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "more data")


def test_experiments_with_set_params_compare_and_never_publish(project, tmp_path):
    registry = versions(project)
    started = time.perf_counter()
    out = sh(
        project,
        "dvc",
        "exp",
        "run",
        "-n",
        "lr-5e-4",
        "-S",
        "train.learning_rate=5e-4",
        "-S",
        "train.max_train_steps=6",
    )
    print(f"dvc exp run: {time.perf_counter() - started:.1f}s")
    assert ran(out) == {"train", "evaluate", "publish"}
    # DVC rewrote params.yaml (YAML 1.2, `no` unquoted); it still loads, and repro works.
    assert "mixed_precision: no\n" in (project / "params.yaml").read_text()
    assert versions(project) == registry  # an experiment publishes nothing
    rec = receipt(project)
    assert rec["published"] is False and rec["experiment"] == "lr-5e-4"
    assert "publish.from_experiments" in rec["reason"]

    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    exp = next(e for e in exps if e["name"] == "lr-5e-4")
    rev = exp["revs"][0]["data"]
    metrics = rev["metrics"]["metrics/train/train_metrics.json"]["data"]
    assert metrics["steps"] == 6
    assert "tuned_val_loss" in rev["metrics"]["metrics/eval/metrics.json"]["data"]
    assert rev["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 5e-4

    diff = json.loads(sh(project, "dvc", "metrics", "diff", "main", "--json"))
    steps = diff["metrics/train/train_metrics.json"]["steps"]
    assert (steps["old"], steps["new"]) == (4, 6)
    sh(project, "dvc", "plots", "diff", "main", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "loss.csv" in html and "held-out loss by timestep" in html
    assert "CLIP score by prompt" in html and "grid.png" in html
    assert ran(sh(project, "dvc", "repro")) == set()  # the rewritten params.yaml reproduces
