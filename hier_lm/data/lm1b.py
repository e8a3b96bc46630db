"""One Billion Word (LM1B, Chelba et al. 2013) as a subword LM dataset: the official tarball (a local copy,
its extracted folder, or a resumable sha256-checked download) or a Hugging Face hub copy streamed with
`datasets`; a byte-level BPE tokenizer trained on a sample of the training sentences; every sentence
followed by `</s>` and packed into one token stream; the splits cached as a flat token memmap.

Splits (source `tar`): train = the 99 training shards `news.en-00001..00099-of-00100` in shard order;
test = held-out shard 0 (`news.en.heldout-00000-of-00050`, the Transformer-XL / tensor2tensor test set);
valid = held-out shard 1 by default (`valid_shard`; Transformer-XL validates on the test set itself).

Word-level perplexity. A subword model's per-token perplexity `exp(mean_token_nll)` (`val/ppl`) is not
comparable with word-level LM1B numbers. Every split records `tokens` (its subword tokens, one `</s>` per
sentence included) and `words` (its whitespace-separated words plus one end of sentence per sentence, the
LM1B convention: heldout-00000 has 159,658 words). The total NLL of the split is the same in either unit,
so the word-level perplexity is `exp(mean_token_nll * tokens / words)`: `word_ppl_exponent(split)` is
that `tokens / words` (tensor2tensor's 32k subwords give 176,884 / 159,658 = 1.1079 on heldout-00000).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, IterableDataset

from hier_lm.data.corpus import SPLITS, default_data_root, entropy_bits
from hier_lm.data.download import ChecksumError, DownloadError, checksum_hint, download, file_sha256
from hier_lm.data.textfiles import EVAL_SPLITS, ByteLMDataModule, EvalWindows

URL = "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
TAR_NAME = URL.rsplit("/", 1)[1]
# tensorflow/datasets url_checksums/lm1b.txt: 1,792,209,805 bytes.
SHA256 = "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e"
HF_NAME = "billion-word-benchmark/lm1b"  # its parquet export; splits train (99 shards) and test (all 50 held out)
HF_REVISION = "refs/convert/parquet"
HF_DATA_FILES = {"train": "plain_text/train/*.parquet", "test": "plain_text/test/*.parquet"}
EOS = "</s>"  # id 0: ends every sentence
STATE_KEY = "tokenizer_json"  # the tokenizer in the DataModule's checkpoint state
TRAIN_SHARDS, HELDOUT_SHARDS = 100, 50
_TRAIN = re.compile(r"(?:^|/)training-monolingual\.tokenized\.shuffled/news\.en-(\d{5})-of-00100$")
_HELDOUT = re.compile(r"(?:^|/)heldout-monolingual\.tokenized\.shuffled/news\.en\.heldout-(\d{5})-of-00050$")
_FORMAT = 1  # bump when the cache layout changes: it is part of the cache key
_ENCODE_LINES = 10_000
_COPY = 16 << 20
_STREAM_LINES = 1_000


# ------------------------------------------------------------------------------------------- tokenizer


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: text is split on whitespace, each word gets a leading space and is
    spelled in bytes (no unknown token: any UTF-8 text round-trips); decoding drops the first leading
    space. So `decode(encode(s)) == " ".join(s.split())`: runs of whitespace become one space, leading and
    trailing whitespace goes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def train_tokenizer(sentences: Sequence[str], vocab_size: int) -> Tokenizer:
    """A `new_tokenizer()` trained on `sentences`: `</s>` (id 0), the 256 byte symbols, then BPE merges up
    to exactly `vocab_size` entries (a `ValueError` if the sample cannot give that many)."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences, trainer, length=len(sentences))
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the tokenizer sample ({len(sentences):,} sentences) gives only "
                         f"{tokenizer.get_vocab_size():,} subwords, fewer than data.vocab_size={vocab_size:,}: lower "
                         "data.vocab_size or raise data.tokenizer_sample")
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int, where: str, fix: str) -> Tokenizer:
    """`tokenizer` if it has `vocab_size` entries and the `</s>` token, else a `ValueError` naming `where`."""
    if tokenizer.token_to_id(EOS) is None:
        raise ValueError(f"{where} has no {EOS} token (end of sentence): {fix}")
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"{where} has {tokenizer.get_vocab_size():,} subwords but data.vocab_size={vocab_size:,}: "
                         f"set data.vocab_size={tokenizer.get_vocab_size()}, or {fix}")
    return tokenizer


