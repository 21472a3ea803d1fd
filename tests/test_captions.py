"""Several captions per image (packed, cached, one per epoch) and tag shuffling."""

import json

import pytest
import torch
from safetensors.torch import load as st_load

from components import cache_latents, pack_shards
from components.common.captions import caption_index, shuffle_tags
from components.common.config import CacheConfig, DataConfig, PackConfig, TrainConfig
from components.common.models import load_tokenizer
from components.common.records import load_latent_split, read_latent_manifest
from components.common.shapes import make_sample
from components.common.shards import read_shard
from components.train_unet.data import LatentStream, TagShuffle

from .conftest import train_then_resume


def _captions(i: int, text: str) -> list[str] | str:
    """Even rows: three captions (the last a tag list); odd rows: one, as a string."""
    if i % 2:
        return text
    return [text, f"picture {i}", f"shape, colour {i}, small, centred, plain"]


@pytest.fixture(scope="module")
def multi(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    make_sample(root / "src", 32)
    table = root / "src" / "metadata.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["text"] = _captions(i, row["text"])
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pack = PackConfig(val_fraction=0.0, shard_max_samples=8)
    pack_shards.run(DataConfig(), pack, root / "src", root / "shards")
    cache = CacheConfig(resolution=32, text_embeddings=True)
    cache_latents.run(cache, root / "shards", tiny_model, root / "latents")
    return root, rows


def _records(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in read_shard(folder / s["name"])]


def test_every_caption_is_packed_one_per_line(multi):
    root, rows = multi
    by_source = {
        json.loads(r["json"])["source"]: r["txt"].decode() for r in _records(root / "shards")
    }
    for row in rows:
        expected = row["text"] if isinstance(row["text"], list) else [row["text"]]
        assert by_source[row["file_name"]].split("\n") == expected


def test_parquet_list_column_and_txt_lines_are_several_captions(tmp_path):
    import datasets

    make_sample(tmp_path / "img", 2)
    images = [str(p) for p in sorted((tmp_path / "img").glob("*.png"))]
    table = datasets.Dataset.from_dict(
        {"image": images, "text": [["one", "two", " "], ["three"]]},
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}
        ),
    )
    table.to_parquet(tmp_path / "d.parquet")
    pack_shards.run(
        DataConfig(), PackConfig(val_fraction=0), tmp_path / "d.parquet", tmp_path / "o"
    )
    assert sorted(r["txt"] for r in _records(tmp_path / "o")) == [b"one\ntwo", b"three"]
    (tmp_path / "img" / "metadata.jsonl").unlink()
    (tmp_path / "img" / "0000.txt").write_text("first line\n\n  second   line\n")
    report = pack_shards.run(
        DataConfig(), PackConfig(val_fraction=0), tmp_path / "img", tmp_path / "t"
    )
    assert report.rejected == {"missing_caption": 1}  # 0001.png has no .txt
    assert [r["txt"] for r in _records(tmp_path / "t")] == [b"first line\nsecond line"]


def test_the_cache_keeps_ids_and_embeddings_of_each_caption(multi):
    root, rows = multi
    for record in _records(root / "latents"):
        tensors, meta = st_load(record["safetensors"]), json.loads(record["json"])
        n = len(meta["captions"])
        if n == 1:  # one caption: the layout it always had
            assert tensors["input_ids"].shape == (77,)
            assert tensors["encoder_hidden_states"].dim() == 2
        else:
            assert n == 3 and tensors["input_ids"].shape == (3, 77)
            assert tensors["encoder_hidden_states"].shape[:2] == (3, 77)
            assert not torch.equal(tensors["input_ids"][0], tensors["input_ids"][1])
        assert meta["caption"] == meta["captions"][0]
    # evaluation's held-out loss sees the first caption of each
    assert all(s["input_ids"].shape == (77,) for s in load_latent_split(root / "latents", "train"))


def _stream(latents, **kw):
    manifest = read_latent_manifest(latents)
    return LatentStream.from_manifest(latents, manifest, None, batch_size=4, seed=3, **kw)


