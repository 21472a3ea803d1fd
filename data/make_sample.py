"""Generate data/sample/: small captioned images of coloured shapes (imagefolder layout).

Deterministic: the same script writes the same files. Run from the repo root:
    python data/make_sample.py [--out data/sample] [--count 200]
The pictures are drawn by `components/common/shapes.py` (the tiny VAE learns from it too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.common.shapes import make_sample

__all__ = ["make_sample"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "sample")
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    make_sample(args.out, args.count)
