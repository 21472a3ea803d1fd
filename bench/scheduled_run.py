"""Scheduled-run benchmark: what a run costs after 1% new data, against the first run.

Makes a folder source of `--images` small PNGs with .txt captions, then runs the
pipeline's own fingerprint, pack and cache stages (`pipelines/stages.py`, the code a
KFP pod runs, with a workspace and the tiny base model of params.yaml) twice: run 1
on the source, run 2 after `--grow` (1%) new images, run 3 with nothing new (the fixed
overhead: listing, stat index, manifests). For each stage of each run:
wall time, bytes of source files read (every `open` of a file under the source,
counted in the worker processes too), all bytes read (`rchar`, children included),
and bytes of the stage's KFP output artifact (what the launcher would upload and
every consumer download) next to the bytes the store gained. Then the train
start-up (to the end of its first step) on the run-2 cache: with the hash cache the
cache stage filled (this code), and with an empty one, which hashes every latent
shard as every start and resume did before.

    python bench/scheduled_run.py --images 50000 --json docs/bench-results/scheduled_run.json
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components import base_model, train_unet  # noqa: E402
from components.common.config import load_params  # noqa: E402
from pipelines import stages  # noqa: E402

COLOURS = np.array(
    [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (250, 250, 250), (20, 20, 20)]
)


class Art:
    """The part of a KFP artifact a stage uses: a path and metadata."""

    def __init__(self, path: Path):
        self.path, self.metadata = str(path), {}


def make_images(folder: Path, start: int, count: int) -> None:
    """Distinct 32-px PNGs (a coloured square on a background; the index coded in the
    corner, so no two are duplicates) with one-line captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        bg, fg = rng.choice(len(COLOURS), 2, replace=False)
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = COLOURS[bg]
        x, y = rng.integers(4, 16, 2)
        img[y : y + 12, x : x + 12] = COLOURS[fg]
        img[0, :3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        Image.fromarray(img).save(folder / f"{i:07d}.png", compress_level=1)
        (folder / f"{i:07d}.txt").write_text(f"a square of colour {fg} on colour {bg}")


# -- reads of the source, in this process and in forked workers ---------------------

_SOURCE_READ = multiprocessing.Value("q", 0, lock=True)  # shared with forked workers
_SOURCE = [""]
_open = builtins.open


class _Counted:
    """A file whose reads add to _SOURCE_READ."""

    def __init__(self, f):
        self._f = f

    def _add(self, n: int) -> None:
        with _SOURCE_READ.get_lock():
            _SOURCE_READ.value += n

    def read(self, *a):
        data = self._f.read(*a)
        self._add(len(data))
        return data

    def readinto(self, b):
        n = self._f.readinto(b)
        self._add(n or 0)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        for line in self._f:
            self._add(len(line))
            yield line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _counting_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if _SOURCE[0] and "r" in mode and str(file).startswith(_SOURCE[0]):
        return _Counted(f)
    return f


def rchar() -> int:
    """Bytes read by read() calls of this process and its reaped children."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def measure(name: str, fn) -> dict:
    source0, rchar0, t0 = _SOURCE_READ.value, rchar(), time.perf_counter()
    fn()
    return {
        "stage": name,
        "seconds": round(time.perf_counter() - t0, 3),
        "source_bytes_read": _SOURCE_READ.value - source0,
        "bytes_read": rchar() - rchar0,
    }


def run_once(n: int, params, src: Path, ws: Path, root: Path, base: Art) -> dict:
    """fingerprint, pack, cache as the pipeline's tasks run them; run `n`'s outputs."""
    os.environ[stages.RUN_ID_ENV] = f"bench-run-{n}"
    ctx = stages.Context(ws, None)
    source, found = str(src), {}
    shards, latents = Art(root / f"run{n}" / "shards"), Art(root / f"run{n}" / "latents")
    store0 = du(ws / "pack") if (ws / "pack").exists() else 0
    cache0 = du(ws / "cache") if (ws / "cache").exists() else 0

    def fingerprint():
        index = stages.source_index(ctx, source)
        found["key"] = stages.source_fingerprint(source, params.data, index)

    rows = [measure("fingerprint", fingerprint)]
    rows.append(
        measure(
            "pack", lambda: stages.pack(ctx, source, found["key"], params.data, params.pack, shards)
        )  # fmt: skip
    )
    rows[-1].update(
        artifact_bytes=du(Path(shards.path)), store_bytes_added=du(ws / "pack") - store0
    )
    rows.append(measure("cache", lambda: stages.cache(ctx, 1, params.cache, shards, base, latents)))
    rows[-1].update(
        artifact_bytes=du(Path(latents.path)), store_bytes_added=du(ws / "cache") - cache0
    )
    notes = {s: json.loads((ws / "runs" / f"bench-run-{n}" / f"{s}.json").read_text())
             for s in ("pack", "cache")}  # fmt: skip
    return {
        "run": n,
        "stages": rows,
        "seconds": round(sum(r["seconds"] for r in rows), 3),
        "pack": notes["pack"]["summary"],
        "cache": notes["cache"]["summary"],
        "latents": latents.path,
    }


def train_start(params, latents: str, base: Art, root: Path, hash_cache: Path) -> float:
    """Seconds from the call to the end of step 1 (the model load, the checks, the
    latent shards' verification, one step), with `hash_cache` as T2I_HASH_CACHE."""
    os.environ["T2I_HASH_CACHE"] = str(hash_cache)
    cfg = params.train.model_copy(
        update={"max_train_steps": 1, "validation_prompts": [], "checkpointing_steps": 10**6}
    )
    out = root / f"train-{hash_cache.name}-{time.time_ns()}"
    t0 = time.perf_counter()
    train_unet.run(cfg, Path(latents), Path(base.path), out, out / "reports", out / "ck")
    return round(time.perf_counter() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--grow", type=float, default=0.01, help="new images before run 2")
    ap.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="t2i-bench-scheduled-"))
    src, ws = (root / "source").resolve(), (root / "workspace").resolve()
    os.environ["T2I_HASH_CACHE"] = str(root / "hashes")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")

    t0 = time.perf_counter()
    make_images(src, 0, args.images)
    made = time.perf_counter() - t0
    base = Art(root / "base-model")
    base_model.run(params.model, Path(base.path))
    _SOURCE[0] = str(src)
    builtins.open = io.open = _counting_open
    results = {"images": args.images, "source_bytes": du(src), "made_s": round(made, 1)}
    results["run1"] = run_once(1, params, src, ws, root, base)
    new = max(1, round(args.images * args.grow))
    make_images(src, args.images, new)
    results["new_images"] = new
    results["run2"] = run_once(2, params, src, ws, root, base)
    # The fixed overhead: the same stages again with nothing new (a scheduled run would
    # stop after fingerprint; pack and cache forced, to time what they cost regardless).
    results["run3_unchanged"] = run_once(3, params, src, ws, root, base)
    builtins.open = io.open = _open
    one, two, fixed = (results[k]["seconds"] for k in ("run1", "run2", "run3_unchanged"))
    results["run2_over_run1"] = round(two / one, 4)
    results["run2_beyond_fixed_over_run1"] = round((two - fixed) / one, 4)
    latents = results["run2"]["latents"]
    # Alternated, fastest of two each (the first call in a process also warms up torch).
    starts = {"verified_once": [], "every_shard_hashed": []}
    for i in range(2):
        starts["every_shard_hashed"].append(
            train_start(params, latents, base, root, root / f"empty-hashes-{i}")
        )
        starts["verified_once"].append(train_start(params, latents, base, root, root / "hashes"))
    results["train_start_s"] = {k: min(v) for k, v in starts.items()}
    results["latent_store_bytes"] = du(ws / "cache")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
