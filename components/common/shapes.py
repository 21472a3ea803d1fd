"""Captioned pictures of coloured shapes: the bundled sample data (`data/sample/`,
`data/make_sample.py`) and the images the tiny VAE is pretrained on. Deterministic:
the same seed draws the same pictures."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ((64, 64), (80, 64), (64, 80))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def picture(
    rng: random.Random, shape: str, fg: str, size: tuple[int, int]
) -> tuple[Image.Image, str]:
    """One picture (a `fg` `shape` on a random other colour) and its caption."""
    bg = rng.choice([n for n in COLOURS if n != fg])
    w, h = size
    img = Image.new("RGB", (w, h), COLOURS[bg])
    side = rng.randint(min(w, h) // 2, min(w, h) - 8)
    x0, y0 = rng.randint(2, w - side - 2), rng.randint(2, h - side - 2)
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def make_sample(out: Path, count: int, seed: int = 0) -> None:
    """`count` captioned PNGs + metadata.jsonl in `out` (imagefolder layout)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    for i in range(count):
        shape, fg = SHAPES[i % len(SHAPES)], names[(i // len(SHAPES)) % len(names)]
        img, caption = picture(rng, shape, fg, SIZES[i % len(SIZES)])
        name = f"{i:04d}.png"
        img.save(out / name, optimize=True)
        rows.append({"file_name": name, "text": caption})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def random_pictures(count: int, size: int, seed: int) -> list[Image.Image]:
    """`count` square pictures with random shape, colours and placement, drawn at the
    sample data's 64 px and downscaled to `size` as the cache does."""
    rng = random.Random(seed)
    pictures = []
    for _ in range(count):
        img, _ = picture(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)), (64, 64))
        pictures.append(img.resize((size, size), Image.LANCZOS))
    return pictures
