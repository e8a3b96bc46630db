"""Where the LM1B sentences come from: the shards of the official tarball (or the folder extracted from it),
or a Hugging Face copy streamed with `datasets`."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hier_lm.data.download import DownloadError

TAR_NAME = "1-billion-word-language-modeling-benchmark-r13output.tar.gz"  # the official tarball
TRAIN_SHARDS, HELDOUT_SHARDS = 100, 50
_TRAIN = re.compile(r"(?:^|/)training-monolingual\.tokenized\.shuffled/news\.en-(\d{5})-of-00100$")
_HELDOUT = re.compile(r"(?:^|/)heldout-monolingual\.tokenized\.shuffled/news\.en\.heldout-(\d{5})-of-00050$")
_COPY = 16 << 20

Part = tuple[str, str, Iterable[str]]  # (split, shard name, the shard's lines)


def _shard(name: str) -> tuple[str, int] | None:
    """("train", n) or ("heldout", n) for an LM1B shard path (inside the tarball or the folder), else None."""
    if match := _TRAIN.search(name):
        return "train", int(match.group(1))
    if match := _HELDOUT.search(name):
        return "heldout", int(match.group(1))
    return None


def _utf8_lines(f: Iterable[bytes]) -> Iterator[str]:
    """The lines of a binary file, decoded (a tar member in stream mode cannot be wrapped in TextIOWrapper)."""
    for line in f:
        yield line.decode("utf-8")


@dataclass(frozen=True)
class TarShards:
    """The shards of the official layout, from the tarball (streamed member by member, never extracted) or the
    folder extracted from it: the training shards, and the held-out shards `valid_shard` and `test_shard`."""

    path: Path
    is_tar: bool
    valid_shard: int
    test_shard: int

    def fix(self) -> str:
        return ("delete it and run again to download it anew, or pass data.path=/path/to/an/intact/copy"
                if self.path.name == TAR_NAME else f"pass an intact copy of {TAR_NAME} as data.path")

    def _members(self) -> Iterator[tuple[str, int, Iterable[str]]]:
        if not self.is_tar:
            files = ((_shard(f.relative_to(self.path).as_posix()), f) for f in self.path.rglob("news.en*"))
            found = sorted((shard, f) for shard, f in files if shard is not None)
            for (kind, n), file in found:
                with open(file, "rb") as f:
                    yield kind, n, _utf8_lines(f)
            return
        # gzip.open rather than tarfile's own "r|gz": GzipFile checks the CRC and size at the end of the stream.
        with gzip.open(self.path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as archive:
            for member in archive:
                if member.isfile() and (shard := _shard(member.name)):
                    yield *shard, _utf8_lines(archive.extractfile(member))
            while gz.read(_COPY):  # to the end of the gzip stream (past the tar's end marker), for the CRC check
                pass

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise ValueError(f"{self.path} is damaged, truncated or not a .tar.gz ({type(err).__name__}: {err}): "
                             f"{self.fix()}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path} holds a shard that is not UTF-8 text ({err}): {self.fix()}") from err

    def _guarded(self, lines: Iterable[str]) -> Iterator[str]:
        """`lines`, with read errors (raised while the consumer reads) turned into one-line errors."""
        with self._reading():
            yield from lines

    def sample(self, n: int) -> list[str]:
        """The first `n` non-blank sentences of the training shards, in archive (folder: shard) order."""
        out: list[str] = []
        with self._reading(), contextlib.closing(self._members()) as members:
            for kind, _, lines in members:
                if kind == "train":
                    out += itertools.islice((s for s in map(str.strip, lines) if s), n - len(out))
                    if len(out) == n:
                        break
        if not out:
            raise FileNotFoundError(f"{self.path} holds no LM1B training shard (training-monolingual.tokenized."
                                    f"shuffled/news.en-000NN-of-00100): {self.fix()}")
        return out

    def parts(self) -> Iterator[Part]:
        """`(split, shard name, the shard's lines)` of every shard of a split, in archive (folder: shard) order."""
        split_of = {self.test_shard: "test", self.valid_shard: "valid"}
        with self._reading(), contextlib.closing(self._members()) as members:
            for kind, n, lines in members:
                if kind == "train":
                    yield "train", f"news.en-{n:05d}-of-{TRAIN_SHARDS:05d}", self._guarded(lines)
                elif n in split_of:
                    yield split_of[n], f"news.en.heldout-{n:05d}-of-{HELDOUT_SHARDS:05d}", self._guarded(lines)

    def check(self, shards: dict[str, list[str]]) -> None:
        """A `FileNotFoundError` if `shards` (split -> shard names read) lacks a split."""
        needed = {"train": "a training shard", "valid": f"held-out shard {self.valid_shard} (data.valid_shard)",
                  "test": f"held-out shard {self.test_shard} (data.test_shard)"}
        missing = [what for split, what in needed.items() if split not in shards]
        if missing:
            raise FileNotFoundError(f"{self.path} lacks {', '.join(missing)} of the LM1B layout "
                                    "(training-monolingual.tokenized.shuffled/news.en-000NN-of-00100, "
                                    "heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050): "
                                    f"{self.fix()}")


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face hub copy (or local files through a builder such as "text" / "parquet"), streamed."""

    name: str
    config: str | None = None
    revision: str | None = None
    data_files: object = None  # as `load_dataset(data_files=...)`: a path, a list, or {split: paths}
    text_column: str = "text"

    def describe(self) -> str:
        return f"hf:{self.name}" + (f"@{self.revision}" if self.revision else "")

    def load(self, split: str):
        """The split as a streamed `datasets.IterableDataset` (a `DownloadError` if it cannot be opened)."""
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, revision=self.revision, data_files=self.data_files,
                                         split=split, streaming=True)
        except Exception as err:  # no network, unknown dataset or split, bad data_files: all one-line errors
            raise DownloadError(f"could not open split {split!r} of the Hugging Face dataset {self.name!r} "
                                f"({type(err).__name__}: {' '.join(str(err).split())}); check data.hf_name, "
                                "data.hf_data_files, data.hf_revision and the network, or use data.source=tar "
                                "with data.path=/path/to/" + TAR_NAME) from err

    def sentences(self, dataset) -> Iterator[str]:
        """The non-blank texts of `dataset` (a loaded split, or a share of one), whitespace stripped."""
        for example in dataset:
            try:
                text = example[self.text_column].strip()
            except KeyError:
                raise ValueError(f"the Hugging Face dataset {self.name!r} has no column {self.text_column!r} (it has "
                                 f"{sorted(example)}): set data.hf_text_column") from None
            if text:
                yield text

    def sample(self, split: str, n: int) -> list[str]:
        """The first `n` sentences of `split`."""
        return list(itertools.islice(self.sentences(self.load(split)), n))
