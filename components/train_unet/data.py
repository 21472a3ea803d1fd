"""The training data: a deterministic, resumable stream of batches over latent shards.

Every epoch the train shards are put in an order drawn from (seed, epoch); laid end
to end, their samples are cut into `S` equal ranges, one per stream (a shard at a
boundary is read by both neighbours), so every stream holds the same number of
samples, give or take one, however uneven the shards. Each stream reads its range
front to back, WebDataset style, through a shuffle buffer seeded by (seed, epoch, s)
and cuts batches of G/S samples; the global batch of micro-step t is the t-th batch
of every stream, side by side. With N processes each rank owns S/N streams. S
defaults to N; N processes with batch B and one process with batch N·B and S=N see
the same global batches.

An epoch sees every sample once, except the few that fill no whole batch (fewer
than G; with buckets, a bucket's remainder): `epoch_summary` counts them, and the
train summary and `train_metrics.json` report them. The position (epoch, batch) is
a pure function of the micro-step, so a resumed run replays the stream to the exact
next sample, mid-epoch included. The choices a step makes per sample (flipped view,
empty prompt) come from (seed, micro-step) too.
"""

from __future__ import annotations

import bisect
import json
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load

from components.common.captions import (
    CAPTION_TENSORS,
    caption_count,
    caption_index,
    pick_caption,
    shuffle_tags,
)
from components.common.errors import ConfigError
from components.common.records import LatentManifest, shard_files
from components.common.shards import read_shard


@dataclass(frozen=True)
class ShardRef:
    path: Path
    samples: int  # how many of its samples are used (max_train_samples can cut the last)
    buckets: tuple[int, ...] | None = None  # cache.buckets: each used sample's bucket


@dataclass(frozen=True)
class Piece:
    """Records start..stop-1 of a shard: what one stream reads of it in an epoch."""

    ref: ShardRef
    start: int
    stop: int

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.ref.buckets[self.start : self.stop]


def step_generator(seed: int, micro_step: int, device="cpu") -> torch.Generator:
    """The generator of everything random in one micro-step."""
    return torch.Generator(device=device).manual_seed(seed * 7_919 + 1_000_003 * (micro_step + 1))


