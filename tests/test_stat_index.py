"""Hashes that cost what changed: the stat index behind a local source's fingerprint,
pack's change detection, and the latent shards' verification."""

import os
import shutil

import pytest

from components.common import remote, stat_index
from components.common.errors import T2IError


@pytest.fixture
def reads(monkeypatch):
    """Files read to be hashed through a stat index."""
    counted = []
    real = stat_index.sha256_file

    def counting(path):
        counted.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(stat_index, "sha256_file", counting)
    return counted


def test_the_fingerprint_rereads_only_what_changed_and_says_what_it_trusts(
    sample_source, tmp_path, reads
):
    data = tmp_path / "data"
    shutil.copytree(sample_source, data)
    index = tmp_path / "ws" / "index.json"
    full = remote.fingerprint(str(data))  # no index: every file read
    reads.clear()
    first = remote.fingerprint(str(data), index)
    assert first == full  # the same digest
    assert len(reads) == len(list(data.iterdir()))
    reads.clear()
    assert remote.fingerprint(str(data), index) == first and reads == []  # nothing read
    touched = data / "0003.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert remote.fingerprint(str(data), index) == first and reads == ["0003.png"]
    reads.clear()
    # Rewritten in place, same size, mtime put back: what the stat index cannot see.
    victim = data / "0005.png"
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[-20] ^= 0xFF
    with open(victim, "r+b") as f:
        f.write(raw)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert remote.fingerprint(str(data), index) == first and reads == []  # missed
    content = remote.fingerprint(str(data), index, trust_stat=False)  # data.fingerprint: content
    assert content != first and len(reads) == len(list(data.iterdir()))


def test_pack_reuses_the_index_instead_of_reading_unchanged_images(
    sample_source, tmp_path, reads, monkeypatch
):
    from components import pack_shards
    from components.common.config import DataConfig, PackConfig
    from components.pack_shards import plan

    data = tmp_path / "data"
    shutil.copytree(sample_source, data)
    index, cfg = tmp_path / "index.json", PackConfig(val_fraction=0.2, shard_max_samples=16)
    pack_shards.run(DataConfig(), cfg, data, tmp_path / "out", index=index)
    assert index.is_file() and reads == []  # filled from the reads packing did anyway
    read_bytes = []
    real = plan.read_image_bytes
    monkeypatch.setattr(plan, "read_image_bytes", lambda s: read_bytes.append(s) or real(s))
    again = pack_shards.run(DataConfig(), cfg, data, tmp_path / "out", index=index)
    assert again.written == 0 and reads == [] and read_bytes == []  # no image read again
    (data / "0007.png").write_bytes((data / "0008.png").read_bytes())  # one changed
    changed = pack_shards.run(DataConfig(), cfg, data, tmp_path / "out", index=index)
    assert reads == ["0007.png"] and changed.written == 1


def test_latent_shards_are_hashed_once_and_a_changed_one_is_still_caught(latents, tmp_path, reads):
    from components.common.records import verify_latents

    copy = tmp_path / "latents"
    shutil.copytree(latents, copy)
    manifest = verify_latents(copy)
    assert len(reads) == len(manifest.shards)
    reads.clear()
    verify_latents(copy)  # a resume, another rank: nothing read
    assert reads == []
    victim = copy / manifest.shards[0].name
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(T2IError, match=f"{victim.name}: sha256 does not match"):
        verify_latents(copy)
    with pytest.raises(T2IError, match="sha256 does not match"):
        verify_latents(copy)  # and never trusted after
