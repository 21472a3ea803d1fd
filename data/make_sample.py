"""Generate data/sample/: small captioned images of coloured shapes (imagefolder layout).

Deterministic: the same script writes the same files. Run from the repo root:
    python data/make_sample.py [--out data/sample] [--count 200]
"""

from __future__ import annotations

import argparse
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


def make_sample(out: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg = names[(i // len(SHAPES)) % len(names)]
        bg = rng.choice([n for n in names if n != fg])
        w, h = SIZES[i % len(SIZES)]
        img = Image.new("RGB", (w, h), COLOURS[bg])
        side = rng.randint(min(w, h) // 2, min(w, h) - 8)
        x0, y0 = rng.randint(2, w - side - 2), rng.randint(2, h - side - 2)
        draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[fg])
        name = f"{i:04d}.png"
        img.save(out / name, optimize=True)
        rows.append({"file_name": name, "text": f"a {fg} {shape} on a {bg} background"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "sample")
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    make_sample(args.out, args.count)