def read_tokenizer(path: str | Path, vocab_size: int, fix: str) -> Tokenizer:
    """The `tokenizers` JSON file `path`, checked by `check_tokenizer`."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exceptions for unreadable files
        raise ValueError(f"{path} is not a tokenizers JSON file ({' '.join(str(err).split())}): {fix}") from err
    return check_tokenizer(tokenizer, vocab_size, str(path), fix)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`: each line's subwords, lines separated by `</s>` (a text ending in a newline
    ends with `</s>`, as every sentence of the data does)."""
    eos = tokenizer.token_to_id(EOS)
    lines = text.split("\n")
    ids: list[int] = []
    for i, encoding in enumerate(tokenizer.encode_batch(lines, add_special_tokens=False)):
        ids += encoding.ids if i == 0 else [eos, *encoding.ids]
    return ids


def decode_ids(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of token ids: `</s>` becomes a newline, the subwords between decode as in `new_tokenizer`."""
    eos = tokenizer.token_to_id(EOS)
    pieces, current = [], []
    for i in map(int, ids):
        if i == eos:
            pieces.append(current)
            current = []
        else:
            current.append(i)
    pieces.append(current)
    return "\n".join(tokenizer.decode_batch(pieces, skip_special_tokens=False))


def tokenizer_from_checkpoint(checkpoint: Mapping) -> Tokenizer | None:
    """The tokenizer saved in a Lightning checkpoint dict by `LM1BDataModule.state_dict()`, or None."""
    states = [checkpoint.get("LM1BDataModule"), *checkpoint.values()]
    for state in states:
        if isinstance(state, Mapping) and isinstance(state.get(STATE_KEY), str):
            return Tokenizer.from_str(state[STATE_KEY])
    return None


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode_lines(tokenizer: Tokenizer, lines: list[str], eos: int) -> tuple[np.ndarray, int, int]:
    """(ids of the non-blank `lines`, each followed by `</s>`; number of sentences; number of words
    counted as whitespace tokens + 1 per sentence)."""
    sentences = [s for s in (line.strip() for line in lines) if s]
    flat: list[int] = []
    for encoding in tokenizer.encode_batch_fast(sentences, add_special_tokens=False):
        flat += encoding.ids
        flat.append(eos)
    words = sum(len(s.split()) for s in sentences) + len(sentences)
    return np.array(flat, dtype=np.int64), len(sentences), words


# ------------------------------------------------------------------------------------------ the cache


class TokenCorpus:
    """A finished LM1B cache folder: `tokens.bin` (every split's token ids, `</s>` after each sentence,
    concatenated train, valid, test; uint16 for vocabularies up to 65,536, else int32), `tokenizer.json`
    and `meta.json` (written last: split offsets, per-split sentence / word / token counts, sha256s).

    Duck-types `ByteCorpus` for `ByteLMDataModule`: `meta["splits"]`, `split(name)`, `unigram_entropy`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self._read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no finished LM1B cache (meta.json, tokens.bin or "
                                    "tokenizer.json missing or incomplete)")
        self.meta: dict = meta

    @staticmethod
    def _read_meta(folder: Path) -> dict | None:
        try:
            meta = json.loads((folder / "meta.json").read_text())
            itemsize = np.dtype(meta["dtype"]).itemsize
            complete = (folder / "tokens.bin").stat().st_size == meta["tokens"] * itemsize
            tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
            complete &= _sha256_text(tokenizer_json) == meta["tokenizer_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if complete else None

    @classmethod
    def open_finished(cls, folder: str | Path) -> TokenCorpus | None:
        """The finished cache in `folder`, or None (absent, half-written or damaged)."""
        return cls(folder) if cls._read_meta(Path(folder)) is not None else None

    def _check_name(self, name: str) -> None:
        if name not in self.meta["splits"]:
            raise ValueError(f"unknown split {name!r}; this cache has {list(self.meta['splits'])}")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    def split(self, name: str) -> np.memmap:
        """Read-only memmap of the split's token ids (`meta["dtype"]`)."""
        self._check_name(name)
        start, end = self.meta["splits"][name]
        dtype = np.dtype(self.meta["dtype"])
        return np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", offset=start * dtype.itemsize,
                         shape=(end - start,))

    def word_ppl_exponent(self, name: str) -> float:
        """`tokens / words` of the split: word-level perplexity = `exp(mean_token_nll * this)`."""
        self._check_name(name)
        counts = self.meta["counts"][name]
        return counts["tokens"] / counts["words"]

    def unigram_entropy(self, name: str) -> float:
        """Token-unigram entropy of the split in bits per token: the loss of a model that ignores context."""
        self._check_name(name)
        return self.meta["unigram_entropy_bits"][name]

    def describe(self, name: str = "lm1b") -> str:
        """Where the cache is, its split sizes and checksums, as printed by `python -m hier_lm.data prepare`."""
        meta = self.meta
        lines = [f"{name} cache: {self.path.resolve()}",
                 f"  tokens.bin: {meta['tokens']:,} tokens ({meta['dtype']}), sha256 {meta['sha256']}",
                 f"  tokenizer.json: {meta['vocab_size']:,} subwords (byte-level BPE, {EOS} = end of sentence), "
                 f"sha256 {meta['tokenizer_sha256']}",
                 f"  source: {meta['source']}" + (f", sha256 {sha}" if (sha := meta.get("source_sha256")) else "")]
        for split, (start, end) in meta["splits"].items():
            c = meta["counts"][split]
            lines.append(f"  {split:<5}  {c['sentences']:>11,} sentences  {c['words']:>13,} words  {c['tokens']:>13,} "
                         f"tokens  tokens/words {c['tokens'] / c['words']:.4f}  [{start:,}, {end:,})  "
                         f"shards {','.join(meta['shards'][split])}")
        return "\n".join(lines)


Part = tuple[str, str, Iterable[str]]  # (split, shard name, the shard's lines)


def write_corpus(folder: Path, tokenizer: Tokenizer, parts: Iterable[Part], head: dict,
                 check: Callable[[dict[str, list[str]]], None], progress: bool = False) -> TokenCorpus:
    """Tokenise `parts` into the finished cache `folder` (whose `tokenizer.json` is `tokenizer`) and open it.

    Each part is written to `parts.tmp/` as it comes; `check(shards)` (split -> shard names read) may
    reject the set; the parts are then concatenated per split in shard-name order into `tokens.bin.tmp`,
    and `tokens.bin`, then `meta.json`, renamed into place: an interrupted or failed write leaves no
    finished cache behind.
    """
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)
    eos = tokenizer.token_to_id(EOS)
    scratch, tmp = folder / "parts.tmp", folder / "tokens.bin.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    files: dict[str, dict[str, Path]] = {}
    counts: dict[str, dict[str, int]] = {}
    histograms: dict[str, np.ndarray] = {}
    try:
        for split, shard, lines in parts:
            file = scratch / f"{split}-{shard}.bin"
            c = counts.setdefault(split, {"sentences": 0, "words": 0, "tokens": 0})
            histogram = histograms.setdefault(split, np.zeros(vocab, dtype=np.int64))
            with open(file, "wb") as out:
                for batch in _batched(lines):
                    ids, sentences, words = _encode_lines(tokenizer, list(batch), eos)
                    out.write(ids.astype(dtype).tobytes())
                    histogram += np.bincount(ids, minlength=vocab)
                    c["sentences"] += sentences
                    c["words"] += words
                    c["tokens"] += len(ids)
            files.setdefault(split, {})[shard] = file
            if progress:
                print(f"lm1b: {split} <- {shard} ({c['sentences']:,} {split} sentences so far)", file=sys.stderr,
                      flush=True)
        check({split: sorted(names) for split, names in files.items()})
        empty = [split for split, c in counts.items() if c["sentences"] == 0]
        if empty:
            raise ValueError(f"the {', '.join(empty)} split of {head['source']} has no sentences: pass an intact copy")
        sha, offset, bounds = hashlib.sha256(), 0, {}
        with open(tmp, "wb") as out:
            for split in (s for s in SPLITS if s in files):
                start = offset
                for shard in sorted(files[split]):
                    with open(files[split][shard], "rb") as src:
                        while chunk := src.read(_COPY):
                            out.write(chunk)
                            sha.update(chunk)
                            offset += len(chunk) // dtype.itemsize
                    files[split][shard].unlink()
                bounds[split] = [start, offset]
            out.flush()
            os.fsync(out.fileno())
        meta = {**head, "dtype": dtype.name, "tokens": offset, "vocab_size": vocab,
                "tokenizer_sha256": _sha256_text(tokenizer.to_str()), "splits": bounds,
                "shards": {split: sorted(files[split]) for split in bounds},
                "counts": {split: counts[split] for split in bounds}, "sha256": sha.hexdigest(),
                "unigram_entropy_bits": {split: entropy_bits(histograms[split]) for split in bounds}}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (folder / "meta.json").unlink(missing_ok=True)
    os.replace(tmp, folder / "tokens.bin")
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(folder / "meta.json.tmp", folder / "meta.json")
    return TokenCorpus(folder)


