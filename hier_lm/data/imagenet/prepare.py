"""`prepare_imagenet`: convert a downsampled-ImageNet source (a local copy or a download) into the cache once."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from hier_lm.data.cache import default_data_root
from hier_lm.data.download import ChecksumError, checksum_hint, download, file_sha256
from hier_lm.data.imagenet.cache import FORMAT, ImageNetCache, write_cache
from hier_lm.data.imagenet.formats import FORMATS, ORIGINAL_URLS, SIZES, SOURCE_FILES
from hier_lm.data.imagenet.readers import is_hub_id, read_splits


def _local_sha256(source: Path, format: str, names: tuple[str, ...], expected: dict[str, str]) -> dict[str, str]:
    """sha256 of the source's archives (the format's files in a folder, or the file itself), checked against
    `expected` where it names them; extracted image folders are not hashed."""
    if source.is_file():
        files = [source]
    elif format == "parquet":
        files = sorted(source.rglob("*.parquet"))
    else:
        files = [source / name for name in names if (source / name).is_file()]
    hashes = {}
    for file in files:
        name = file.name if source.is_file() else file.relative_to(source).as_posix()
        hashes[name] = file_sha256(file)
        if name in expected and hashes[name] != expected[name]:
            raise ChecksumError(f"{file} has sha256 {hashes[name]}, expected {expected[name]}: pass the right "
                                f"file, or {checksum_hint()}")
    return hashes


def plain_sha256(sha256) -> dict[str, str] | None:
    """`data.sha256` (None, or a mapping of file names to sha256 hex digests) as a plain dict, lower case."""
    if sha256 is None:
        return None
    if isinstance(sha256, Mapping):
        return {str(k): str(v).lower() for k, v in sha256.items() if v is not None}
    raise ValueError(f"data.sha256 must map file names to sha256 hex digests, e.g. {{train_32x32.tar: ...}}, or be "
                     f"null; got {sha256!r}")


def check_args(size: int, format: str) -> None:
    """A `ValueError` naming the setting if `size` or `format` is not one of downsampled ImageNet's."""
    if size not in SIZES:
        raise ValueError(f"data.size must be one of {SIZES} (downsampled ImageNet 32x32 or 64x64), got {size}")
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")


def prepare_imagenet(size: int = 32, format: str = "oord", root: str | Path | None = None,
                     path: str | Path | None = None, url: str | None = None,
                     sha256: Mapping[str, str] | None = None, progress: bool = True) -> ImageNetCache:
    """Open the cache `<root>/imagenet<size>/<format>/` (root default: `default_data_root()`), converting
    the source into it first if absent.

    A finished cache is used as it is when no source is given, or when `path` / `url` names the source it
    was made from (no network access then). Otherwise the source is `path` (a local folder of the format's
    files: see `SOURCE_FILES`; for parquet a folder of `.parquet` files or a Hugging Face hub id), or the
    format's files downloaded from the base URL `url` into `<root>/imagenet<size>/downloads/` (resumable,
    kept). `sha256` maps file names to expected sha256 digests (checked for local files too). Every image
    must be `size x size` RGB; a damaged file, a wrong size or a missing file is a one-line error, and the
    finished cache already there is left as it was.
    """
    check_args(size, format)
    sha256 = plain_sha256(sha256)
    base = (Path(root).expanduser() if root else default_data_root()) / f"imagenet{size}"
    folder = base / format
    path = None if path is None else os.fspath(path)
    if path is not None:
        local = Path(path).expanduser()
        wanted = str(local.resolve()) if local.exists() or format != "parquet" or not is_hub_id(path) else \
            f"hf:{path}"
    elif url is not None:
        wanted = url
    else:
        wanted = None
    cache = ImageNetCache.open_finished(folder, rebuild=None if wanted is None else f"from {wanted}")  # damaged
    if cache is not None and cache.size == size and (wanted is None or cache.meta.get("source") == wanted):
        return cache

    names = SOURCE_FILES.get((format, size), ())
    where = f"the folder holding {' and '.join(names)}" if names else "a folder of parquet files or a hub id"
    if path is None and url is None:
        dead = f" (the original {ORIGINAL_URLS[format]} is offline or behind the ImageNet login)" \
            if format in ORIGINAL_URLS else ""
        raise FileNotFoundError(f"no imagenet{size} cache in {folder}: pass data.path={where} (for training or "
                                f"`python -m hier_lm.data prepare imagenet{size}`), or data.url=a base URL serving them"
                                f"{dead}; data/README.md says where to get them")
    if path is not None and wanted.startswith("hf:"):
        source, source_sha = path, {}
    elif path is not None:
        source = Path(path).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"data.path={path} does not exist: pass {where}")
        source_sha = _local_sha256(source, format, names, sha256 or {})
    else:
        if format == "parquet":
            raise ValueError("data.url is not used with data.format=parquet: pass data.path=a Hugging Face hub id "
                             "(e.g. benjamin-paine/imagenet-1k-32x32) or a folder of its parquet files")
        source = base / "downloads"
        hint = (f"download them on a machine with network and pass data.path=the folder holding {' and '.join(names)} "
                f"(for training or `python -m hier_lm.data prepare imagenet{size}`)")
        source_sha = {}
        for name in names:
            file = download(url.rstrip("/") + "/" + name, source / name, (sha256 or {}).get(name), desc=name,
                            progress=progress, local_hint=hint)
            source_sha[name] = (sha256 or {}).get(name) or file_sha256(file)
    splits = read_splits(format, source, size, scratch=base)
    if progress:
        print(f"imagenet{size}: converting {wanted} ({format}) into {folder}", file=sys.stderr, flush=True)
    meta = {"format": FORMAT, "dataset": f"imagenet{size}", "size": size, "source_format": format,
            "source": wanted, "source_files": list(names), "source_sha256": source_sha}
    return write_cache(folder, splits, meta, size, progress and sys.stderr.isatty())
