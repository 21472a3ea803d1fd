"""`t2i publish --set publish.target=hub` against a local Hub (tests/hub_server.py),
through the real `huggingface_hub` client: one commit and a tag per version, never
twice, retried through a 503, the card and lineage in the repo, the model loadable
with `from_pretrained`, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO
from .hub_server import serve

SENTINEL = "hf_SENTINEL_never_printed_0123456789"
READ_ONLY = "hf_read_only_token_abcdef"
REPO_ID = "acme/shapes"


@pytest.fixture()
def hub():
    server, state, endpoint = serve({SENTINEL: "write", READ_ONLY: "read"})
    yield state, endpoint
    server.shutdown()


def hub_env(endpoint: str, tmp_path, token: str | None = SENTINEL) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),  # no token file from the machine
        HF_HUB_DISABLE_XET="1",  # the test hub speaks LFS, not Xet
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",  # stderr holds only our own lines
        PYTHONPATH=str(REPO),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def publish_cli(trained, evaluation, tmp_path, env, *overrides, out="out"):
    args = [
        "publish.target=hub",
        f"publish.hub_model_id={REPO_ID}",
        "publish.license=mit",
        "publish.retry_backoff_s=0.01",
        f"publish.registry={tmp_path / 'registry'}",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "components.cli", "publish", "--params", str(REPO / "params.yaml")]
    for o in args:
        cmd += ["--set", o]
    cmd += ["--model", str(trained[0] / "model"), "--eval", str(evaluation[0])]
    cmd += ["--out", str(tmp_path / out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)


def test_one_commit_with_card_lineage_and_tag_then_no_second_commit(
    hub, trained, evaluation, tmp_path
):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path)
    state.fail_once("POST", r"/commit/main$", 503)  # the first commit attempt fails
    done = publish_cli(trained, evaluation, tmp_path, env)
    assert done.returncode == 0, done.stderr
    commits = state.commits(REPO_ID)
    assert len(commits) == 1  # retried through the 503, committed exactly once
    assert [r for r in state.requests if r.get("status") == 503]
    assert any(r["path"] == "/api/validate-yaml" for r in state.requests)  # card checked first
    files = commits[0]["files"]
    repo = state.repos[REPO_ID]
    assert repo.tags == {"v1": commits[0]["oid"]} and repo.private
    for name in ("model_index.json", "unet/config.json", "README.md", "lineage.json"):
        assert name in files, name
    assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in files)
    assert "eval/grid.png" in files and "eval/samples/00-0-tuned.png" in files

    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"stable-diffusion", "diffusers-training", "t2i-pipeline"} <= set(meta["tags"])
    assert meta["widget"][0]["output"]["url"] == "eval/samples/00-0-tuned.png"
    assert len(meta["widget"]) == 2  # one per prompt
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["type"] == "loss" and metrics[0]["value"] > 0
    assert "## Usage" in card and f'from_pretrained("{REPO_ID}"' in card

    lineage = json.loads(files["lineage.json"])
    receipt = json.loads((tmp_path / "out" / "receipt.json").read_text())
    assert lineage["unet_sha256"] == receipt["unet_sha256"]
    assert lineage["published_as"] == {"target": "hub", "version": 1, "tag": "v1"}
    assert receipt["hub"]["commit"] == commits[0]["oid"] and receipt["hub"]["tag"] == "v1"
    assert f"{endpoint}/{REPO_ID}" in done.stdout and "tag v1" in done.stdout
    assert commits[0]["oid"][:12] in done.stdout

    again = publish_cli(trained, evaluation, tmp_path, env, out="again")
    assert again.returncode == 0, again.stderr
    assert len(state.commits(REPO_ID)) == 1  # same UNet: no new commit, no new tag
    second = json.loads((tmp_path / "again" / "receipt.json").read_text())
    assert second["hub"] == {**receipt["hub"], "new": False}

    # The token never leaves the process: not printed, not in any file we wrote.
    written = [tmp_path / "out" / "receipt.json", tmp_path / "again" / "receipt.json"]
    for text in [done.stdout, done.stderr, again.stdout, again.stderr, card, files["lineage.json"]]:
        assert SENTINEL not in (text if isinstance(text, str) else text.decode())
    for path in written:
        assert SENTINEL not in path.read_text()


def test_a_lost_commit_response_is_not_committed_twice(hub, trained, evaluation, tmp_path):
    state, endpoint = hub
    state.lose_response_once("POST", r"/commit/main$")  # committed, but the client sees 503
    done = publish_cli(trained, evaluation, tmp_path, hub_env(endpoint, tmp_path))
    assert done.returncode == 0, done.stderr
    commits = state.commits(REPO_ID)
    assert len(commits) == 1 and state.repos[REPO_ID].tags == {"v1": commits[0]["oid"]}
    receipt = json.loads((tmp_path / "out" / "receipt.json").read_text())
    assert receipt["hub"]["commit"] == commits[0]["oid"] and receipt["hub"]["tag"] == "v1"


def test_published_model_loads_with_from_pretrained(hub, trained, evaluation, tmp_path):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path)
    assert publish_cli(trained, evaluation, tmp_path, env).returncode == 0
    script = (
        "import torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({REPO_ID!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = pipe('a red circle', num_inference_steps=2, height=32, width=32,\n"
        "             generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print('generated', image.size)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generated (32, 32)" in done.stdout
    unet = "/unet/diffusion_pytorch_model.safetensors"
    assert any("/resolve/" in r["path"] and r["path"].endswith(unet) for r in state.requests)


def test_version_continues_from_the_repos_tags(hub, trained, evaluation, tmp_path):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path)
    from .hub_server import Repo

    existing = Repo(private=True)
    oid = existing.commit({"README.md": b"---\nlicense: mit\n---\nold\n"}, "init")
    existing.tags = {"v1": oid, "v3": oid, "release": oid}
    state.repos[REPO_ID] = existing
    done = publish_cli(trained, evaluation, tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert sorted(existing.tags) == ["release", "v1", "v3", "v4"]
    assert "tag v4" in done.stdout


def test_retries_are_bounded_and_the_failure_is_one_line(hub, trained, evaluation, tmp_path):
    state, endpoint = hub
    for _ in range(3):
        state.fail_once("POST", r"/commit/main$", 503)
    done = publish_cli(
        trained, evaluation, tmp_path, hub_env(endpoint, tmp_path), "publish.max_retries=2"
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert REPO_ID in lines[0] and "commit" in lines[0] and "HTTP 503" in lines[0]
    assert "after 3 attempts" in lines[0]
    assert state.commits(REPO_ID) == []


@pytest.mark.parametrize(
    "case, token, overrides, env_extra, code, message",
    [
        ("no token", None, [], {}, 2, "HF_TOKEN"),
        ("read-only token", READ_ONLY, [], {}, 1, "no write access"),
        ("malformed repo id", SENTINEL, ["publish.hub_model_id=not a repo"], {}, 2, "org/name"),
        ("offline", SENTINEL, [], {"HF_HUB_OFFLINE": "1"}, 2, "HF_HUB_OFFLINE"),
        (
            "token in params",
            SENTINEL,
            [f"publish.hub_token={SENTINEL}"],
            {},
            2,
            "hub_token: refused",
        ),
        ("no license", SENTINEL, ["publish.license=null"], {}, 2, "publish.license"),
        ("bad card", SENTINEL, ["publish.license=no-such"], {}, 1, "rejects the model card"),
    ],
)
def test_bad_input_is_one_line_and_publishes_nothing(
    hub, trained, evaluation, tmp_path, case, token, overrides, env_extra, code, message
):
    state, endpoint = hub
    if token == READ_ONLY:  # the repo exists, the token can only read it
        publish_cli(trained, evaluation, tmp_path, hub_env(endpoint, tmp_path), out="first")
        state.repos[REPO_ID].commits[1:] = []
    env = {**hub_env(endpoint, tmp_path, token), **env_extra}
    done = publish_cli(trained, evaluation, tmp_path, env, *overrides)
    assert done.returncode == code, (case, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (case, lines)
    assert SENTINEL not in done.stderr + done.stdout
    assert REPO_ID not in state.repos or state.commits(REPO_ID) == []
    assert not (tmp_path / "out" / "receipt.json").exists()


def test_no_token_reaches_the_compiled_pipeline(tmp_path):
    env = {**os.environ, "HF_TOKEN": SENTINEL, "PYTHONPATH": str(REPO)}
    out = tmp_path / "pipeline.yaml"
    cmd = [sys.executable, "-m", "components.cli", "pipeline", "compile", "--output", str(out)]
    cmd += ["--params", str(REPO / "params.yaml"), "--set", "publish.target=hub"]
    cmd += ["--set", f"publish.hub_model_id={REPO_ID}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert SENTINEL not in text and "hub_token" not in text and REPO_ID in text
