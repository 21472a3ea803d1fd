"""Several captions per image, and kohya-style tag shuffling.

A packed record's `txt` holds one caption per line (a single caption is the one line
it always was). The cache stores each caption's token ids (and text embeddings)
stacked; a sample with one caption keeps the unstacked layout. Training takes caption
`caption_index(seed, epoch, key, n)` of each sample, so every epoch may see another
caption, the same one on every rank and after a resume.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from components.common.families import FAMILIES

# Per caption, what a cached sample holds, and how many dimensions one caption has:
# what any family caches (`Family.caption_tensors`: its tokenizers' ids, the states, the
# pooled embedding).
CAPTION_TENSORS = {k: v for f in FAMILIES.values() for k, v in f.caption_tensors.items()}


def split_captions(text: str) -> list[str]:
    """The captions of a record's `txt` (one per line); an empty text is one empty caption."""
    return text.split("\n") if text else [""]


def caption_count(tensors: dict[str, torch.Tensor]) -> int:
    ids = tensors["input_ids"]
    return ids.shape[0] if ids.dim() == 2 else 1


def pick_caption(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """`tensors` with the caption tensors of caption `index` only (unstacked)."""
    out = dict(tensors)
    for name, dims in CAPTION_TENSORS.items():
        t = tensors.get(name)
        if t is not None and t.dim() == dims + 1:
            out[name] = t[index]
    return out


def caption_index(seed: int, epoch: int, key: str, n: int) -> int:
    """Which of a sample's `n` captions epoch `epoch` trains on: a pure function of
    (seed, epoch, sample key)."""
    if n <= 1:
        return 0
    return int(np.random.default_rng([seed, epoch, zlib.crc32(key.encode())]).integers(n))


def shuffle_tags(caption: str, keep: int, seed: int, step: int, key: str) -> str:
    """kohya's `shuffle_caption`: the comma-separated tags in an order drawn from
    (seed, step, key), the first `keep` tags left in place."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng = np.random.default_rng([seed, step, zlib.crc32(key.encode()), 2])
    order = rng.permutation(len(tail))
    return ", ".join(head + [tail[i] for i in order])
