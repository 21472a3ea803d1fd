"""Tiny models built offline from a seed: the CLIP BPE tokenizer (shared by the tiny
SD model and the tiny CLIP), and the evaluation's tiny CLIP and tiny DINOv2 feature
extractor. Same seed, same weights; nothing is downloaded. Their scores are computed
by the same code as with real models, but mean nothing about image quality.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import torch

MAX_TOKENS = 77
# The `model.source` values built offline from `model.seed` (components/base_model/tiny.py).
TINY_SOURCES = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux")
_WORDS = (
    "a an the on of in with and background image photo picture "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star diamond ellipse rectangle shape small large big "
    "dark light bright colored coloured painting drawing of on top"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over `words` (each ending in </w>); ties broken alphabetically."""
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = freq
        corpus = merged
    return merges


def build_tiny_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = _learn_merges(sorted(set(_WORDS)), n_merges=200)
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(d, "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        )
        return CLIPTokenizer(
            str(Path(d, "vocab.json")), str(Path(d, "merges.txt")), model_max_length=MAX_TOKENS
        )


def build_tiny_clip(seed: int, image_size: int = 32):
    """(CLIPModel, CLIPProcessor): a randomly initialised tiny CLIP."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": MAX_TOKENS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed + 10)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer)
    return model, processor


def build_tiny_dinov2(seed: int, image_size: int = 32):
    """(Dinov2Model, image size, mean, std): a randomly initialised tiny DINOv2."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=image_size,
    )
    torch.manual_seed(seed + 20)
    return Dinov2Model(config).eval(), image_size, _IMAGENET_MEAN, _IMAGENET_STD


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image_processor(size: int):
    """CLIP's preprocessing at `size` (the PIL variant: no torchvision here)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
    )


def build_tiny_t5_tokenizer():
    """A T5TokenizerFast (SentencePiece-style Unigram over the tiny word list, built
    with `tokenizers`: no download, no sentencepiece): `<pad>` 0, `</s>` 1, `<unk>` 2,
    and `</s>` after every text, as T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted(set(_WORDS))
    letters = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in letters]
    pieces += [("▁" + c, -4.0) for c in letters] + [(",", -3.0), ("▁,", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_ids=0, model_max_length=512,
    )  # fmt: skip
