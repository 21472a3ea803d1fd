"""The training data stream: deterministic, disjoint per rank, exactly resumable."""

import itertools

import pytest
import torch

from components.common.errors import ConfigError
from components.common.records import read_latent_manifest
from components.train_unet.data import LatentStream
from components.train_unet.objective import snr_weights


def stream(latents, **kw):
    manifest = read_latent_manifest(latents)
    limit = kw.pop("max_samples", None)
    args = dict(batch_size=4, seed=0, shuffle_buffer=8)
    args.update(kw)
    return LatentStream.from_manifest(latents, manifest, limit, **args)


def take(s, start, n):
    return list(itertools.islice(s.batches(start), n))


def ids(batch):
    return [tuple(row.tolist()) for row in batch["mean"].flatten(1)[:, :4]]


def test_an_epoch_sees_each_sample_at_most_once_in_a_seeded_order(latents):
    s = stream(latents)
    n = s.steps_in_epoch(0)
    epoch0 = [r for _, b in take(s, 0, n) for r in ids(b)]
    assert len(set(epoch0)) == len(epoch0) == n * 4
    epoch1 = [r for _, b in take(s, n, n) for r in ids(b)]
    assert epoch1 != epoch0  # reshuffled
    again = [r for _, b in take(stream(latents), 0, n) for r in ids(b)]
    assert again == epoch0
    other_seed = [r for _, b in take(stream(latents, seed=1), 0, n) for r in ids(b)]
    assert other_seed != epoch0


@pytest.mark.parametrize("start", [3, 5, 11])
def test_resume_replays_to_the_exact_next_batch(latents, start):
    s = stream(latents)
    assert s.steps_in_epoch(0) < 11  # start=11 lies in epoch >= 1
    straight = take(s, 0, start + 3)[start:]
    resumed = take(stream(latents), start, 3)
    for (a_step, a), (b_step, b) in zip(straight, resumed, strict=True):
        assert a_step == b_step
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_workers_do_not_change_the_batches(latents):
    plain, threaded = take(stream(latents), 0, 6), take(stream(latents, workers=2), 0, 6)
    for (_, a), (_, b) in zip(plain, threaded, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_read_disjoint_samples_and_make_the_one_process_batch(latents):
    one = stream(latents, batch_size=4, streams=2)
    ranks = [stream(latents, batch_size=2, rank=r, world=2) for r in range(2)]
    for epoch in range(3):
        parts = [
            {(p.ref.path, n) for k in r.mine for p in r.stream_pieces(epoch, k)
             for n in range(p.start, p.stop)}
            for r in ranks
        ]  # fmt: skip
        assert not parts[0] & parts[1]
        assert len(parts[0] | parts[1]) == ranks[0].total
    for (_, whole), (_, a), (_, b) in zip(
        take(one, 0, 5), take(ranks[0], 0, 5), take(ranks[1], 0, 5), strict=True
    ):
        for k in whole:
            assert torch.equal(whole[k], torch.cat([a[k], b[k]]))


def test_uneven_shards_still_give_every_stream_an_equal_share(latents):
    """Shards of 16, 16 and 6 train samples dealt whole to 2 streams would give one
    stream 22 and the other 16, and an epoch of 16 // 2 batches (6 samples never
    trained). Ranges of samples give each stream 19: 9 batches, 2 left out, and the
    count of what is left out is reported."""
    sizes = sorted(r.samples for r in stream(latents).shards)
    assert len(set(sizes)) > 1  # uneven
    s = stream(latents, batch_size=4, streams=2)  # 2 samples per stream per batch
    total, n = s.total, s.steps_in_epoch(0)
    seen = [r for _, b in take(s, 0, n) for r in ids(b)]
    assert len(set(seen)) == len(seen) == n * 4
    assert total - len(seen) < s.global_batch
    assert n == (total // 2) // 2
    line, left = s.epoch_summary()
    assert left == total - len(seen) and f"{left} left out each epoch" in line


def test_max_train_samples_and_empty_prompts(latents):
    limited = stream(latents, max_samples=9, batch_size=3)
    assert sum(r.samples for r in limited.shards) == 9 and limited.steps_in_epoch(0) == 3
    empty = {"input_ids": torch.zeros(77, dtype=torch.long)}
    all_empty = stream(latents, empty_prompt=empty, proportion_empty_prompts=1.0)
    none_empty = stream(latents, empty_prompt=empty, proportion_empty_prompts=0.0)
    (_, a), (_, b) = take(all_empty, 0, 1)[0], take(none_empty, 0, 1)[0]
    assert (a["input_ids"] == 0).all() and (b["input_ids"] != 0).any()


def test_too_few_samples_for_the_streams_is_a_config_error(latents):
    with pytest.raises(ConfigError, match="less than one global batch of 64"):
        stream(latents, streams=64, batch_size=64)
    assert stream(latents, streams=8, batch_size=8).steps_in_epoch(0) == 4  # 8 streams, 3 shards
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        stream(latents, streams=3, world=2, batch_size=3)


def test_snr_weights_match_the_recipe(tiny_model):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    sched.register_to_config(prediction_type="epsilon")
    t = torch.tensor([1, 100, 500, 999])
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(snr_weights(sched, t, 5.0), expected)
    sched.register_to_config(prediction_type="v_prediction")
    torch.testing.assert_close(
        snr_weights(sched, t, 5.0), torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    )
