"""The dataset caches: a folder of raw data files (read as memmaps) and `meta.json`, one writer for all of
them (the byte corpora, the LM1B token cache, the ImageNet images).

A cache is finished when `meta.json` is there and every data file it names has the recorded size (and, for
the small files a cache kind names, the recorded sha256). `CacheWriter` streams the data files into a
temporary folder beside the cache, recording each file's size and sha256, and publishes them into the cache
folder with renames, `meta.json` last; a failed or interrupted write never leaves a cache taken for finished,
and never harms the finished one already there. Files of the cache folder that belong to no cache (a
download, a tokenizer) are left alone.

Opening a cache checks its contents: `meta.json` records an xxh3-64 checksum of every chunk of every data file
(chunks of at most 16 MiB that never straddle two splits), and a data file that is missing, of another size or
whose chunks differ from the recorded ones is a `CorruptCacheError` naming the file and the damaged splits (or a
rebuild, where the caller can rebuild the cache from its source). Caches written before these checksums are
checked against the sha256 their meta records, and the checksums are then added to their `meta.json`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from tqdm.auto import tqdm

from hier_lm.data.download import file_sha256
from hier_lm.files import atomic_write, atomic_write_text

META = "meta.json"
CHECKSUMS = "chunk_checksums"  # the key of meta.json that holds the data files' chunk checksums
ALGORITHM = "xxh3_64"  # the chunk checksum: fastest of those measured (benchmarks/cache_verify.py)
CHUNK_BYTES = 16 << 20  # the most bytes one checksum covers
_PROGRESS_BYTES = 1 << 30  # a check of this many bytes or more shows a progress bar


def default_data_root() -> Path:
    """`$HIER_LM_DATA` if set, else `./data`."""
    return Path(os.environ.get("HIER_LM_DATA") or "data").expanduser()


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution given by the histogram `counts` (0 for an empty one)."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


def host_tag() -> str:
    """This host's name as it appears in the names of a writer's temporary folders."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def check_folder(folder: Path) -> None:
    """A `ValueError` if `folder`, or the nearest of its parents that exists, is not a folder (e.g. the data
    root `$HIER_LM_DATA` or `data.root` names a file): no cache can be made there."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path} is a file, not a folder, so no cache can be made in {folder}: point "
                                 "HIER_LM_DATA (or data.root=) at a folder")
            return


def chunk_ranges(size: int, cuts: Iterable[int] = ()) -> list[tuple[int, int]]:
    """Byte ranges `[start, end)` tiling `[0, size)` in order: at most `CHUNK_BYTES` each, none across a cut."""
    points = sorted({0, size, *(cut for cut in cuts if 0 < cut < size)})
    return [(start, min(start + CHUNK_BYTES, end)) for begin, end in zip(points, points[1:])
            for start in range(begin, end, CHUNK_BYTES)]


def chunk_checksums(path: Path, ranges: list[tuple[int, int]], sha256=None) -> list[str]:
    """The xxh3-64 hex digests of the byte ranges `ranges` of the file `path`, read through a memmap; the ranges
    are also fed, in order, to the hashlib object `sha256` if given. A progress bar for 1 GiB and more."""
    if not ranges:  # an empty file (which cannot be memory-mapped)
        return []
    digests = []
    total = ranges[-1][1] - ranges[0][0]
    with (open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
          memoryview(data) as view,
          tqdm(total=total, unit="B", unit_scale=True, desc=f"checking {path.name}",
               disable=True if total < _PROGRESS_BYTES else None) as bar):
        for start, end in ranges:
            with view[start:end] as chunk:
                digests.append(xxhash.xxh3_64_hexdigest(chunk))
                if sha256 is not None:
                    sha256.update(chunk)
            bar.update(end - start)
    return digests


def _checksums_entry(files: dict[str, list[list]]) -> dict:
    """The `chunk_checksums` entry of a meta: the algorithm, the chunk size and each data file's chunk list."""
    return {"algorithm": ALGORITHM, "chunk_bytes": CHUNK_BYTES, "files": files}


