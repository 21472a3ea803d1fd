"""Where samples come from: every supported dataset shape, listed as `Sample`s.

Listing is cheap (no image is decoded). Each sample names its image bytes by a
`Blob` (a file, a byte range of a tar, or bytes in memory) so worker processes can
read them, and carries the raw caption. Keys are stable hashes of where a sample
lives (its path, tar member or row), so adding data never renames old samples.

Formats (`data.format`, `auto` detects):
- imagefolder: metadata.jsonl / metadata.csv anywhere below the folder
- captions: images with same-name .txt captions
- datasets: a `save_to_disk` folder, parquet files, or `data.dataset_name`
- webdataset: existing .tar shards (members validated, re-sharded)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from components.common.config import DataConfig
from components.common.errors import ConfigError, T2IError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = ("txt", "caption", "text")
MISSING = None  # a caption that does not exist at all (no .txt, no column value)


@dataclass(frozen=True)
class Blob:
    """Image bytes: `path` alone, a `path` byte range, or `data` in memory."""

    path: str | None = None
    offset: int = 0
    size: int = -1
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Sample:
    key: str
    source: str  # what the user sees in reports: a relative path, tar member or row
    # Bytes are decoded (strict UTF-8) by the worker; a list is several captions, and
    # so is each line of a text.
    caption: str | bytes | list | None
    blob: Blob | None  # None: the image is missing
    problem: str | None = None  # a reason found while listing (symlink, unsafe member)


def sample_key(where: str) -> str:
    return hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def detect_format(source: Path, data: DataConfig) -> str:
    """The source's format: `data.format`, or detected from the folder's contents."""
    if data.dataset_name:
        return "datasets"
    if data.format != "auto":
        return data.format
    if not source.exists():
        raise ConfigError(f"data.source {str(source)!r}: no such file or folder")
    if source.is_file():
        kinds = {".tar": "webdataset", ".parquet": "datasets"}
        if source.suffix in kinds:
            return kinds[source.suffix]
        raise ConfigError(f"data.source {str(source)!r}: not a folder, .tar or .parquet file")
    if (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file():
        return "datasets"
    found = set()  # one walk; metadata decides at once, the rest by precedence
    for _, _, files in os.walk(source):
        for name in files:
            if name in ("metadata.jsonl", "metadata.csv"):
                return "imagefolder"
            ext = os.path.splitext(name)[1].lower()
            found.add("image" if ext in IMAGE_EXTS else ext)
    for marker, fmt in ((".parquet", "datasets"), (".tar", "webdataset"), ("image", "captions")):
        if marker in found:
            return fmt
    raise ConfigError(
        f"data.source {str(source)!r}: empty, or no images, metadata, parquet or .tar files"
    )


def list_samples(source: Path, data: DataConfig) -> tuple[str, list[Sample]]:
    """(format, samples) for `source`. ConfigError: missing/empty source, bad column."""
    source = Path(source)
    fmt = detect_format(source, data)
    listers = {
        "imagefolder": list_imagefolder,
        "captions": list_captioned_folder,
        "datasets": list_dataset,
        "webdataset": list_webdataset,
    }
    samples = listers[fmt](source, data)
    if not samples:
        raise ConfigError(f"data.source {str(source)!r} ({fmt}): no samples found")
    return fmt, samples


def _file_sample(root: Path, path: Path, caption: str | bytes | None) -> Sample:
    text, prefix = str(path), str(root).rstrip("/") + "/"
    if text.startswith(prefix):  # (string work: a million samples list in seconds)
        rel = text[len(prefix) :]
    else:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else text
    problem = None
    if os.path.islink(text) and not path.resolve().is_relative_to(root.resolve()):
        problem = "symlink_outside_source"
    blob = Blob(text) if os.path.isfile(text) and not problem else None
    return Sample(sample_key(rel), rel, caption, blob, problem)


# -- imagefolder ------------------------------------------------------------------


def list_imagefolder(source: Path, data: DataConfig) -> list[Sample]:
    """Rows of every metadata.jsonl / metadata.csv below `source` (nested allowed)."""
    _require_dir(source)
    tables = sorted(source.rglob("metadata.jsonl")) + sorted(source.rglob("metadata.csv"))
    if not tables:
        raise ConfigError(f"data.source {str(source)!r}: no metadata.jsonl or metadata.csv")
    samples = []
    for table in tables:
        rows = _read_rows(table)
        columns = sorted({c for row in rows for c in row})
        image_col = data.image_column if data.image_column in columns else "file_name"
        for col in (image_col, data.caption_column):
            if rows and col not in columns:
                raise ConfigError(
                    f"{table}: no column {col!r} (data.image_column / data.caption_column); "
                    f"columns are {columns}"
                )
        for n, row in enumerate(rows, 1):
            image = row.get(image_col)
            caption = row.get(data.caption_column, MISSING)
            if image in (None, ""):
                where = f"{table.relative_to(source).as_posix()} row {n}"
                samples.append(Sample(sample_key(where), where, caption, None, "missing_file"))
                continue
            samples.append(_file_sample(source, table.parent / str(image), caption))
    return samples


def _read_rows(table: Path) -> list[dict]:
    """Rows as dicts. Undecodable bytes survive as lone surrogates, so one bad caption
    rejects one sample (invalid_utf8) instead of the whole table."""
    text = table.read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    try:
        if table.suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error) as e:
        raise ConfigError(f"{table}: unreadable metadata ({e})") from None


# -- folder with .txt captions ----------------------------------------------------


def list_captioned_folder(source: Path, data: DataConfig) -> list[Sample]:
    """Every image below `source`, its caption from the same-name .txt file."""
    _require_dir(source)
    samples = []
    for folder, _, files in os.walk(source):  # one listing per folder, no stat per file
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            if stem + ".txt" in names:
                with open(os.path.join(folder, stem + ".txt"), "rb") as f:
                    caption = f.read()
            else:
                caption = MISSING
            samples.append(_file_sample(source, Path(folder, name), caption))
    return sorted(samples, key=lambda s: s.source)


# -- datasets: save_to_disk, parquet, hub names -----------------------------------


def list_dataset(source: Path, data: DataConfig) -> list[Sample]:
    """Rows of a `datasets` dataset; images as bytes (an Image column or a path column)."""
    table, where = _load_dataset(source, data)
    columns = list(table.column_names)
    for col in (data.image_column, data.caption_column):
        if col not in columns:
            raise ConfigError(
                f"{where}: no column {col!r} (data.image_column / data.caption_column); "
                f"columns are {sorted(columns)}"
            )
    import datasets

    if isinstance(table.features[data.image_column], datasets.Image):
        table = table.cast_column(data.image_column, datasets.Image(decode=False))
    samples = []
    for i, row in enumerate(table.select_columns([data.image_column, data.caption_column])):
        image, caption = row[data.image_column], row[data.caption_column]
        rowid = f"{where} row {i}"
        blob, problem = _image_blob(image, source)
        samples.append(Sample(sample_key(f"row:{i}"), rowid, caption, blob, problem))
    return samples


def _load_dataset(source: Path, data: DataConfig):
    import datasets

    datasets.disable_progress_bars()
    if data.dataset_name:
        where = data.dataset_name
        try:
            loaded = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        except Exception as e:  # hub, network and file errors all land here
            raise T2IError(
                f"data.dataset_name {where!r}: cannot load ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Offline (HF_HUB_OFFLINE=1) only "
                "datasets already in the local cache load; or point data.source at a folder"
            ) from None
    elif source.is_dir() and not next(source.rglob("*.parquet"), None):
        where = str(source)
        _require_dir(source)
        loaded = datasets.load_from_disk(str(source))
    else:
        where = str(source)
        files = [str(source)] if source.is_file() else sorted(map(str, source.rglob("*.parquet")))
        loaded = datasets.load_dataset("parquet", data_files={"train": files})
    if isinstance(loaded, datasets.DatasetDict):
        if data.dataset_split not in loaded:
            raise ConfigError(
                f"{where}: no split {data.dataset_split!r} (data.dataset_split); "
                f"splits are {sorted(loaded)}"
            )
        loaded = loaded[data.dataset_split]
    return loaded, where


def _image_blob(image, source: Path) -> tuple[Blob | None, str | None]:
    if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes", "path"}
        if image.get("bytes"):
            return Blob(data=image["bytes"]), None
        image = image.get("path")
    if isinstance(image, bytes):
        return Blob(data=image), None
    if isinstance(image, str) and image:
        path = Path(image) if Path(image).is_absolute() else Path(source) / image
        return (Blob(str(path)), None) if path.is_file() else (None, "missing_file")
    return None, "missing_file"


# -- WebDataset tars --------------------------------------------------------------


def list_webdataset(source: Path, data: DataConfig) -> list[Sample]:
    """Samples of existing WebDataset tars, grouped by member key (`dir/key.ext`)."""
    tars = [source] if source.is_file() else sorted(source.rglob("*.tar"))
    if not tars:
        raise ConfigError(f"data.source {str(source)!r}: no .tar shards")
    samples = []
    for tar_path in tars:
        rel = tar_path.name if source.is_file() else tar_path.relative_to(source).as_posix()
        samples.extend(_tar_samples(tar_path, rel))
    return samples


def _tar_samples(tar_path: Path, rel: str) -> list[Sample]:
    groups: dict[str, dict] = {}
    bad: list[Sample] = []
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                name = member.name
                where = f"{rel}:{name}"
                if member.isdir():
                    continue
                if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                    bad.append(Sample(sample_key(where), where, None, None, "unsafe_tar_member"))
                    continue
                base = name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                key = name[: len(name) - len(base)] + stem
                entry = groups.setdefault(key, {})
                entry[ext.lower()] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as e:
        where = rel
        return [Sample(sample_key(where), where, None, None, f"unreadable_tar: {e}")]
    samples = []
    with open(tar_path, "rb") as f:
        for key, members in groups.items():
            where = f"{rel}:{key}"
            image_ext = next((e for e in members if f".{e}" in IMAGE_EXTS), None)
            caption = MISSING
            text_ext = next((e for e in CAPTION_EXTS if e in members), None)
            if text_ext:
                offset, size = members[text_ext]
                f.seek(offset)
                caption = f.read(size)
            blob = None
            if image_ext:
                offset, size = members[image_ext]
                blob = Blob(str(tar_path), offset, size)
            problem = None if blob else "missing_file"
            samples.append(Sample(sample_key(where), where, caption, blob, problem))
    return samples + bad


def _require_dir(source: Path) -> None:
    if not source.is_dir():
        raise ConfigError(f"data.source {str(source)!r}: no such folder")
