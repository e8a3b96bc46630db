"""Any files as one byte stream: path resolution, the stdlib corpus and the cached uint8 `ByteCorpus`."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

SPLITS = ("train", "valid", "test")
DEFAULT_SPLITS = (0.9, 0.05, 0.05)
_FORMAT = 1  # bump when the cache layout changes: it is part of the cache key
_CHUNK = 16 << 20  # bytes read at a time while building
_PROGRESS_MIN_FILES = 100


def default_data_root() -> Path:
    """`$HIER_LM_DATA` if set, else `./data`."""
    return Path(os.environ.get("HIER_LM_DATA") or "data").expanduser()


def stdlib_files() -> list[Path]:
    """All `*.py` files of the running interpreter's standard library (no site-/dist-packages), sorted by
    relative POSIX path."""
    root = os.path.abspath(sysconfig.get_paths()["stdlib"])
    files = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        files += [os.path.join(parent, n) for n in names if n.endswith(".py")]
    return sorted((Path(f) for f in files if os.path.isfile(f)), key=lambda p: p.relative_to(root).as_posix())


def _files_under(folder: str) -> list[str]:
    """Regular files under `folder`, recursively, skipping hidden files and folders (`.git`, ...)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, n) for n in names if not n.startswith(".")]
    return [f for f in found if os.path.isfile(f)]