def _batched(lines: Iterable[str]) -> Iterator[tuple[str, ...]]:  # itertools.batched before Python 3.12
    it = iter(lines)
    while batch := tuple(itertools.islice(it, _ENCODE_LINES)):
        yield batch


def _write_tokenizer(path: Path, tokenizer: Tokenizer) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tokenizer.to_str(), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- the sources


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
class _Shards:
    """The official layout, from the tarball (streamed member by member, never extracted) or a folder."""

    path: Path
    is_tar: bool
    valid_shard: int
    test_shard: int

    def fix(self) -> str:
        return ("delete it and run again to download it anew, or pass data.path=/path/to/an/intact/copy"
                if self.path.name == TAR_NAME else f"pass an intact copy of {TAR_NAME} ({URL}) as data.path")

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
        split_of = {self.test_shard: "test", self.valid_shard: "valid"}
        with self._reading(), contextlib.closing(self._members()) as members:
            for kind, n, lines in members:
                if kind == "train":
                    yield "train", f"news.en-{n:05d}-of-{TRAIN_SHARDS:05d}", self._guarded(lines)
                elif n in split_of:
                    yield split_of[n], f"news.en.heldout-{n:05d}-of-{HELDOUT_SHARDS:05d}", self._guarded(lines)

    def check(self, shards: dict[str, list[str]]) -> None:
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
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, revision=self.revision, data_files=self.data_files,
                                         split=split, streaming=True)
        except Exception as err:  # no network, unknown dataset or split, bad data_files: all one-line errors
            raise DownloadError(f"could not open split {split!r} of the Hugging Face dataset {self.name!r} "
                                f"({type(err).__name__}: {' '.join(str(err).split())}); check data.hf_name, "
                                "data.hf_data_files, data.hf_revision and the network, or use data.source=tar "
                                "with data.path=/path/to/" + TAR_NAME) from err

    def texts(self, dataset) -> Iterator[str]:
        for example in dataset:
            try:
                yield example[self.text_column]
            except KeyError:
                raise ValueError(f"the Hugging Face dataset {self.name!r} has no column {self.text_column!r} (it has "
                                 f"{sorted(example)}): set data.hf_text_column") from None


