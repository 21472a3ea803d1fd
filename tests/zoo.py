"""A bad-input zoo for pack: every broken or awkward file users actually have.

`make_zoo(folder)` writes the files and a metadata.jsonl, and returns
{source: expected reason} for the rejects and {source: check} for the keepers.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def bomb_png() -> bytes:
    """A 200-byte PNG that claims 100000x100000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (w / (2 + seed % 3)) + seed),
            128 + 100 * np.cos(y / (h / 3) + seed / 2),
            128 + 80 * np.sin((x + y) / (w / 2)),
        ],
        axis=-1,
    )
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def make_zoo(folder: Path, outside: Path) -> tuple[dict[str, str], set[str]]:
    """Write the zoo into `folder` (a symlink points into `outside`).

    Returns (expected rejection reason prefix by source, sources expected to be kept).
    """
    folder.mkdir(parents=True)
    rows: list[tuple[str, object]] = []
    reject: dict[str, str] = {}
    keep: set[str] = set()

    def add(name: str, caption: object = "a caption", why: str | None = None) -> None:
        rows.append((name, caption))
        (reject.__setitem__(name, why) if why else keep.add(name))

    good = io.BytesIO()
    photo(64, 48, 1).save(good, "JPEG", quality=90)
    (folder / "good.jpg").write_bytes(good.getvalue())
    add("good.jpg")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    add("truncated.jpg", why="undecodable")
    png = io.BytesIO()
    photo(64, 48, 2).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    add("truncated.png", why="undecodable")
    (folder / "zero.png").write_bytes(b"")
    add("zero.png", why="undecodable")
    (folder / "text.jpg").write_text("this is not a jpeg\n")
    add("text.jpg", why="undecodable")
    Image.new("RGB", (1, 1), "red").save(folder / "one.png")
    add("one.png", why="too_small")
    Image.new("RGB", (20000, 10), "blue").save(folder / "strip.png")
    add("strip.png", why="aspect_ratio")
    # (Keepers have a second colour somewhere: a picture of one colour is `blank`.)
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 255), (0, 0, 10, 10))
    cmyk.save(folder / "cmyk.jpg", quality=95)
    add("cmyk.jpg")
    sixteen = np.full((40, 40), 32768, dtype=np.uint16)
    sixteen[30:, 30:] = 0
    Image.fromarray(sixteen).save(folder / "gray16.png")
    add("gray16.png")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # transparent...
    rgba.paste((0, 0, 255, 255), (20, 0, 40, 40))  # ...left half, opaque blue right half
    rgba.save(folder / "rgba.png")
    add("rgba.png")
    logo = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # a white logo on transparency:
    logo.paste((255, 255, 255, 255), (10, 10, 30, 30))  # on white, nothing is left
    logo.save(folder / "white-logo.png")
    add("white-logo.png", why="blank")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(folder / "gray.png")
    add("gray.png", why="blank")
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (20, 0, 40, 40))
    pal.save(folder / "transparent.gif", transparency=0)
    add("transparent.gif")
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 200, 0), (200, 0, 0))]
    frames[0].paste((0, 0, 200), (30, 30, 40, 40))
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    add("animated.gif")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated.save(folder / "rotated.jpg", quality=95, exif=exif)
    add("rotated.jpg")
    photo(40, 40, 3).save(folder / "badcaption.png")
    add("badcaption.png", b"caf\xe9 in latin-1", why="invalid_utf8_caption")
    photo(40, 40, 4).save(folder / "emptycaption.png")
    add("emptycaption.png", "   \t ", why="empty_caption")
    photo(40, 40, 5).save(folder / "nocaption.png")
    add("nocaption.png", None, why="missing_caption")
    (folder / "duplicate.jpg").write_bytes(good.getvalue())
    add("duplicate.jpg", why="duplicate")
    photo(40, 40, 6).save(folder / "fotó ñ 1 – été.png")
    add("fotó ñ 1 – été.png")
    outside.mkdir(parents=True, exist_ok=True)
    photo(40, 40, 7).save(outside / "secret.png")
    (folder / "link.png").symlink_to(outside / "secret.png")
    add("link.png", why="symlink_outside_source")
    (folder / "bomb.png").write_bytes(bomb_png())
    add("bomb.png", why="decompression_bomb")
    add("absent.png", why="missing_file")

    lines = []
    for name, caption in rows:
        if caption is None:
            lines.append(json.dumps({"file_name": name}).encode())
        elif isinstance(caption, bytes):  # raw invalid UTF-8 inside the JSON string
            lines.append(b'{"file_name": "' + name.encode() + b'", "text": "' + caption + b'"}')
        else:
            lines.append(json.dumps({"file_name": name, "text": caption}).encode())
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return reject, keep