def resolve_paths(paths: Sequence[str]) -> list[Path]:
    """Expand `paths` into a sorted, de-duplicated list of absolute regular-file paths.

    Each entry is a glob (`**` recursive; `~` and `$VARS` expanded; only the files it matches count), a
    file, a folder (every non-hidden file under it) or the word `stdlib` (`stdlib_files()`). An entry that
    matches no file is a `FileNotFoundError` naming it.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("data.paths is empty: pass globs, files or folders, e.g. data.paths=['src/**/*.py']")
    found: set[str] = set()
    unmatched = []
    for entry in map(str, entries):
        if entry == "stdlib":
            matches = [str(p) for p in stdlib_files()]
        else:
            pattern = os.path.expandvars(os.path.expanduser(entry))
            if glob.has_magic(pattern):
                matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            elif os.path.isdir(pattern):
                matches = _files_under(pattern)
            else:
                matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            unmatched.append(entry)
        found.update(os.path.abspath(m) for m in matches)
    if unmatched:
        raise FileNotFoundError(
            f"no files match data.paths entries {unmatched} (working directory {os.getcwd()}); pass globs, files "
            "or folders that exist, e.g. data.paths=['src/**/*.py'], or data.paths=[stdlib] for the Python "
            "standard library")
    return sorted((Path(f) for f in found), key=Path.as_posix)


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    """`splits` as three floats (train, valid, test), or a clear `ValueError`."""
    try:
        values = tuple(float(x) for x in splits)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"data.splits must be three non-negative fractions (train, valid, test) summing to 1, "
                         f"e.g. [0.9, 0.05, 0.05]; got {splits!r}")
    return values


def plain_split_sizes(split_sizes: Sequence[int], unit: str, example: Sequence[int]) -> list[int]:
    """`split_sizes` (train, valid, test) as three positive plain ints (not Hydra's ListConfig), or a clear
    `ValueError` naming the `unit` counted (bytes, images) and an `example`."""
    try:
        sizes = [int(s) for s in split_sizes]
        ok = len(sizes) == 3 and all(s >= 1 and s == x for s, x in zip(sizes, split_sizes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"data.split_sizes must be three positive {unit} counts (train, valid, test), e.g. "
                         f"{list(example)}; got {split_sizes!r}")
    return sizes


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


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution given by the histogram `counts` (0 for an empty one)."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


class ByteCorpus:
    """The files' raw bytes concatenated in order (vocab 256, nothing dropped, no separators), cached as
    `<root>/textfiles/<key>/corpus.bin` (uint8) plus `meta.json`, and split into train/valid/test by bytes.

    Open a finished cache folder with `ByteCorpus(path)`; make or reuse one with `ByteCorpus.build`. Other
    byte datasets (enwik8) write their own folder with `ByteCorpus.write` and reopen it with `open_finished`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self._read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no finished byte corpus (meta.json or corpus.bin missing)")
        self.meta: dict = meta

    @staticmethod
    def _read_meta(folder: Path) -> dict | None:
        """The folder's meta dict if it holds a finished build (meta.json written and corpus.bin complete)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            complete = (folder / "corpus.bin").stat().st_size == meta["bytes"]
        except (OSError, ValueError, KeyError):
            return None
        return meta if complete else None

    @classmethod
    def build(cls, files: Sequence[str | Path], root: str | Path | None = None,
              splits: Sequence[float] = DEFAULT_SPLITS) -> ByteCorpus:
        """Open the cache of `files` under `root` (default `default_data_root()`), building it first if absent.

        The key covers each file's path, size and mtime and the split fractions, so changed files or splits
        get a new cache. Files are streamed into `corpus.bin.tmp`, then `meta.json.tmp` is written and both
        are renamed, meta last: an interrupted build is never taken for a finished one.
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
        if cls._read_meta(folder) is None:
            cls._write(folder, files, stats, bounds, fractions)
        return cls(folder)

    @staticmethod
    def _write(folder: Path, files: list[Path], stats: list[os.stat_result], bounds: dict[str, list[int]],
               fractions: tuple[float, float, float]) -> None:
        def chunks() -> Iterator[bytes]:
            for file, st in zip(files, stats):
                size = 0
                with open(file, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        yield chunk
                if size != st.st_size:
                    raise RuntimeError(f"{file} changed while the corpus was being cached "
                                       f"({st.st_size} -> {size} bytes); run again")

        ByteCorpus.write(folder, chunks(), bounds, {"format": _FORMAT, "files": len(files)},
                         {"split_fractions": list(fractions)}, desc=f"caching {len(files)} files",
                         progress=len(files) > _PROGRESS_MIN_FILES)

    @staticmethod
    def write(folder: str | Path, chunks: Iterable[bytes], bounds: dict[str, list[int]], head: dict | None = None,
              tail: dict | None = None, desc: str = "caching", progress: bool = False,
              verify: Callable[[str], None] | None = None) -> ByteCorpus:
        """Write the byte stream `chunks` as the finished corpus `folder` and open it.

        `bounds` are the splits' byte ranges `{"train": [0, a], "valid": [a, b], "test": [b, total]}`; the
        stream must hold exactly `total` bytes. `meta.json` gets `head`, then `bytes`, `tail`, `splits`,
        `sha256` and each split's `unigram_entropy_bits`. `verify(sha256_hex)`, if given, may reject the bytes
        by raising. The bytes go to `corpus.bin.tmp` and the meta to `meta.json.tmp`, both renamed when
        complete and verified (meta last), so a failed or interrupted write leaves no finished corpus behind
        and does not damage the one already there until the rename.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        total = bounds["test"][1]
        sha = hashlib.sha256()
        counts = np.zeros((len(SPLITS), 256), dtype=np.int64)
        offset = 0
        tmp = folder / "corpus.bin.tmp"
        try:
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                              disable=not progress) as bar:
                for chunk in chunks:
                    out.write(chunk)
                    sha.update(chunk)
                    data = np.frombuffer(chunk, dtype=np.uint8)
                    for i, (start, end) in enumerate(bounds[name] for name in SPLITS):
                        part = data[max(start - offset, 0):max(end - offset, 0)]
                        counts[i] += np.bincount(part, minlength=256)
                    offset += len(chunk)
                    bar.update(len(chunk))
                if offset != total:
                    raise ValueError(f"expected {total:,} bytes for {folder / 'corpus.bin'}, got {offset:,}")
                out.flush()
                os.fsync(out.fileno())
            if verify is not None:
                verify(sha.hexdigest())
            meta = {
                **(head or {}),
                "bytes": total,
                **(tail or {}),
                "splits": {name: [int(x) for x in bounds[name]] for name in SPLITS},
                "sha256": sha.hexdigest(),
                "unigram_entropy_bits": {name: entropy_bits(c) for name, c in zip(SPLITS, counts)},
            }
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # An older corpus here stops being "finished" before its bytes are replaced.
        (folder / "meta.json").unlink(missing_ok=True)
        os.replace(tmp, folder / "corpus.bin")
        (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(folder / "meta.json.tmp", folder / "meta.json")
        return ByteCorpus(folder)

    @classmethod
    def open_finished(cls, folder: str | Path) -> ByteCorpus | None:
        """The finished corpus in `folder`, or None if there is none (absent, half-written or damaged)."""
        return cls(folder) if cls._read_meta(Path(folder)) is not None else None

    def _check_name(self, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")

    def split(self, name: str) -> np.memmap:
        """Read-only `uint8[n]` memmap of the split `"train" | "valid" | "test"`."""
        self._check_name(name)
        start, end = self.meta["splits"][name]
        return np.memmap(self.path / "corpus.bin", dtype=np.uint8, mode="r", offset=start, shape=(end - start,))

    def unigram_entropy(self, name: str) -> float:
        """Byte-unigram entropy of the split in bits per byte: the loss of a model that ignores context."""
        self._check_name(name)
        return self.meta["unigram_entropy_bits"][name]