def _chosen(latents, stream, micro_steps):
    """{(epoch, key): the input_ids row used}, read from the batches."""
    import itertools

    seen = {}
    for step, batch in itertools.islice(stream.batches(0), micro_steps):
        epoch = stream.position(step)[0]
        for ids in batch["input_ids"]:
            seen.setdefault(epoch, []).append(tuple(ids.tolist()))
    return seen


def test_each_epoch_trains_on_the_caption_drawn_from_seed_epoch_and_key(multi):
    root, _ = multi
    stream = _stream(root / "latents")
    per_epoch = stream.steps_in_epoch(0)
    seen = _chosen(root / "latents", stream, 4 * per_epoch)
    # every epoch uses some second/third captions, and not the same choice each epoch
    firsts = {tuple(t.tolist()) for t in _first_ids(root / "latents")}
    assert all(any(ids not in firsts for ids in seen[e]) for e in seen)
    assert len({tuple(sorted(v)) for v in seen.values()}) > 1
    # the choice is a pure function of (seed, epoch, key): a resumed stream agrees
    import itertools

    start = per_epoch + 2
    again = list(itertools.islice(_stream(root / "latents").batches(start), 3))
    first = list(itertools.islice(stream.batches(start), 3))
    assert all(
        torch.equal(a[1]["input_ids"], b[1]["input_ids"]) for a, b in zip(again, first, strict=True)
    )
    assert caption_index(3, 1, "k", 3) == caption_index(3, 1, "k", 3)


def _first_ids(latents):
    return [s["input_ids"] for s in load_latent_split(latents, "train")]


def test_shuffle_tags_keeps_the_leading_tags_and_is_deterministic_per_step():
    caption = "naruto, orange jacket, headband, smiling, outdoors"
    a = shuffle_tags(caption, 1, seed=0, step=5, key="k")
    assert a.split(", ")[0] == "naruto"
    assert sorted(a.split(", ")) == sorted(caption.split(", "))
    assert a == shuffle_tags(caption, 1, seed=0, step=5, key="k")
    orders = {shuffle_tags(caption, 1, seed=0, step=s, key="k") for s in range(20)}
    assert len(orders) > 5
    assert shuffle_tags(caption, 5, 0, 3, "k") == caption  # all kept: unchanged


def test_shuffled_captions_are_tokenized_per_step_and_cached_embeddings_dropped(multi, tiny_model):
    root, _ = multi
    tok = load_tokenizer(tiny_model)
    stream = _stream(root / "latents", tags=TagShuffle(tok, keep=1))
    import itertools

    tag_captions = []
    for _, batch in itertools.islice(stream.batches(0), 2 * stream.steps_in_epoch(0)):
        assert "encoder_hidden_states" not in batch  # those are of the unshuffled caption
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
        tag_captions += [t for t in texts if "small" in t]
    # (the tiny tokenizer decodes "a, b" as "a , b")
    assert tag_captions and all(t.startswith("shape , ") for t in tag_captions)  # kept first
    assert any(not t.endswith("small , centred , plain") for t in tag_captions)  # shuffled


def test_training_with_several_captions_and_shuffled_tags_resumes_exactly(
    multi, tiny_model, tmp_path
):
    root, _ = multi
    cfg = TrainConfig(
        train_batch_size=4,
        max_train_steps=6,
        checkpointing_steps=3,
        learning_rate=1e-3,
        shuffle_caption=True,
        keep_tokens=1,
        shuffle_buffer=8,
        report_to="none",
    )
    _, report = train_then_resume(cfg, root / "latents", tiny_model, tmp_path, "checkpoint-6")
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert report.resumed_from_step == 3
    assert (straight / "t/loss.csv").read_text() == (resumed / "t/loss.csv").read_text()


def test_keep_tokens_needs_shuffle_caption():
    with pytest.raises(ValueError, match="keep_tokens needs shuffle_caption"):
        TrainConfig(keep_tokens=2)