# ------------------------------------------------------------------------------------------- prepare


def _plain(value):
    """Hydra's DictConfig / ListConfig (or tuples) as plain dicts / lists, for hparams and the cache key."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_settings(vocab_size: int, tokenizer_sample: int, valid_shard: int, test_shard: int, source: str) -> None:
    """A `ValueError` naming the setting if any of these is out of range."""
    if source not in ("tar", "hf"):
        raise ValueError(f"data.source must be 'tar' (the official tarball) or 'hf' (a Hugging Face copy), "
                         f"got {source!r}")
    if not 258 <= vocab_size <= 1 << 31:
        raise ValueError(f"data.vocab_size must be at least 258 ({EOS} + 256 bytes + 1 merge), got {vocab_size}")
    if tokenizer_sample < 1:
        raise ValueError(f"data.tokenizer_sample must be at least 1 sentence, got {tokenizer_sample}")
    for name, shard in (("valid_shard", valid_shard), ("test_shard", test_shard)):
        if not 0 <= shard < HELDOUT_SHARDS:
            raise ValueError(f"data.{name} must be a held-out shard number in [0, {HELDOUT_SHARDS}), got {shard}")
    if valid_shard == test_shard:
        raise ValueError(f"data.valid_shard and data.test_shard are both {test_shard}: pick two different held-out "
                         "shards (the standard test set is shard 0)")


def prepare_lm1b(root: str | Path | None = None, *, source: str = "tar", path: str | Path | None = None,
                 url: str = URL, sha256: str | None = SHA256, tokenizer: str | Path | None = None,
                 vocab_size: int = 32_000, tokenizer_sample: int = 1_000_000, valid_shard: int = 1,
                 test_shard: int = 0, hf_name: str = HF_NAME, hf_config: str | None = None,
                 hf_revision: str | None = HF_REVISION, hf_data_files=HF_DATA_FILES, hf_text_column: str = "text",
                 hf_splits: Mapping[str, str] | None = None, progress: bool = True) -> TokenCorpus:
    """Open the LM1B cache `<root>/lm1b/<key>/` (root default `default_data_root()`), making it first if absent.

    The key hashes the settings (source kind, and for `hf` the dataset id, revision, files and splits;
    `vocab_size`, `tokenizer_sample`, the tokenizer file's content, the held-out shards), not where the
    copy lies: a finished cache is reused as it is, with no network and no source needed.

    `source="tar"`: the shards come from `path` (the tarball or a folder holding the extracted layout) or
    from `<root>/lm1b/<TAR_NAME>`, downloaded from `url` if absent (resumable, kept); the tarball must have
    `sha256` (None skips the check). `source="hf"`: `datasets.load_dataset(hf_name, hf_config,
    revision=hf_revision, data_files=hf_data_files, streaming=True)`, text in `hf_text_column`; only the
    evaluation splits `hf_splits["valid"]`, `hf_splits["test"]` (default both "test": the HF copy has no
    other held-out split) are cached; training streams (`LM1BDataModule`).

    The tokenizer is `tokenizer` (a tokenizers JSON file) if given, else `tokenizer.json` in the cache
    folder if a previous run left one, else trained on the first `tokenizer_sample` training sentences
    (`train_tokenizer`) and saved there; it must have exactly `vocab_size` entries.
    """
    check_settings(vocab_size, tokenizer_sample, valid_shard, test_shard, source)
    splits = {"train": "train", "valid": "test", "test": "test", **(_plain(hf_splits) or {})}
    tokenizer_file, given = None if tokenizer is None else Path(tokenizer).expanduser(), None
    if tokenizer_file is not None:
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"data.tokenizer={tokenizer} is not a file: pass a tokenizers JSON file (e.g. the "
                                    "tokenizer.json of another LM1B cache), or data.tokenizer=null to train one")
        given = read_tokenizer(tokenizer_file, vocab_size, "pass another tokenizer file (data.tokenizer)")
    settings = {"format": _FORMAT, "source": "statmt-r13output" if source == "tar" else "hf",
                "vocab_size": vocab_size, "tokenizer_sample": tokenizer_sample,
                "tokenizer": None if tokenizer_file is None else file_sha256(tokenizer_file)}
    if source == "tar":
        settings.update(valid_shard=valid_shard, test_shard=test_shard)
    else:
        settings.update(hf_name=hf_name, hf_config=hf_config, hf_revision=hf_revision,
                        hf_data_files=_plain(hf_data_files), hf_text_column=hf_text_column, hf_splits=splits)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(root).expanduser() if root else default_data_root()
    folder = base / "lm1b" / key
    corpus = TokenCorpus.open_finished(folder)
    if corpus is not None:
        return corpus

    def say(text: str) -> None:
        if progress:
            print(f"lm1b: {text}", file=sys.stderr, flush=True)

    head = {"format": _FORMAT, "dataset": "lm1b", "settings": settings}
    if source == "tar":
        shards = _tar_shards(base, path, url, sha256, valid_shard, test_shard, progress)
        checksum = None if not shards.is_tar else sha256.lower() if sha256 else file_sha256(shards.path)
        head.update(source=str(shards.path.resolve()), source_sha256=checksum)
        sample, parts, check = shards.sample, shards.parts, shards.check
    else:
        hf = HFSource(hf_name, hf_config, hf_revision, _plain(hf_data_files), hf_text_column)
        head.update(source=hf.describe(), hf_splits=splits)

        def sample(n: int) -> list[str]:
            texts = (t.strip() for t in hf.texts(hf.load(splits["train"])))
            return list(itertools.islice((t for t in texts if t), n))

        def parts() -> Iterator[Part]:
            for split in ("valid", "test"):
                yield split, splits[split], hf.texts(hf.load(splits[split]))

        def check(found: dict[str, list[str]]) -> None:
            pass

    folder.mkdir(parents=True, exist_ok=True)
    if given is not None:
        tok = given
        _write_tokenizer(folder / "tokenizer.json", tok)
    elif (folder / "tokenizer.json").is_file():
        tok = read_tokenizer(folder / "tokenizer.json", vocab_size, "delete it to train a new one")
        say(f"reusing the tokenizer {folder / 'tokenizer.json'}")
    else:
        say(f"reading up to {tokenizer_sample:,} training sentences for the tokenizer from {head['source']}")
        sentences = sample(tokenizer_sample)
        say(f"training a {vocab_size:,}-subword byte-level BPE on {len(sentences):,} sentences")
        tok = train_tokenizer(sentences, vocab_size)
        _write_tokenizer(folder / "tokenizer.json", tok)
        head["tokenizer_trained_on_sentences"] = len(sentences)
    say(f"tokenising {head['source']} into {folder}")
    return write_corpus(folder, tok, parts(), head, check, progress)


def _tar_shards(base: Path, path, url: str, sha256: str | None, valid_shard: int, test_shard: int,
                progress: bool) -> _Shards:
    if path is not None:
        source = Path(path).expanduser()
        if source.is_dir():
            return _Shards(source, False, valid_shard, test_shard)
        if not source.is_file():
            raise FileNotFoundError(f"data.path={path} does not exist: pass the path of {TAR_NAME} ({URL}) or of the "
                                    "folder extracted from it, or data.path=null to download it")
        if sha256 is not None and (actual := file_sha256(source)) != sha256.lower():
            raise ChecksumError(f"data.path={source} has sha256 {actual}, but {TAR_NAME} ({URL}) has {sha256}: "
                                f"pass the right file, or {checksum_hint()}")
        return _Shards(source, True, valid_shard, test_shard)
    local = (f"pass data.path=/path/to/{TAR_NAME} or the folder extracted from it (--path with `python -m "
             f"hier_lm.data prepare lm1b`), or put the tarball at {base / 'lm1b' / TAR_NAME}")
    tar = download(url, base / "lm1b" / TAR_NAME, sha256, desc=TAR_NAME, progress=progress, local_hint=local)
    return _Shards(tar, True, valid_shard, test_shard)


# ---------------------------------------------------------------------------------------- the stream


def _buffer_shuffle(items: Iterable[str], size: int, rng: np.random.Generator) -> Iterator[str]:
    """`items` in a random order that only mixes items at most about `size` apart (`size` 1: unchanged)."""
    buffer: list[str] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


class StreamBatches(IterableDataset):
    """Endless training batches `LongTensor[batch_size, seq_len + 1]` from a streamed Hugging Face split.

    `split_dataset_by_node` gives rank `rank` of `world_size` its disjoint share (whole files when their
    number divides by `world_size`, else every `world_size`-th example); each epoch's share is shuffled
    in a buffer of `shuffle_buffer` sentences (`default_rng([seed, rank, epoch])`; done here, not by
    `datasets`, whose shuffle order changes inside a DataLoader worker); its sentences (each followed by
    `</s>`) form one token stream across epochs, and batch `b` holds its windows
    `[(b * B + i) * seq_len, ... + seq_len + 1)`, i < B: every token is a target once. The stream never ends
    on any rank, so ranks never disagree on the number of batches. Batches before `start` are read and
    dropped (that is how a resumed run continues: exact, at the cost of re-reading the stream so far).
    """

    def __init__(self, source: HFSource, split: str, tokenizer_json: str, seq_len: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, start: int = 0, shuffle_buffer: int = 10_000):
        self.source, self.split, self.tokenizer_json = source, split, tokenizer_json
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.start, self.shuffle_buffer = rank, world_size, start, shuffle_buffer

    def sentences(self) -> Iterator[str]:
        """This rank's sentences, epoch after epoch."""
        from datasets.distributed import split_dataset_by_node

        dataset = self.source.load(self.split)
        if self.world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        for epoch in itertools.count():
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            texts = (text for text in map(str.strip, self.source.texts(dataset)) if text)
            empty = True
            for text in _buffer_shuffle(texts, self.shuffle_buffer, rng):
                empty = False
                yield text
            if empty:
                raise ValueError(f"rank {self.rank} of {self.world_size} gets no sentence of the {self.split!r} "
                                 f"split of {self.source.describe()}: use fewer devices or more data")

    def __iter__(self) -> Iterator[torch.Tensor]:
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        eos = tokenizer.token_to_id(EOS)
        step = self.batch_size * self.seq_len
        offsets = np.arange(self.batch_size)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        buffer, b = np.empty(0, dtype=np.int64), 0
        sentences = self.sentences()
        while True:
            ids, _, _ = _encode_lines(tokenizer, list(itertools.islice(sentences, _STREAM_LINES)), eos)
            buffer = np.concatenate([buffer, ids])
            while len(buffer) > step:
                if b >= self.start:
                    yield torch.from_numpy(buffer[offsets])
                buffer, b = buffer[step:], b + 1


# ---------------------------------------------------------------------------------------- DataModule


class LM1BDataModule(ByteLMDataModule):
    """One Billion Word subwords (metric ppl; `vocab_size` = `data.vocab_size`, byte-level BPE, `</s>` ends
    each sentence): batches `LongTensor[B, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`) of the packed
    token stream, as for the byte datasets.

    Training: `source="tar"`: random windows of the cached train split, drawn and resumed exactly as in
    `ByteLMDataModule` (by batch index, rank-aware); `source="hf"`: `StreamBatches` of the streamed train
    split (rank share by `split_dataset_by_node`), resumed by re-reading the stream up to the saved batch.
    Evaluation: contiguous non-overlapping windows of the cached valid / test split (each target once);
    under DDP rank r of W gets windows r, r + W, ... cut to the same count on every rank (at most W - 1
    windows dropped). `state_dict()` also holds the tokenizer (`tokenizer_from_checkpoint` reads it back);
    resuming with another tokenizer is an error. See `prepare_lm1b` for the source and tokenizer settings.
    """

    metric = "ppl"

    def __init__(self, root: str | Path | None = None, source: str = "tar", path: str | Path | None = None,
                 url: str = URL, sha256: str | None = SHA256, tokenizer: str | Path | None = None,
                 vocab_size: int = 32_000, tokenizer_sample: int = 1_000_000, valid_shard: int = 1,
                 test_shard: int = 0, hf_name: str = HF_NAME, hf_config: str | None = None,
                 hf_revision: str | None = HF_REVISION, hf_data_files=HF_DATA_FILES, hf_text_column: str = "text",
                 hf_splits: Mapping[str, str] | None = None, hf_shuffle_buffer: int = 10_000, seq_len: int = 128,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 1, seed: int = 0):
        super().__init__()
        self._check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size,
                          num_workers=num_workers, seed=seed, hf_shuffle_buffer=hf_shuffle_buffer)
        check_settings(vocab_size, tokenizer_sample, valid_shard, test_shard, source)
        # Plain Python values (not Hydra's DictConfig, not Path) so that checkpoints load with weights_only=True.
        root, path, tokenizer = (None if v is None else os.fspath(v) for v in (root, path, tokenizer))
        hf_data_files, hf_splits = _plain(hf_data_files), _plain(hf_splits)
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self._resumed_tokenizer: str | None = None

    def _settings(self) -> dict:
        h = self.hparams
        return {k: h[k] for k in ("source", "path", "url", "sha256", "tokenizer", "vocab_size", "tokenizer_sample",
                                  "valid_shard", "test_shard", "hf_name", "hf_config", "hf_revision", "hf_data_files",
                                  "hf_text_column", "hf_splits")}

    def _build(self) -> TokenCorpus:
        corpus = prepare_lm1b(self.hparams.root, **self._settings())
        if self._resumed_tokenizer is not None:
            self._check_resumed(corpus)
        return corpus

    @property
    def tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` of the data (after `setup()`)."""
        return self._opened().tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; newlines become `</s>` (see `encode_text`)."""
        return encode_text(self.tokenizer, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; `</s>` becomes a newline (see `decode_ids`)."""
        return decode_ids(self.tokenizer, ids)

    def word_ppl_exponent(self, split: str) -> float:
        """`tokens / words` of the split: word-level perplexity = `exp(mean_token_nll * word_ppl_exponent)`."""
        return self._opened().word_ppl_exponent(split)

    def _check_length(self, split: str) -> None:
        start, end = self._opened().meta["splits"][split]
        if end - start < self.hparams.seq_len + 1:
            raise ValueError(f"the {split} split has {end - start:,} tokens, fewer than data.seq_len + 1 = "
                             f"{self.hparams.seq_len + 1:,}: lower data.seq_len")

    def train_dataloader(self) -> DataLoader:
        """Endless `LongTensor[batch_size, seq_len + 1]` batches, starting at the batch index consumed so far."""
        if self.hparams.source == "tar":
            self._check_length("train")
            return super().train_dataloader()
        h = self.hparams
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        splits = self._opened().meta["hf_splits"]
        stream = StreamBatches(HFSource(h.hf_name, h.hf_config, h.hf_revision, h.hf_data_files, h.hf_text_column),
                               splits["train"], self.tokenizer.to_str(), h.seq_len, h.batch_size, h.seed, rank, world,
                               self._batches_consumed(), h.hf_shuffle_buffer)
        # One worker at most: the stream is one sequence of batches (more workers would each read a share).
        return DataLoader(stream, batch_size=None, num_workers=min(h.num_workers, 1), persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator())

    def _eval_windows(self, split: str) -> EvalWindows:
        if split in EVAL_SPLITS:
            self._check_length(split)
        return super()._eval_windows(split)

    def state_dict(self) -> dict:
        """The training position (`ByteLMDataModule.state_dict`) and the tokenizer's JSON (`STATE_KEY`)."""
        tokenizer = None if self.corpus is None else self.corpus.tokenizer.to_str()
        return {**super().state_dict(), STATE_KEY: tokenizer}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved batch; the data must be tokenised by the checkpoint's tokenizer."""
        super().load_state_dict(state)
        self._resumed_tokenizer = state.get(STATE_KEY)
        if self.corpus is not None and self._resumed_tokenizer is not None:
            self._check_resumed(self.corpus)

    def _check_resumed(self, corpus: TokenCorpus) -> None:
        # The vocabularies (subword -> id; BPE ids follow the merge order), not the JSON text, which differs
        # between tokenizers versions.
        if Tokenizer.from_str(self._resumed_tokenizer).get_vocab() != corpus.tokenizer.get_vocab():
            raise ValueError(f"the checkpoint was trained with another tokenizer than "
                             f"{corpus.path / 'tokenizer.json'}: resume with the data settings of that run "
                             "(data.vocab_size, data.tokenizer_sample, data.source), or pass its tokenizer as "
                             "data.tokenizer")
