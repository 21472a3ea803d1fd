"""One sample in, one clean shard record (or a rejection reason) out.

Runs in worker processes, so everything here is a pure function of the sample and
the pack config. The image is fully decoded (`load()`, which catches truncation),
EXIF orientation applied, converted to RGB, filtered and optionally downscaled.
With `image_format: auto` the source's own bytes are stored when they already decode
to that image (a single-frame RGB JPEG/PNG/WebP, no EXIF rotation, not downscaled);
otherwise it is re-encoded: lossless PNG, or JPEG at `quality` for photo sources
(JPEG/WebP). Nothing is unpickled: images come in as bytes, records go out as bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from components.common.config import PackConfig
from components.pack_shards.sources import MISSING, Sample

PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
EXT = {v: k for k, v in PIL_FORMAT.items()}
_PHOTO_FORMATS = {"JPEG", "WEBP", "MPO"}  # lossy sources: re-encoded as JPEG, not PNG
_ORIENTATION = 0x0112


class Rejected(Exception):
    """A sample that cannot be packed; the message is the reason (`kind: detail`)."""


@dataclass
class Packed:
    key: str
    record: dict[str, bytes]  # {"__key__", image ext, "txt", "json"}
    pixels_sha256: str


def pack_sample(
    sample: Sample, cfg: PackConfig, data: bytes | OSError | None = None
) -> Packed | str:
    """The shard record for `sample`, or the reason it is rejected (never raises).

    `data`: the image bytes when the caller has read them already (or the read error).
    """
    try:
        return _pack(sample, cfg, data)
    except Rejected as why:
        return str(why)
    except Exception as e:  # a decoder bug must cost one sample, not the run
        return f"undecodable: {type(e).__name__}: {e}"


def _pack(sample: Sample, cfg: PackConfig, data: bytes | OSError | None) -> Packed:
    if sample.problem:
        raise Rejected(sample.problem)
    if sample.blob is None:
        raise Rejected("missing_file")
    captions = clean_captions(sample, cfg)
    if data is None:
        data = sample.blob.read()
    if isinstance(data, OSError):
        raise Rejected(f"undecodable: unreadable file ({data})")
    if not data:
        raise Rejected("undecodable: empty file")
    image, info = decode_image(data, cfg)
    w, h = image.size
    if min(w, h) < cfg.min_image_side:
        raise Rejected(f"too_small: {w}x{h}")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise Rejected(f"aspect_ratio: {w}x{h}")
    image = downscale(image, cfg.max_image_side)
    check_not_blank(image, cfg, info)
    pixels_sha256 = hashlib.sha256(image.tobytes()).hexdigest()
    ext, as_is = _storage(cfg, info, image.size == (w, h))
    meta = {
        "source": sample.source,
        "size": [w, h],
        "mode": info["mode"],
        "format": info["format"],
        "sha256": hashlib.sha256(data).hexdigest(),
        "pixels_sha256": pixels_sha256,
        "stored_size": list(image.size),
        "stored": "source bytes" if as_is else "re-encoded",
    }
    if info["frames"] > 1:
        meta["frames"] = info["frames"]
    record = {
        "__key__": sample.key,
        ext: data if as_is else encode_image(image, ext, cfg.quality),
        "txt": "\n".join(captions).encode("utf-8"),  # one caption per line
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    return Packed(sample.key, record, pixels_sha256)


def _storage(cfg: PackConfig, info: dict, same_size: bool) -> tuple[str, bool]:
    """(record extension, whether the source's bytes are stored as they are)."""
    if cfg.image_format != "auto":
        return cfg.image_format, False
    as_is = (
        info["format"] in EXT
        and info["mode"] == "RGB"
        and info["frames"] == 1
        and info["orientation"] in (None, 1)
        and same_size
    )
    if as_is:
        return EXT[info["format"]], True
    return ("jpg" if info["format"] in _PHOTO_FORMATS else "png"), False


def clean_captions(sample: Sample, cfg: PackConfig) -> list[str]:
    """The sample's captions: a list (a `datasets` list column, a JSON list in
    metadata.jsonl) or one per line of a text; each valid UTF-8 with whitespace
    normalised, empty ones dropped. None left: per `pack.empty_caption`."""
    raw = sample.caption
    texts = [_caption_text(c) for c in raw] if isinstance(raw, list) else [_caption_text(raw)]
    captions = [
        " ".join(line.split()) for text in texts if text is not None for line in text.splitlines()
    ]
    captions = [c for c in captions if c]
    if captions:
        return captions
    if cfg.empty_caption == "keep":
        return [""]
    if cfg.empty_caption == "filename":
        stem = PurePosixPath(sample.source.rsplit(":", 1)[-1]).stem
        return [" ".join(stem.replace("_", " ").replace("-", " ").split())]
    missing = raw is MISSING or raw == []
    raise Rejected("missing_caption" if missing else "empty_caption")


def _caption_text(raw) -> str | None:
    """One caption value as text; Rejected for bytes that are not UTF-8."""
    if raw is MISSING:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_utf8_caption") from None
    raw = raw if isinstance(raw, str) else str(raw)  # a number in a CSV/parquet column
    try:
        raw.encode("utf-8")  # lone surrogates: undecodable bytes in the metadata
    except UnicodeEncodeError:
        raise Rejected("invalid_utf8_caption") from None
    return raw


def decode_image(data: bytes, cfg: PackConfig) -> tuple[Image.Image, dict]:
    """Fully decoded, EXIF-oriented RGB image (first frame) and what it was."""
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                info = {
                    "mode": img.mode,
                    "format": img.format,
                    "frames": getattr(img, "n_frames", 1),
                    "orientation": img.getexif().get(_ORIENTATION),
                }
                _draft_for(img, cfg.max_image_side)
                img.load()
                oriented = ImageOps.exif_transpose(img)
                info["transparent"] = has_transparency(oriented)
                if info["transparent"] and cfg.alpha_background == "reject":
                    raise Rejected("transparent: it has transparency (pack.alpha_background)")
                return to_rgb(oriented, _background(cfg)), info
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"decompression_bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL names the in-memory file by its address: the same sample, the same line.
        raise Rejected(f"undecodable: {_ADDRESS.sub('', str(e))}") from None


_ADDRESS = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")


def _draft_for(img: Image.Image, max_side: int | None) -> None:
    """Let the JPEG decoder scale by 1/2..1/8 when we downscale anyway (much faster),
    never below the size we will resize to."""
    if img.format != "JPEG" or not max_side or max(img.size) <= max_side:
        return
    scale = max_side / max(img.size)
    img.draft("RGB", (max(1, round(img.width * scale)), max(1, round(img.height * scale))))


def _background(cfg: PackConfig) -> tuple[int, int, int]:
    from PIL import ImageColor

    colour = "white" if cfg.alpha_background == "reject" else cfg.alpha_background
    return ImageColor.getrgb(colour)[:3]


def has_transparency(img: Image.Image) -> bool:
    """Whether any pixel is less than opaque."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def check_not_blank(image: Image.Image, cfg: PackConfig, info: dict) -> None:
    """Rejected (`blank`) when the image is nearly one colour after conversion (what a
    white logo on a transparent background becomes on a white one): a blank picture
    teaches nothing, and several of them used to pass as duplicates of one another."""
    if not cfg.blank_threshold:
        return
    small = image if max(image.size) <= 64 else image.resize((64, 64), Image.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32).reshape(-1, 3)
    if float(pixels.std(axis=0).max()) >= cfg.blank_threshold:
        return
    colour = "#" + "".join(f"{int(c):02x}" for c in pixels.mean(axis=0).round())
    why = f"blank: nearly one colour ({colour}) after conversion"
    if info.get("transparent"):
        why += f", its transparency flattened onto {cfg.alpha_background} (pack.alpha_background)"
    raise Rejected(why)


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB: transparency composited on `background`, 16-bit scaled down, CMYK converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(img, dtype=np.float64)
        sixteen = img.mode.startswith("I;16") or (img.mode == "I" and array.max(initial=0) > 255)
        peak = 65535.0 if sixteen else 255.0
        array = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return img.convert("RGB")


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """Longest side to at most `max_side` (LANCZOS), aspect ratio kept."""
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.LANCZOS)


def encode_image(image: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    fmt = PIL_FORMAT[ext]
    if fmt == "PNG":
        image.save(buf, fmt, compress_level=6)
    elif fmt == "WEBP":
        image.save(buf, fmt, quality=quality, method=4)
    else:
        image.save(buf, fmt, quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()