class LatentStream:
    """Batches for this rank: `batches(start)` yields (micro_step, batch) from `start`."""

    def __init__(
        self,
        shards: list[ShardRef],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        streams: int | None = None,
        shuffle_buffer: int = 1000,
        workers: int = 0,
        empty_prompt: dict[str, torch.Tensor] | None = None,
        proportion_empty_prompts: float = 0.0,
        tags: TagShuffle | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ):
        self.shards, self.seed, self.buffer = shards, seed, shuffle_buffer
        self.tags = tags
        # (width, height) of each bucket: a global batch is drawn from one bucket
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self._plans: dict[int, list[int]] = {}
        self.rank, self.world, self.workers = rank, world, workers
        self.streams = streams or world
        self.global_batch = batch_size * world
        if self.streams % world or self.global_batch % self.streams:
            raise ConfigError(
                f"train.data_streams={self.streams} must be a multiple of the {world} "
                f"processes and divide the global batch {self.global_batch}"
            )
        self.per_stream = self.global_batch // self.streams
        per_rank = self.streams // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.empty_prompt, self.p_empty = empty_prompt, proportion_empty_prompts
        self._pieces: dict[int, list[list[Piece]]] = {}
        if self.steps_in_epoch(0) == 0:
            if self.buckets is not None and self.total >= self.global_batch:
                raise ConfigError(
                    f"no bucket fills a global batch of {self.global_batch}: "
                    f"{self.epoch_summary()[0]}"
                )
            raise ConfigError(self._too_few())

    @property
    def total(self) -> int:
        """Train samples in an epoch."""
        return sum(s.samples for s in self.shards)

    def _too_few(self) -> str:
        """Why no full global batch fits in an epoch, and the settings that fix it."""
        streams, world = self.streams, self.world
        fits = self.total // world  # the largest train_batch_size that fits
        return (
            f"{self.total} train samples in {len(self.shards)} shards for {streams} data "
            f"streams ({world} processes x {streams // world}) of {self.per_stream} samples "
            f"per batch: less than one global batch of {self.global_batch}; "
            + (f"lower train.train_batch_size to {fits} or less, " if fits else "")
            + "or add data (or lower pack.val_fraction)"
        )

    @classmethod
    def from_manifest(
        cls, latents: Path, manifest: LatentManifest, max_samples: int | None, **kw
    ) -> LatentStream:
        refs, left = [], max_samples
        files = shard_files(latents, [s.name for s in manifest.shards if s.split == "train"])
        for shard in manifest.shards:
            if shard.split != "train" or left == 0:
                continue
            n = shard.samples if left is None else min(left, shard.samples)
            sample_buckets = shard.sample_buckets
            buckets = tuple(sample_buckets[:n]) if sample_buckets is not None else None
            refs.append(ShardRef(files[shard.name], n, buckets))
            left = None if left is None else left - n
        return cls(refs, buckets=manifest.buckets, **kw)

    # -- positions ---------------------------------------------------------------------

    def stream_pieces(self, epoch: int, stream: int) -> list[Piece]:
        """The parts of shards `stream` reads in `epoch`: the shards in the epoch's order,
        laid end to end, cut into `streams` ranges of (nearly) equal size."""
        if epoch not in self._pieces:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            bounds = [self.total * k // self.streams for k in range(self.streams + 1)]
            cuts: list[list[Piece]] = [[] for _ in range(self.streams)]
            offset = 0
            for i in order:
                ref = self.shards[i]
                lo, hi = offset, offset + ref.samples
                first = bisect.bisect_right(bounds, lo) - 1
                for k in range(first, min(self.streams, bisect.bisect_left(bounds, hi))):
                    a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
                    if a < b:
                        cuts[k].append(Piece(ref, a - lo, b - lo))
                offset = hi
            if len(self._pieces) > 1:  # a run reads one epoch at a time
                self._pieces.pop(next(iter(self._pieces)))
            self._pieces[epoch] = cuts
        return self._pieces[epoch][stream]

    def bucket_plan(self, epoch: int) -> list[int]:
        """With buckets: the bucket of each micro-step of `epoch`. Each bucket gives as
        many global batches as its scarcest stream fills; the batches' order is drawn
        from (seed, epoch). A pure function of the manifest, known to every rank."""
        if epoch not in self._plans:
            counts = [
                Counter(b for piece in self.stream_pieces(epoch, k) for b in piece.buckets)
                for k in range(self.streams)
            ]
            steps = {
                b: min(c[b] for c in counts) // self.per_stream
                for b in sorted(set().union(*counts))
            }
            plan = [b for b, n in steps.items() for _ in range(n)]
            order = np.random.default_rng([self.seed, epoch, 5]).permutation(len(plan))
            self._plans[epoch] = [plan[i] for i in order]
        return self._plans[epoch]

    def epoch_summary(self) -> tuple[str, int]:
        """(one line on what epoch 0 leaves out, or "" when nothing; how many samples).
        Without buckets that is the tail that fills no whole global batch; with
        buckets, each bucket's remainder, and a bucket too small for one global batch
        is named (it is not trained)."""
        if self.buckets is None:
            left = self.total - self.steps_in_epoch(0) * self.global_batch
            if not left:
                return "", 0
            return (
                f"data: {self.total} train samples, {self.steps_in_epoch(0)} global batches "
                f"of {self.global_batch} per epoch; {left} left out each epoch (fewer than "
                "a batch per stream; the shard order changes every epoch)",
                left,
            )
        parts, unused = [], 0
        for row in self.bucket_table():
            unused += row["left_out"]
            parts.append(
                f"{row['bucket']}: {row['samples']} samples, {row['batches']} batches"
                + (f", {row['left_out']} left out" if row["left_out"] and row["batches"] else "")
                + (
                    ""
                    if row["batches"]
                    else f" (too few for a global batch of {self.global_batch}: not "
                    "trained; lower train.train_batch_size to train them)"
                )
            )
        line = f"buckets (epoch 0): {'; '.join(parts)}"
        return line, unused

    def bucket_table(self) -> list[dict]:
        """With buckets, per bucket in epoch 0: its train samples, the global batches it
        fills and the samples it leaves out."""
        plan = Counter(self.bucket_plan(0))
        held = Counter(b for ref in self.shards for b in ref.buckets)
        rows = []
        for b, n in sorted(held.items()):
            w, h = self.buckets[b]
            rows.append(
                {
                    "bucket": f"{w}x{h}",
                    "samples": n,
                    "batches": plan[b],
                    "left_out": n - plan[b] * self.global_batch,
                }
            )
        return rows

    def steps_in_epoch(self, epoch: int) -> int:
        if self.buckets is not None:
            return len(self.bucket_plan(epoch))
        # Every epoch cuts the same total into the same ranges: the smallest holds
        # total // streams samples.
        return (self.total // self.streams) // self.per_stream

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a micro-step."""
        if self.buckets is None:
            per_epoch = self.steps_in_epoch(0)
            return micro_step // per_epoch, micro_step % per_epoch
        epoch = 0
        while micro_step >= self.steps_in_epoch(epoch):
            micro_step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, micro_step

    def micro_steps_for_epochs(self, epochs: int) -> int:
        if self.buckets is None:
            return epochs * self.steps_in_epoch(0)
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    # -- reading -------------------------------------------------------------------------

    def _samples(self, epoch: int, stream: int) -> Iterator[dict[str, bytes]]:
        """Raw records of one stream in one epoch, through the shuffle buffer."""
        rng = np.random.default_rng([self.seed, epoch, stream, 1])
        buffer: list[dict[str, bytes]] = []
        for piece in self.stream_pieces(epoch, stream):
            ref = piece.ref
            for n, record in enumerate(read_shard(ref.path)):
                if n < piece.start:  # (the neighbour's part of a shared shard)
                    continue
                if n >= piece.stop:
                    break
                if ref.buckets is not None:  # from the manifest: no need to read the JSON
                    record["__bucket__"] = ref.buckets[n]
                if len(buffer) < self.buffer:
                    buffer.append(record)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], record = record, buffer[i]
                yield record
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _raw_batches(self, start: int) -> Iterator[tuple[int, int, list[dict[str, bytes]]]]:
        """(micro_step, epoch, this rank's records) from micro-step `start`, forever."""
        if self.buckets is not None:
            yield from self._bucket_batches(start)
            return
        epoch, skip = self.position(start)
        step = start
        while True:
            streams = [self._samples(epoch, s) for s in self.mine]
            for _ in range(skip * self.per_stream):  # replay to the exact next sample
                for it in streams:
                    next(it)
            for _ in range(skip, self.steps_in_epoch(epoch)):
                rows = [next(it) for it in streams for _ in range(self.per_stream)]
                yield step, epoch, rows
                step += 1
            epoch, skip = epoch + 1, 0

    def _bucket_batches(self, start: int) -> Iterator[tuple[int, int, list[dict[str, bytes]]]]:
        """As `_raw_batches`, a bucket per micro-step: each stream hands over its next
        `per_stream` samples of that bucket, reading ahead (and holding the samples of
        other buckets) until it has them."""
        epoch, skip = self.position(start)
        step = start
        while True:
            readers = [_BucketReader(self._samples(epoch, s)) for s in self.mine]
            for i, bucket in enumerate(self.bucket_plan(epoch)):
                rows = [r for reader in readers for r in reader.take(bucket, self.per_stream)]
                if i >= skip:  # (a resumed run replays the reads to the exact next sample)
                    yield step, epoch, rows
                    step += 1
            epoch, skip = epoch + 1, 0

    def batches(self, start: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Decoded batches from micro-step `start`, prefetched by `workers` threads."""
        pool = ThreadPoolExecutor(self.workers) if self.workers else None
        decode = pool.map if pool else map

        def decoded():
            for step, epoch, rows in self._raw_batches(start):
                yield step, self._collate(step, epoch, list(decode(self._decode, rows)))

        return _prefetch(decoded(), 2 * self.workers) if pool else decoded()

    def _decode(self, record: dict[str, bytes]) -> dict:
        """A latent record's tensors and key (and, to shuffle tags, its captions' text)."""
        tensors = st_load(record["safetensors"])
        out: dict = {
            k: v.float() if v.is_floating_point() else v.long() for k, v in tensors.items()
        }
        out["__key__"] = record["__key__"]
        if self.tags is not None:
            meta = json.loads(record["json"])
            out["__captions__"] = meta.get("captions") or [meta["caption"]]
        return out

    def _captions(
        self, step: int, epoch: int, samples: list[dict]
    ) -> list[dict[str, torch.Tensor]]:
        """Each sample with one caption: that of this epoch (`caption_index`), its tags
        shuffled for this step when `tags` is set (then tokenized here, and the cached
        text embeddings of the unshuffled caption left out)."""
        picks = [caption_index(self.seed, epoch, s["__key__"], caption_count(s)) for s in samples]
        out = [pick_caption(s, i) for s, i in zip(samples, picks, strict=True)]
        if self.tags is None:
            return out
        texts = [
            shuffle_tags(s["__captions__"][i], self.tags.keep, self.seed, step, s["__key__"])
            for s, i in zip(samples, picks, strict=True)
        ]
        ids = self.tags.tokenize(texts)
        for i, s in enumerate(out):
            for name, rows in ids.items():
                s[name] = rows[i]
            s.pop("encoder_hidden_states", None)
            s.pop("text_embeds", None)
        return out

    def _collate(self, step: int, epoch: int, samples: list[dict]) -> dict:
        """Stack this rank's rows, choosing the caption, the flipped view and empty prompts."""
        samples = self._captions(step, epoch, samples)
        g = torch.Generator().manual_seed(self.seed * 104_729 + step)
        flips = (torch.rand(self.global_batch, generator=g) < 0.5)[self.rows]
        empty = (torch.rand(self.global_batch, generator=g) < self.p_empty)[self.rows]
        batch = {}
        # The view's tensors: the latent moments, and SDXL's size/crop ids (the flipped
        # view has its mirrored crop).
        for name in ("mean", "logvar", "time_ids"):
            if name in samples[0]:
                batch[name] = torch.stack(
                    [
                        s.get(f"{name}_flip", s[name]) if f else s[name]
                        for s, f in zip(samples, flips, strict=True)
                    ]
                )
        for name in CAPTION_TENSORS:
            if name in samples[0]:
                rows = [s[name] for s in samples]
                if self.empty_prompt is not None:
                    rows = [
                        self.empty_prompt[name] if e else r
                        for r, e in zip(rows, empty, strict=True)
                    ]
                batch[name] = torch.stack(rows)
        return batch

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch."""
        per_rank = self.global_batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


class _BucketReader:
    """One stream's records, handed out by bucket in the order they were read."""

    def __init__(self, records: Iterator[dict[str, bytes]]):
        self.records = records
        self.waiting: dict[int, deque] = {}

    def take(self, bucket: int, n: int) -> list[dict[str, bytes]]:
        queue_ = self.waiting.setdefault(bucket, deque())
        while len(queue_) < n:
            record = next(self.records)
            self.waiting.setdefault(record["__bucket__"], deque()).append(record)
        return [queue_.popleft() for _ in range(n)]


@dataclass(frozen=True)
class TagShuffle:
    """`train.shuffle_caption`: the family's tokenizers the shuffled captions go through
    (`conditioning.TextEncoders`, or one tokenizer), and how many leading tags stay in
    place (`keep_tokens`)."""

    text: object
    keep: int

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from components.common.conditioning import TextEncoders

        if isinstance(self.text, TextEncoders):
            return self.text.tokenize(captions)
        tok = self.text  # a tokenizer alone (SD's one)
        ids = tok(captions, padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        return {"input_ids": ids}


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, `depth` ahead (order kept)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
