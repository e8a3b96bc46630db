"""enwik8 (the first 10^8 bytes of an English Wikipedia XML dump, Hutter Prize) as a byte-level LM dataset:
download or a local copy, verify, extract, split 90M / 5M / 5M bytes (vocab 256, nothing dropped), cache
as a `ByteCorpus` under `<root>/enwik8/` (beside the kept `enwik8.zip`), and serve it like
`TextFilesDataModule`."""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from hier_lm.data.cache import META, default_data_root
from hier_lm.data.download import ChecksumError, checksum_hint, download, file_sha256
from hier_lm.data.settings import SPLITS, check_sizes, plain_split_sizes
from hier_lm.data.text.corpus import ByteCorpus, file_chunks
from hier_lm.data.text.datamodule import ByteLMDataModule

URL = "http://mattmahoney.net/dc/enwik8.zip"
ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"  # 36,445,475 bytes
RAW_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # the extracted 10^8 bytes
SPLIT_SIZES = (90_000_000, 5_000_000, 5_000_000)  # train, valid, test: the standard byte split
MEMBER = "enwik8"  # the one file in enwik8.zip
_FORMAT = 1
_CHUNK = 16 << 20


def _bounds(sizes: Sequence[int]) -> dict[str, list[int]]:
    ends = [sum(sizes[: i + 1]) for i in range(3)]
    return {name: [end - size, end] for name, size, end in zip(SPLITS, sizes, ends)}