def _describe_damage(bad: list[tuple[int, int]], regions: dict[str, tuple[int, int]]) -> str:
    """The damaged byte ranges `bad` in words: adjacent ones merged (the first two shown), and the `regions`
    (name: byte range) they touch."""
    merged: list[list[int]] = []
    for start, end in bad:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    ranges = ", ".join(f"[{start:,}, {end:,})" for start, end in merged[:2])
    ranges += f" and {len(merged) - 2} more" if len(merged) > 2 else ""
    hit = [name for name, (start, end) in regions.items() if any(start < b and a < end for a, b in merged)]
    return f"bytes {ranges} differ from those written" + (f", in {' and '.join(hit)}" if hit else "")


class CorruptCacheError(ValueError):
    """A finished cache's data file that is missing, of another size, or whose bytes differ from those written:
    `path` (the file) and `detail` (what is wrong)."""

    def __init__(self, path: Path, detail: str, fix: str):
        super().__init__(f"{path} is corrupt ({detail}): {fix}")
        self.path, self.detail = path, detail


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(folder: Path, kind: str, pid: int) -> Path:
    """`.<name>.<kind>-<host>-<pid>` beside `folder`: a writer's temporary (`tmp`) or set-aside (`old`) folder."""
    return folder.parent / f".{folder.name}.{kind}-{host_tag()}-{pid}"


