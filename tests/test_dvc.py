"""`dvc repro` on a copy of the project: runs every stage, then is a no-op, then
reruns only what a changed param touches."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from make_sample import make_sample

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "pack": {"val_fraction": 0.2, "shard_max_samples": 16},
    "train": {"max_train_steps": 4, "train_batch_size": 4, "checkpointing_steps": 2},
    "evaluate": {"prompts": ["a red circle"], "num_inference_steps": 1},
}


def venv_env() -> dict:
    """The environment with this venv's bin first, where `dvc` and `t2i` live."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def repro(project: Path) -> str:
    done = subprocess.run(
        ["dvc", "repro"], cwd=project, env=venv_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_repro_then_noop_then_only_downstream_of_a_changed_param(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("components", "dvc.yaml", ".dvcignore"):
        src = REPO / name
        copy = shutil.copytree if src.is_dir() else shutil.copy2
        copy(
            src,
            project / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}),
        )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    make_sample(project / "data" / "sample", 40)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=project, check=True, env=venv_env())

    first = repro(project)
    assert ran(first) == {"base_model", "pack", "cache", "train", "evaluate", "publish"}
    assert (project / "artifacts/registry/t2i-tiny/1/model_index.json").is_file()

    assert ran(repro(project)) == set()

    params["train"]["learning_rate"] = 5e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(repro(project)) == {"train", "evaluate", "publish"}
