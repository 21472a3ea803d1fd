"""Where a published model survives its pod: a registry in object storage (a local moto
S3 server), and what a scheduled run reads back: the newest version and its run key,
from the registry (folder or URI) or from the Hub (tests/hub_server.py)."""

import json
import subprocess
import sys

import pytest

from components import publish
from components.common.config import PublishConfig
from components.publish.latest import latest_published

RUN_KEY = {"source": "s3://data/set", "data_fingerprint": "d" * 64, "config_sha256": "c" * 64}


def test_registry_in_object_storage_versions_and_is_idempotent(s3, trained, evaluation, tmp_path):
    s3.create_bucket(Bucket="models")
    cfg = PublishConfig(name="m", registry="s3://models/registry")
    model = trained[0] / "model"
    assert latest_published(cfg) is None  # nothing there yet: no error
    first = publish.run(cfg, model, evaluation[0], tmp_path / "out", run_key=RUN_KEY)
    assert first.published and first.local.version == 1 and first.local.new
    assert first.local.path == "s3://models/registry/m/1"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    for name in ("receipt.json", "lineage.json", "README.md", "model_index.json"):
        assert f"registry/m/1/{name}" in keys, name
    assert any(k.startswith("registry/m/1/unet/") and k.endswith(".safetensors") for k in keys)
    again = publish.run(cfg, model, evaluation[0], tmp_path / "out", run_key=RUN_KEY)
    assert again.local.version == 1 and not again.local.new  # same UNet: no new version

    latest = latest_published(cfg)
    assert latest.version == 1 and latest.where == "registry s3://models/registry/m"
    assert latest.run_key == RUN_KEY
    assert latest.lineage["unet_sha256"] == first.unet_sha256


def test_a_version_without_its_receipt_is_incomplete_and_ignored(s3, trained, evaluation, tmp_path):
    """Uploads have no rename: the receipt goes last, and a version lacking one (an upload
    cut short) is neither the latest nor a reason to skip its number."""
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="registry/m/1/lineage.json", Body=b"{}")
    cfg = PublishConfig(name="m", registry="s3://models/registry")
    assert latest_published(cfg) is None
    done = publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")
    assert done.local.version == 1 and done.local.new
    body = s3.get_object(Bucket="models", Key="registry/m/1/lineage.json")["Body"].read()
    assert json.loads(body)["unet_sha256"] == done.unet_sha256


def test_latest_in_a_folder_registry_and_without_a_run_key(trained, evaluation, tmp_path):
    cfg = PublishConfig(name="m", registry=str(tmp_path / "registry"))
    assert latest_published(cfg) is None
    publish.run(cfg, trained[0] / "model", evaluation[0], tmp_path / "out")  # as dvc repro
    latest = latest_published(cfg)
    assert latest.version == 1 and latest.run_key == {}  # published outside a pipeline run


_HUB_SCRIPT = """
import json, sys
from pathlib import Path
from components import publish
from components.common.config import PublishConfig
from components.publish.latest import latest_published
model, evaluation, out, key = sys.argv[1:5]
cfg = PublishConfig(name="m", target="hub", hub_model_id="acme/shapes", license="mit",
                    retry_backoff_s=0)
before = latest_published(cfg)
publish.run(cfg, Path(model), Path(evaluation), Path(out), run_key=json.loads(key))
latest = latest_published(cfg)
print(json.dumps([before is None, latest.version, latest.where, latest.run_key]))
"""


def test_latest_on_the_hub(trained, evaluation, tmp_path):
    """huggingface_hub reads HF_ENDPOINT at import: a process of its own, as the CLI."""
    from .hub_server import serve
    from .test_publish_hub import SENTINEL, hub_env

    server, state, endpoint = serve({SENTINEL: "write"})
    try:
        args = [trained[0] / "model", evaluation[0], tmp_path / "out", json.dumps(RUN_KEY)]
        done = subprocess.run(
            [sys.executable, "-c", _HUB_SCRIPT, *map(str, args)],
            env=hub_env(endpoint, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    nothing_before, version, where, run_key = json.loads(done.stdout.strip().splitlines()[-1])
    assert nothing_before  # no repo yet: None, not an error
    assert version == 1 and where == "hub acme/shapes" and run_key == RUN_KEY


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_object_store_uris_are_uris(scheme):
    from components.publish.registry import is_uri

    assert is_uri(f"{scheme}://bucket/registry") and not is_uri("artifacts/registry")