def _move_all(source: Path, target: Path, names: Iterable[str]) -> None:
    """Rename the entries `names` of `source` into `target`, in that order (those already gone are skipped)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            os.replace(source / name, target / name)
        except FileNotFoundError:
            pass


def _settle(cache: type[MemmapCache], folder: Path, old: Path) -> None:
    """After a publish into `folder` that set the previous cache aside into `old`: delete `old` if `folder`
    holds a finished `cache`, else move it back first (data files, then meta)."""
    if cache.read_meta(folder) is None:
        _move_all(old, folder, sorted((p.name for p in old.iterdir()), key=lambda name: name == META))
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Written:
    """A data file as `CacheWriter.add` wrote it."""

    bytes: int
    sha256: str


class MemmapCache:
    """A finished cache folder: `meta.json` and the data files it describes. A subclass says which files of
    which sizes a meta describes (`file_sizes`), which small files are also checked against their recorded
    sha256 on opening (`file_checksums`), what `python -m hier_lm.data prepare` prints (`describe`), and
    optionally the splits inside its data files (`file_regions`: chunk checksums never straddle two, and a
    damaged chunk is reported by split) and the whole-file sha256 its meta records (`data_sha256`: what a cache
    written before the chunk checksums is checked against).

    `Cls(folder)` opens a finished cache and checks its contents (`verify`): `FileNotFoundError` if there is
    none, `CorruptCacheError` if it is damaged. `Cls.open_finished(folder)` returns None instead of the
    `FileNotFoundError`, after cleaning up what a killed writer left (`recover`); `Cls.writer(folder)` writes one.
    """

    kind = "cache"  # what the folder is, in errors

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        meta = self._load_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no finished {self.kind} ({META} missing or not of a "
                                    f"{self.kind})")
        self.meta: dict = meta
        if (damage := self._damage(self.path, meta)) is not None:
            raise self._corrupt(*damage)
        if verify:
            self.verify()

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        """`{file name: size in bytes}` of the data files `meta` describes."""
        raise NotImplementedError

    @classmethod
    def file_checksums(cls, meta: dict) -> dict[str, str]:
        """`{file name: sha256}` of the files cheap enough to verify whenever the cache is opened."""
        return {}

    @classmethod
    def file_regions(cls, meta: dict) -> dict[str, dict[str, tuple[int, int]]]:
        """`{data file name: {region (e.g. "the valid split"): (start byte, end byte)}}`: the parts of the data
        files that a reader uses separately."""
        return {}

    @classmethod
    def data_sha256(cls, meta: dict) -> dict[str, str]:
        """`{data file name: sha256 of the whole file}` as `meta` records it."""
        return {}

    @classmethod
    def _load_meta(cls, folder: Path) -> dict | None:
        """`meta.json` of `folder` if it is the meta of a cache of this kind, else None."""
        try:
            meta = json.loads((folder / META).read_text())
            cls.file_sizes(meta)
            algorithm = meta.get(CHECKSUMS, {}).get("algorithm", ALGORITHM)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return meta if algorithm == ALGORITHM else None

    @classmethod
    def _damage(cls, folder: Path, meta: dict) -> tuple[Path, str] | None:
        """(file, what is wrong) for the first file of `meta` that is missing or not of its recorded size (or,
        for the small files of `file_checksums`, sha256); None if there is none."""
        for name, size in cls.file_sizes(meta).items():
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return folder / name, "it is missing"
            if actual != size:
                return folder / name, f"it has {actual:,} bytes, not the {size:,} it was written with"
        for name, sha256 in cls.file_checksums(meta).items():
            try:
                if file_sha256(folder / name) != sha256:
                    return folder / name, "its sha256 differs from the one it was written with"
            except OSError:
                return folder / name, "it is missing"
        return None

    def _corrupt(self, path: Path, detail: str) -> CorruptCacheError:
        fix = (f"delete {self.path / META} and run again to rebuild the {self.kind} from its source "
               "(`python -m hier_lm.data prepare <dataset>` with its source, e.g. data.path=..., rebuilds it)")
        return CorruptCacheError(path, detail, fix)

    @classmethod
    def read_meta(cls, folder: str | Path) -> dict | None:
        """The meta dict of `folder` if it holds a finished cache (every file there, of its recorded size; the
        contents are not read), else None."""
        folder = Path(folder)
        meta = cls._load_meta(folder)
        return meta if meta is not None and cls._damage(folder, meta) is None else None

    def verify(self) -> None:
        """Check the data files' bytes against the chunk checksums of the meta; a `CorruptCacheError` naming the
        file and the damaged regions if they differ. A meta without chunk checksums (a cache written before
        them) is checked against the sha256 it records, then given the checksums (`meta.json` rewritten
        atomically; left as it was where the folder is read-only)."""
        if CHECKSUMS not in self.meta:
            self._upgrade()
            return
        regions = self.file_regions(self.meta)
        for name, chunks in self.meta[CHECKSUMS]["files"].items():
            digests = chunk_checksums(self.path / name, [(start, end) for start, end, _ in chunks])
            bad = [(start, end) for (start, end, expected), digest in zip(chunks, digests) if digest != expected]
            if bad:
                raise self._corrupt(self.path / name, _describe_damage(bad, regions.get(name, {})))

    def _upgrade(self) -> None:
        recorded, files = self.data_sha256(self.meta), {}
        for name in self.file_sizes(self.meta):
            sha256 = hashlib.sha256()
            files[name] = self.chunk_list(self.path, self.meta, name, sha256)
            if name in recorded and sha256.hexdigest() != recorded[name]:
                raise self._corrupt(self.path / name, f"its sha256 differs from the one recorded in {META}")
        self.meta[CHECKSUMS] = _checksums_entry(files)
        try:
            atomic_write_text(self.path / META, json.dumps(self.meta, indent=2) + "\n")
        except OSError:
            pass

    @classmethod
    def chunk_list(cls, folder: Path, meta: dict, name: str, sha256=None) -> list[list]:
        """`[[start, end, xxh3-64 hex digest], ...]` of the chunks of the data file `name` of `folder` (split by
        `chunk_ranges` at the boundaries of its regions in `meta`); the bytes also go to `sha256` if given."""
        cuts = [cut for bounds in cls.file_regions(meta).get(name, {}).values() for cut in bounds]
        ranges = chunk_ranges((folder / name).stat().st_size, cuts)
        digests = chunk_checksums(folder / name, ranges, sha256)
        return [[start, end, digest] for (start, end), digest in zip(ranges, digests)]

    @classmethod
    def open_finished(cls, folder: str | Path, rebuild: str | None = None, fix: str | None = None):
        """The finished cache in `folder`, or None if it is absent or half-written. A damaged cache is a
        `CorruptCacheError` (its message ending with `fix`, if given), unless the caller can rebuild it: then
        `rebuild` says from what (e.g. "from enwik8.zip"), a one-line warning on stderr says so, and the result
        is None."""
        folder = Path(folder)
        check_folder(folder)
        cls.recover(folder)
        if cls._load_meta(folder) is None:
            return None
        try:
            return cls(folder)
        except CorruptCacheError as err:
            if rebuild is None:
                raise CorruptCacheError(err.path, err.detail, fix) if fix else err from None
            print(f"warning: {err.path} is corrupt ({err.detail}): rebuilding the {cls.kind} {rebuild}",
                  file=sys.stderr, flush=True)
            return None

    @classmethod
    def recover(cls, folder: Path) -> None:
        """Clean up after a writer of `folder` that was killed on this host: delete its temporary folder, and
        put back the cache it had set aside while publishing if `folder` holds no finished cache."""
        if not folder.parent.is_dir():
            return
        for leftover in folder.parent.glob(f".{folder.name}.*-{host_tag()}-*"):
            kind, pid = leftover.name.rsplit(".", 1)[1].split("-", 1)[0], leftover.name.rsplit("-", 1)[1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old":
                _settle(cls, folder, leftover)
            else:
                shutil.rmtree(leftover, ignore_errors=True)

    @classmethod
    def writer(cls, folder: str | Path, progress: bool = False) -> CacheWriter:
        """A `CacheWriter` of this kind of cache into `folder`."""
        return CacheWriter(cls, Path(folder), progress)

    def memmap(self, name: str, dtype: np.dtype, start: int, end: int) -> np.memmap:
        """Read-only memmap of the items `[start, end)` of the data file `name`, an array of `dtype`."""
        dtype = np.dtype(dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", offset=start * dtype.itemsize,
                         shape=(end - start,))

    def describe(self, name: str) -> str:
        """Where the cache of the dataset `name` is, its split sizes and checksums."""
        raise NotImplementedError


class CacheWriter:
    """Writes a cache into `folder`: `with Cache.writer(folder) as writer:`, then `writer.add(name, chunks)`
    for each data file and `writer.publish(meta)`.

    The files go to a fresh temporary folder `.<name>.tmp-<host>-<pid>` beside `folder`, which leaving the
    block deletes (after an error, or without `publish`): a failed or interrupted write leaves nothing taken
    for a finished cache and does not touch `folder`. `publish` writes `meta.json` there, then moves the
    cache of `folder` (meta first) into `.<name>.old-<host>-<pid>` and the new files into `folder` (meta
    last); leaving the block deletes the old cache, or puts it back if the publish did not finish (as
    `MemmapCache.recover` does after a writer killed meanwhile). Other files in `folder` stay where they are.
    """

    def __init__(self, cache: type[MemmapCache], folder: Path, progress: bool = False):
        self.cache, self.folder, self.progress = cache, folder, progress
        self.tmp, self.old = _sibling(folder, "tmp", os.getpid()), _sibling(folder, "old", os.getpid())
        self.written: dict[str, Written] = {}

    def __enter__(self) -> CacheWriter:
        check_folder(self.folder)
        self.cache.recover(self.folder)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.old.exists():  # the previous cache, set aside by `publish`: put back if the publish failed
            _settle(self.cache, self.folder, self.old)
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def scratch(self) -> Path:
        """A folder for intermediate files, deleted with the temporary folder."""
        scratch = self.tmp / "scratch"
        scratch.mkdir(exist_ok=True)
        return scratch

    def add(self, name: str, chunks: Iterable, total: int | None = None) -> Written:
        """Stream `chunks` (bytes, or C-contiguous arrays: their raw bytes) into the data file `name`;
        `total` (bytes, if known) sizes the progress bar."""
        digest, size = hashlib.sha256(), 0

        def write(out) -> None:
            nonlocal size
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{self.folder.name} {name}",
                      disable=not self.progress) as bar:
                for chunk in chunks:
                    data = memoryview(chunk).cast("B")
                    out.write(data)
                    digest.update(data)
                    size += len(data)
                    bar.update(len(data))

        atomic_write(self.tmp / name, write)
        self.written[name] = Written(size, digest.hexdigest())
        return self.written[name]

    def publish(self, meta: dict) -> None:
        """Make the added files, with `meta` plus their chunk checksums (read back from the written files) as
        `meta.json`, the finished cache of `folder`."""
        files = {name: self.cache.chunk_list(self.tmp, meta, name) for name in self.written}
        meta = {**meta, CHECKSUMS: _checksums_entry(files)}
        atomic_write_text(self.tmp / META, json.dumps(meta, indent=2) + "\n")
        if (self.folder / META).exists():
            try:
                previous = list(self.cache.file_sizes(json.loads((self.folder / META).read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                previous = []
            _move_all(self.folder, self.old, [META, *previous])  # the old cache stops being finished first
        _move_all(self.tmp, self.folder, [*self.written, META])
