"""The downsampled-ImageNet cache: `ImageNetCache` (a finished cache folder) and `write_cache` (images into one)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from hier_lm.data.cache import MemmapCache
from hier_lm.data.images import MemmapImages
from hier_lm.data.imagenet.formats import CACHE_SPLITS, FULL_COUNTS
from hier_lm.data.pixels import CHANNELS

FORMAT = 1  # bump when the cache layout changes: a cache of another format is not finished


class ImageNetCache(MemmapCache):
    """A finished cache folder: `train.u8` and `valid.u8` (raw `uint8 [N, S, S, 3]`, the source's official
    splits) and `meta.json` (size, format, source, image counts, the sha256 of each split file and of each
    source file, the split files' chunk checksums checked on opening: see `MemmapCache`)."""

    kind = "image cache"

    def __init__(self, path: str | Path, verify: bool = True):
        super().__init__(path, verify)
        self.size: int = self.meta["size"]

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        if meta["format"] != FORMAT:
            raise ValueError(f"cache format {meta['format']}, not {FORMAT}")
        image_bytes = CHANNELS * meta["size"] ** 2
        return {meta["splits"][s]["file"]: meta["splits"][s]["images"] * image_bytes for s in CACHE_SPLITS}

    @classmethod
    def file_regions(cls, meta: dict) -> dict[str, dict[str, tuple[int, int]]]:
        files, sizes = {s: meta["splits"][s]["file"] for s in CACHE_SPLITS}, cls.file_sizes(meta)
        return {file: {f"the {split} split": (0, sizes[file])} for split, file in files.items()}

    @classmethod
    def data_sha256(cls, meta: dict) -> dict[str, str]:
        return {meta["splits"][s]["file"]: meta["splits"][s]["sha256"] for s in CACHE_SPLITS}

    def images(self, split: str) -> int:
        return self.meta["splits"][split]["images"]

    def source(self, split: str, rows: np.ndarray | None = None) -> MemmapImages:
        """The cached `split` ("train" | "valid") as a lazily opened memmap source (optionally the subset `rows`)."""
        return MemmapImages(self.path / self.meta["splits"][split]["file"], self.images(split), self.size, rows)

    def describe(self, name: str) -> str:
        """Where the cache is, image counts per split and checksums."""
        meta = self.meta
        full = FULL_COUNTS.get(meta["source_format"], {})
        lines = [f"{name} ({meta['source_format']}) cache: {self.path.resolve()}", f"  source: {meta['source']}"]
        for split in CACHE_SPLITS:
            info = meta["splits"][split]
            ref = f" (the full set has {full[split]:,})" if split in full else ""
            lines.append(f"  {split:<5}  {info['file']}: {info['images']:>9,} images{ref}, sha256 {info['sha256']}")
        lines += [f"  source file {file}: sha256 {sha}" for file, sha in meta["source_sha256"].items()]
        return "\n".join(lines)


def write_cache(folder: Path, splits: Mapping[str, Iterable[np.ndarray]], meta: dict, size: int,
                progress: bool) -> ImageNetCache:
    """Write the image chunks (`uint8 [n, size, size, 3]`) of each split as `<split>.u8` (through
    `CacheWriter`), with `meta` plus the splits' image counts and sha256s as `meta.json`, and open the cache."""
    with ImageNetCache.writer(folder, progress) as writer:
        split_meta = {}
        for name, chunks in splits.items():
            count = 0

            def checked(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
                nonlocal count
                for chunk in chunks:
                    if chunk.shape[1:] != (size, size, CHANNELS) or chunk.dtype != np.uint8:
                        raise AssertionError(f"bad chunk {chunk.shape} {chunk.dtype}")  # a reader bug, not input
                    count += len(chunk)
                    yield np.ascontiguousarray(chunk)

            written = writer.add(f"{name}.u8", checked(chunks))
            if count == 0:
                raise ValueError(f"{meta['source']} holds no {name} images: pass the complete dataset "
                                 f"({' and '.join(meta['source_files']) or 'train and validation files'})")
            split_meta[name] = {"file": f"{name}.u8", "images": count, "sha256": written.sha256}
        writer.publish({**meta, "splits": split_meta})
    return ImageNetCache(folder, verify=False)  # just written and checksummed