def _zip_chunks(path: Path, total: int) -> Iterator[bytes]:
    """The bytes of the zip's member `enwik8`, which must hold `total` bytes."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(MEMBER)
        except KeyError:
            names = archive.namelist()
            raise ValueError(f"{path} has no member {MEMBER!r} (it holds {names[:5]}{' ...' if len(names) > 5 else ''}):"
                             f" it is not enwik8.zip; pass the enwik8.zip from {URL}") from None
        if info.file_size != total:
            raise ValueError(f"{path}: the member {MEMBER!r} has {info.file_size:,} bytes, but enwik8 has {total:,}: "
                             f"this is not the enwik8.zip from {URL}")
        with archive.open(info) as member:
            while chunk := member.read(_CHUNK):
                yield chunk


def prepare_enwik8(root: str | Path | None = None, url: str = URL, sha256: str | None = ZIP_SHA256,
                   path: str | Path | None = None, raw_sha256: str | None = RAW_SHA256,
                   split_sizes: Sequence[int] = SPLIT_SIZES, progress: bool = True) -> ByteCorpus:
    """Open the enwik8 cache `<root>/enwik8/` (root default: `default_data_root()`), making it first if absent.

    A finished cache with the same split sizes (and bytes of sha256 `raw_sha256`, when given) is used as
    it is, without any network access, once its bytes match their checksums; a damaged one is rebuilt from
    `path` or the kept `enwik8.zip` (with a one-line warning), else it is an error saying how to rebuild it.
    Otherwise the bytes come from `path` (a local `enwik8.zip` or the raw extracted `enwik8` file) or from
    `<root>/enwik8/enwik8.zip`, downloaded from `url` if absent (resumable) and kept; the zip must have sha256
    `sha256` and the extracted bytes `raw_sha256` (None skips either check). `split_sizes` (train, valid,
    test) sum to the file's size (10^8 for the real enwik8).
    """
    sizes = plain_split_sizes(split_sizes, "byte", SPLIT_SIZES)
    bounds, total = _bounds(sizes), sum(sizes)
    folder = (Path(root).expanduser() if root else default_data_root()) / "enwik8"
    kept = Path(path).expanduser() if path is not None else folder / "enwik8.zip"
    corpus = ByteCorpus.open_finished(
        folder, rebuild=f"from {kept}" if kept.is_file() else None,
        fix=f"pass data.path=/path/to/enwik8.zip to rebuild it, or delete {folder / META} to download enwik8.zip "
            "anew and rebuild it (`python -m hier_lm.data prepare enwik8` does either ahead of training)")
    if (corpus is not None and corpus.meta.get("dataset") == "enwik8" and corpus.meta["splits"] == bounds
            and (raw_sha256 is None or corpus.meta["sha256"] == raw_sha256.lower())):
        return corpus

    local = (f"pass data.path=/path/to/enwik8.zip or the extracted enwik8 file (for training or `python -m "
             f"hier_lm.data prepare enwik8`), or put enwik8.zip at {folder / 'enwik8.zip'}")
    if path is not None:
        source = Path(path).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"data.path={path} is not a file: pass the path of enwik8.zip ({URL}) or of "
                                    f"the {total:,}-byte enwik8 file extracted from it, or data.path=null to "
                                    "download it")
        is_zip = zipfile.is_zipfile(source)
        source_sha = file_sha256(source) if is_zip else None
        if is_zip and sha256 is not None and source_sha != sha256.lower():
            raise ChecksumError(f"data.path={source} has sha256 {source_sha}, but enwik8.zip ({URL}) has {sha256}: "
                                f"pass the right file, or {checksum_hint()}")
    else:
        source, is_zip = download(url, folder / "enwik8.zip", sha256, desc="enwik8.zip", progress=progress,
                                  local_hint=local), True
        source_sha = file_sha256(source)
    if not is_zip and (size := source.stat().st_size) != total:
        raise ValueError(f"data.path={source} has {size:,} bytes and is not a zip, but the extracted enwik8 has "
                         f"{total:,}: pass enwik8.zip ({URL}) or the complete file extracted from it")

    def verify(actual: str) -> None:
        if raw_sha256 is not None and actual != raw_sha256.lower():
            raise ChecksumError(f"the enwik8 bytes from {source} have sha256 {actual}, expected {raw_sha256}: "
                                f"the file is not the standard enwik8; pass the enwik8.zip from {URL}, or "
                                f"{checksum_hint('data.raw_sha256')}")

    if progress:
        print(f"enwik8: caching {total:,} bytes from {source} in {folder}", file=sys.stderr, flush=True)
    chunks = _zip_chunks(source, total) if is_zip else file_chunks([source], [source.stat()])
    source_meta = {"source": str(source.resolve()), "source_sha256": source_sha}
    try:
        return ByteCorpus.write(folder, chunks, bounds, {"format": _FORMAT, "dataset": "enwik8"},
                                {**source_meta, "split_sizes": sizes}, progress=progress and sys.stderr.isatty(),
                                verify=verify)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        fix = (f"delete it and run again to download it anew, or {local}" if path is None
               else f"pass an intact copy (from {URL})")
        raise ValueError(f"{source} is damaged ({err}): {fix}") from err


class Enwik8DataModule(ByteLMDataModule):
    """enwik8 bytes (vocab 256, metric bpc), the standard split: train = bytes [0, 90M), valid = [90M, 95M),
    test = [95M, 100M). No byte is dropped or mapped (Transformer-XL instead drops newlines, vocab 204).

    The bytes are fetched and cached by `prepare_enwik8` (see there for `root, url, sha256, path,
    raw_sha256, split_sizes`; the real values are the defaults). Batches as in `ByteLMDataModule`:
    random `seq_len + 1`-byte training windows; evaluation windows of `seq_len + 1` bytes that score every
    byte of the split once, each window preceded by up to `eval_context` unscored bytes of context when
    `eval_context > 0` (batches are then `[windows, n_context]`).
    """

    name = "enwik8"

    def __init__(self, root: str | Path | None = None, url: str = URL, sha256: str | None = ZIP_SHA256,
                 path: str | Path | None = None, seq_len: int = 2048, batch_size: int = 8,
                 eval_batch_size: int | None = None, eval_context: int = 0, num_workers: int = 0, seed: int = 0,
                 raw_sha256: str | None = RAW_SHA256, split_sizes: Sequence[int] = SPLIT_SIZES):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed, eval_context=eval_context)
        # Plain Python values (not Hydra's ListConfig, not Path) so that checkpoints load with weights_only=True.
        root = None if root is None else os.fspath(root)
        path = None if path is None else os.fspath(path)
        split_sizes = plain_split_sizes(split_sizes, "byte", SPLIT_SIZES)
        self.save_hyperparameters()

    def prepare_cache(self) -> ByteCorpus:
        """Open the enwik8 cache, fetching and caching the bytes first if absent (`prepare_enwik8`)."""
        h = self.hparams
        return prepare_enwik8(h.root, h.url, h.sha256, h.path, h.raw_sha256, h.split_sizes)
