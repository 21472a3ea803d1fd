"""Sources by URI: fingerprinted where they live, fetched incrementally (S3 on a local
moto server; DVC from a temporary git+DVC repository with a local remote)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from components.common import remote
from components.common.errors import ConfigError
from tests.conftest import upload_folder


def test_s3_fingerprint_follows_keys_sizes_and_etags_and_fetch_copies_only_changes(
    s3, sample_source, tmp_path
):
    s3.create_bucket(Bucket="data")
    upload_folder(s3, "data", sample_source, "sets/a")
    uri = "s3://data/sets/a"
    first = remote.fingerprint(uri)
    assert first == remote.fingerprint(uri)  # stable
    dest = tmp_path / "copy"
    assert remote.fetch(uri, dest) == dest
    names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert names == sorted(
        p.relative_to(sample_source).as_posix() for p in sample_source.rglob("*") if p.is_file()
    )
    assert remote.fingerprint(str(dest)) == remote.fingerprint(str(sample_source))
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}

    # One new object, one changed, one removed: a new fingerprint; only those move.
    png = next(sample_source.glob("*.png"))
    s3.upload_file(str(png), "data", "sets/a/extra.png")
    s3.put_object(Bucket="data", Key="sets/a/metadata.jsonl", Body=b'{"file_name": "x"}\n')
    gone = sorted(sample_source.glob("*.png"))[-1].name
    s3.delete_object(Bucket="data", Key=f"sets/a/{gone}")
    assert remote.fingerprint(uri) != first
    remote.fetch(uri, dest)
    assert (dest / "extra.png").read_bytes() == png.read_bytes()
    assert (dest / "metadata.jsonl").read_text() == '{"file_name": "x"}\n'
    assert not (dest / gone).exists()
    kept = [p for p in mtimes if p.exists() and p.name not in ("metadata.jsonl",)]
    assert kept and all(p.stat().st_mtime_ns == mtimes[p] for p in kept)


def test_s3_single_file_and_missing_objects(s3, tmp_path):
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="one/data.parquet", Body=b"PAR1...")
    path = remote.fetch("s3://data/one/data.parquet", tmp_path / "copy")
    assert path == tmp_path / "copy" / "data.parquet" and path.read_bytes() == b"PAR1..."
    with pytest.raises(ConfigError, match=r"data.source s3://data/nothing: nothing there"):
        remote.fingerprint("s3://data/nothing")
    with pytest.raises(ConfigError, match="nothing there"):
        remote.fingerprint("s3://no-such-bucket/x")


def test_a_local_folder_is_hashed_and_not_copied(sample_source, tmp_path):
    assert remote.fetch(str(sample_source), tmp_path / "unused") == sample_source
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ConfigError, match="no such folder or file"):
        remote.fingerprint(str(tmp_path / "nowhere"))


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


def _dvc(repo: Path, *args: str) -> None:
    dvc = Path(os.sys.executable).with_name("dvc")
    subprocess.run([str(dvc), *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.slow
def test_dvc_path_at_a_revision(sample_source, tmp_path):
    """`dvc://images?repo=...&rev=v1`: the tracked folder's md5 at v1 without fetching,
    and the files from the repo's DVC remote."""
    repo, storage = tmp_path / "registry", tmp_path / "storage"
    repo.mkdir()
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copytree(sample_source, repo / "images")
    _dvc(repo, "add", "-q", "images")
    _dvc(repo, "remote", "add", "-d", "storage", str(storage))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "v1")
    _git(repo, "tag", "v1")
    _dvc(repo, "push", "-q")
    png = next(sample_source.glob("*.png"))
    shutil.copy(png, repo / "images" / "new.png")
    _dvc(repo, "add", "-q", "images")
    _git(repo, "commit", "-qam", "v2")
    _git(repo, "tag", "v2")
    _dvc(repo, "push", "-q")
    shutil.rmtree(repo / ".dvc" / "cache")  # everything must come from the remote

    v1, v2 = (f"dvc://images?repo={repo}&rev={rev}" for rev in ("v1", "v2"))
    assert remote.fingerprint(v1) == remote.fingerprint(v1)
    assert remote.fingerprint(v1) != remote.fingerprint(v2)
    assert not (repo / ".dvc" / "cache" / "files").exists()  # fingerprinting fetched nothing
    copy = remote.fetch(v1, tmp_path / "copy")
    assert remote.fingerprint(str(copy)) == remote.fingerprint(str(sample_source))
    remote.fetch(v2, copy)
    assert (copy / "new.png").read_bytes() == png.read_bytes()
    with pytest.raises(ConfigError, match=r"expected dvc://PATH\?repo=URL&rev=REV"):
        remote.fingerprint(f"dvc://images?repository={repo}")
    with pytest.raises(ConfigError, match="cannot open the repo at that revision"):
        remote.fingerprint(f"dvc://images?repo={repo}&rev=v9")


def test_t2i_pack_reads_an_s3_source(s3, sample_source, tmp_path, monkeypatch, capsys):
    from components.cli import main
    from components.common.records import read_pack_manifest

    s3.create_bucket(Bucket="data")
    upload_folder(s3, "data", sample_source, "shapes")
    monkeypatch.chdir(tmp_path)
    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    args = ["pack", "--params", str(repo_params), "--source", "s3://data/shapes"]
    assert main([*args, "--out", "shards"]) == 0
    assert "packed 48 samples" in capsys.readouterr().out
    assert read_pack_manifest(tmp_path / "shards").source == "s3://data/shapes"
    assert main([*args.copy()[:-1], "s3://data/none", "--out", "shards2"]) == 2
    assert "data.source s3://data/none: nothing there" in capsys.readouterr().err
    assert not (tmp_path / "shards2").exists()


_HF_SCRIPT = """
import json, sys
from pathlib import Path
from components.common import remote
uri, dest = sys.argv[1], sys.argv[2]
print(json.dumps([remote.fingerprint(uri), str(remote.fetch(uri, Path(dest)))]))
"""


def test_hf_dataset_files_from_a_local_hub(tmp_path):
    """`hf://datasets/acme/shapes/images` through huggingface_hub's HfFileSystem against
    the test Hub (its own process: huggingface_hub reads HF_ENDPOINT at import)."""
    import sys

    from .hub_server import Repo, serve
    from .test_publish_hub import hub_env

    server, state, endpoint = serve({})
    repo = Repo(private=False)
    files = {"images/a.png": b"\x89PNG-a", "images/metadata.jsonl": b'{"file_name": "a.png"}\n'}
    repo.commit({**files, "README.md": b"shapes"}, "first")
    state.repos["datasets/acme/shapes"] = repo
    uri = "hf://datasets/acme/shapes/images"

    def read(dest: Path) -> tuple[str, Path]:
        done = subprocess.run(
            [sys.executable, "-c", _HF_SCRIPT, uri, str(dest)],
            env=hub_env(endpoint, tmp_path, token=None),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        fp, path = json.loads(done.stdout.strip().splitlines()[-1])
        return fp, Path(path)

    try:
        first, copy = read(tmp_path / "copy")
        assert copy == tmp_path / "copy"
        assert (copy / "a.png").read_bytes() == b"\x89PNG-a" and not (copy / "README.md").exists()
        assert read(tmp_path / "copy")[0] == first  # stable
        repo.commit({**files, "images/b.png": b"\x89PNG-b", "README.md": b"shapes"}, "second")
        second, _ = read(tmp_path / "copy")
        assert second != first and (copy / "b.png").read_bytes() == b"\x89PNG-b"
    finally:
        server.shutdown()
    assert all(r["path"].startswith(("/api/", "/datasets/")) for r in state.requests)
