"""`ByteCorpus`: files' raw bytes as one cached uint8 stream, split into train/valid/test by bytes."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from hier_lm.data.cache import MemmapCache, default_data_root, entropy_bits
from hier_lm.data.settings import SPLITS, check_splits

DEFAULT_SPLITS = (0.9, 0.05, 0.05)
CORPUS = "corpus.bin"
_FORMAT = 1  # bump when the cache layout changes: it is part of the cache key
_CHUNK = 16 << 20  # bytes read at a time while building
_PROGRESS_MIN_FILES = 100


def _split_bounds(total: int, fractions: tuple[float, float, float]) -> dict[str, list[int]]:
    """Byte ranges `[start, end)` of the splits: train = the first `fractions[0]` of the bytes, then valid,
    then test (the rest). Exact decimal fractions, integer arithmetic."""
    train, valid, _ = (Fraction(str(f)) for f in fractions)
    ends = [math.floor(total * train), min(math.floor(total * (train + valid)), total), total]
    bounds = dict(zip(SPLITS, ([start, end] for start, end in zip([0, *ends[:2]], ends))))
    sizes = {name: end - start for name, (start, end) in bounds.items()}
    if min(sizes.values()) < 1:
        raise ValueError(f"data.splits={list(fractions)} of a {total:,}-byte corpus give split sizes {sizes}; "
                         "every split needs at least 1 byte: add files to data.paths or change data.splits")
    return bounds


def _cache_key(files: Sequence[Path], stats: Sequence[os.stat_result], fractions: Sequence[float]) -> str:
    described = [[os.path.abspath(f), st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)]
    payload = json.dumps({"format": _FORMAT, "files": described, "splits": list(fractions)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_chunks(files: Sequence[Path], stats: Sequence[os.stat_result]) -> Iterator[bytes]:
    """The files' bytes in order, in chunks of 16 MiB; a file whose size is not the one `stats` recorded (a file
    that changed meanwhile) is an error."""
    for file, st in zip(files, stats):
        size = 0
        with open(file, "rb") as src:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                yield chunk
        if size != st.st_size:
            raise RuntimeError(f"{file} changed while the corpus was being cached ({st.st_size} -> {size} bytes); "
                               "run again")


class ByteCorpus(MemmapCache):
    """Bytes concatenated in order (vocab 256, nothing dropped, no separators), cached as `corpus.bin`
    (uint8) plus `meta.json` (`bytes`, `splits` = byte ranges, `sha256`, each split's unigram entropy), and
    split into train/valid/test by bytes.

    `ByteCorpus.build(files)` makes or reuses the cache of local files under `<root>/textfiles/<key>/`;
    other byte datasets (enwik8) write their own folder with `ByteCorpus.write` and reopen it with
    `open_finished`; `ByteCorpus(path)` opens a finished cache folder. Opening checks the bytes against the
    chunk checksums in `meta.json` (see `MemmapCache`): a damaged split is a `CorruptCacheError` naming it.
    """

    kind = "byte corpus"

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        return {CORPUS: meta["bytes"]}

    @classmethod
    def file_regions(cls, meta: dict) -> dict[str, dict[str, tuple[int, int]]]:
        return {CORPUS: {f"the {name} split": tuple(bounds) for name, bounds in meta["splits"].items()}}

    @classmethod
    def data_sha256(cls, meta: dict) -> dict[str, str]:
        return {CORPUS: meta["sha256"]}

    @classmethod
    def build(cls, files: Sequence[str | Path], root: str | Path | None = None,
              splits: Sequence[float] = DEFAULT_SPLITS) -> ByteCorpus:
        """Open the cache of `files` under `root` (default `default_data_root()`), building it first if absent.

        The key covers each file's path, size and mtime and the split fractions, so changed files or splits
        get a new cache. A damaged cache is rebuilt from `files`, with a one-line warning on stderr.
        """
        fractions = check_splits(splits)
        files = [Path(f) for f in files]
        if not files:
            raise ValueError("no input files for the byte corpus")
        stats = [os.stat(f) for f in files]
        total = sum(st.st_size for st in stats)
        if total == 0:
            raise ValueError(f"all {len(files)} input files are empty: there are no bytes to model; "
                             "point data.paths at non-empty files")
        bounds = _split_bounds(total, fractions)
        folder = Path(root).expanduser() if root else default_data_root()
        folder = folder / "textfiles" / _cache_key(files, stats, fractions)
        return cls.open_finished(folder, rebuild=f"from its {len(files)} source files") or cls.write(
            folder, file_chunks(files, stats), bounds, {"format": _FORMAT, "files": len(files)},
            {"split_fractions": list(fractions)}, progress=len(files) > _PROGRESS_MIN_FILES)

    @classmethod
    def write(cls, folder: str | Path, chunks: Iterable[bytes], bounds: dict[str, list[int]],
              head: dict | None = None, tail: dict | None = None, progress: bool = False,
              verify: Callable[[str], None] | None = None) -> ByteCorpus:
        """Write the byte stream `chunks` as the finished corpus `folder` (through `CacheWriter`) and open it.

        `bounds` are the splits' byte ranges `{"train": [0, a], "valid": [a, b], "test": [b, total]}`; the
        stream must hold exactly `total` bytes. `meta.json` gets `head`, then `bytes`, `tail`, `splits`,
        `sha256` and each split's `unigram_entropy_bits`. `verify(sha256_hex)`, if given, may reject the bytes
        by raising; the cache already in `folder` then stays as it was.
        """
        folder, total = Path(folder), bounds["test"][1]
        counts = np.zeros((len(SPLITS), 256), dtype=np.int64)

        def counted() -> Iterator[bytes]:  # each split's byte histogram, on the way
            offset = 0
            for chunk in chunks:
                data = np.frombuffer(chunk, dtype=np.uint8)
                for i, (start, end) in enumerate(bounds[name] for name in SPLITS):
                    counts[i] += np.bincount(data[max(start - offset, 0):max(end - offset, 0)], minlength=256)
                offset += len(data)
                yield chunk

        with cls.writer(folder, progress) as writer:
            written = writer.add(CORPUS, counted(), total)
            if written.bytes != total:
                raise ValueError(f"expected {total:,} bytes for {folder / CORPUS}, got {written.bytes:,}")
            if verify is not None:
                verify(written.sha256)
            writer.publish({
                **(head or {}),
                "bytes": total,
                **(tail or {}),
                "splits": {name: [int(x) for x in bounds[name]] for name in SPLITS},
                "sha256": written.sha256,
                "unigram_entropy_bits": {name: entropy_bits(c) for name, c in zip(SPLITS, counts)},
            })
        return cls(folder, verify=False)  # just written and checksummed

    def _check_name(self, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")

    def split(self, name: str) -> np.memmap:
        """Read-only `uint8[n]` memmap of the split `"train" | "valid" | "test"`."""
        self._check_name(name)
        return self.memmap(CORPUS, np.uint8, *self.meta["splits"][name])

    def unigram_entropy(self, name: str) -> float:
        """Byte-unigram entropy of the split in bits per byte: the loss of a model that ignores context."""
        self._check_name(name)
        return self.meta["unigram_entropy_bits"][name]

    def describe(self, name: str) -> str:
        """Where the cache is, its size and sha256, and each split's bytes and unigram entropy."""
        lines = [f"{name} cache: {self.path.resolve()}",
                 f"  {CORPUS}: {self.meta['bytes']:,} bytes, sha256 {self.meta['sha256']}"]
        for split in SPLITS:
            start, end = self.meta["splits"][split]
            lines.append(f"  {split:<5}  {end - start:>13,} bytes  [{start:,}, {end:,})  "
                         f"unigram entropy {self.unigram_entropy(split):.4f} bits/byte")
        return "\n".join(lines)
