"""The dataset caches: a folder of raw data files (read as memmaps) and `meta.json`, one writer for all of
them (the byte corpora, the LM1B token cache, the ImageNet images).

A cache is finished when `meta.json` is there and every data file it names has the recorded size (and, for
the small files a cache kind names, the recorded sha256). `CacheWriter` streams the data files into a
temporary folder beside the cache, recording each file's size and sha256, and publishes them into the cache
folder with renames, `meta.json` last; a failed or interrupted write never leaves a cache taken for finished,
and never harms the finished one already there. Files of the cache folder that belong to no cache (a
download, a tokenizer) are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hier_lm.data.download import file_sha256
from hier_lm.files import atomic_write, atomic_write_text

META = "meta.json"


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
    sha256 on opening (`file_checksums`), and what `python -m hier_lm.data prepare` prints (`describe`).

    `Cls(folder)` opens a finished cache (else `FileNotFoundError`); `Cls.open_finished(folder)` returns None
    instead, after cleaning up what a killed writer left (`recover`); `Cls.writer(folder)` writes one.
    """

    kind = "cache"  # what the folder is, in errors

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no finished {self.kind} ({META} or a data file missing or "
                                    "incomplete)")
        self.meta: dict = meta

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        """`{file name: size in bytes}` of the data files `meta` describes."""
        raise NotImplementedError

    @classmethod
    def file_checksums(cls, meta: dict) -> dict[str, str]:
        """`{file name: sha256}` of the files cheap enough to verify whenever the cache is opened."""
        return {}

    @classmethod
    def read_meta(cls, folder: str | Path) -> dict | None:
        """The meta dict of `folder` if it holds a finished cache, else None."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text())
            complete = all((folder / name).stat().st_size == size for name, size in cls.file_sizes(meta).items())
            complete = complete and all(file_sha256(folder / name) == sha256
                                        for name, sha256 in cls.file_checksums(meta).items())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if complete else None

    @classmethod
    def open_finished(cls, folder: str | Path):
        """The finished cache in `folder`, or None (absent, half-written or damaged)."""
        folder = Path(folder)
        cls.recover(folder)
        return cls(folder) if cls.read_meta(folder) is not None else None

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
        """Make the added files, with `meta` as `meta.json`, the finished cache of `folder`."""
        atomic_write_text(self.tmp / META, json.dumps(meta, indent=2) + "\n")
        if (self.folder / META).exists():
            try:
                previous = list(self.cache.file_sizes(json.loads((self.folder / META).read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                previous = []
            _move_all(self.folder, self.old, [META, *previous])  # the old cache stops being finished first
        _move_all(self.tmp, self.folder, [*self.written, META])
