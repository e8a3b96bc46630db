"""`prepare_lm1b`: make or reuse the LM1B token cache of a set of data settings."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from hier_lm.data.cache import default_data_root
from hier_lm.data.download import ChecksumError, checksum_hint, download, file_sha256
from hier_lm.data.lm1b.cache import TOKENIZER, TokenCorpus, write_corpus
from hier_lm.data.lm1b.sources import HELDOUT_SHARDS, TAR_NAME, HFSource, TarShards
from hier_lm.data.lm1b.tokenizer import EOS, read_tokenizer, train_tokenizer
from hier_lm.data.settings import plain
from hier_lm.files import atomic_write_text

_FORMAT = 1  # bump when the cache layout changes: it is part of the cache key


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


def _tar_shards(base: Path, path, url: str, sha256: str | None, valid_shard: int, test_shard: int,
                progress: bool) -> TarShards:
    if path is not None:
        source = Path(path).expanduser()
        if source.is_dir():
            return TarShards(source, False, valid_shard, test_shard)
        if not source.is_file():
            raise FileNotFoundError(f"data.path={path} does not exist: pass the path of {TAR_NAME} ({url}) or of the "
                                    "folder extracted from it, or data.path=null to download it")
        if sha256 is not None and (actual := file_sha256(source)) != sha256.lower():
            raise ChecksumError(f"data.path={source} has sha256 {actual}, but {TAR_NAME} ({url}) has {sha256}: "
                                f"pass the right file, or {checksum_hint()}")
        return TarShards(source, True, valid_shard, test_shard)
    local = (f"pass data.path=/path/to/{TAR_NAME} or the folder extracted from it (for training or `python -m "
             f"hier_lm.data prepare lm1b`), or put the tarball at {base / 'lm1b' / TAR_NAME}")
    tar = download(url, base / "lm1b" / TAR_NAME, sha256, desc=TAR_NAME, progress=progress, local_hint=local)
    return TarShards(tar, True, valid_shard, test_shard)


def prepare_lm1b(root: str | Path | None = None, *, source: str, path: str | Path | None, url: str,
                 sha256: str | None, tokenizer: str | Path | None, vocab_size: int, tokenizer_sample: int,
                 valid_shard: int, test_shard: int, hf_name: str, hf_config: str | None, hf_revision: str | None,
                 hf_data_files, hf_text_column: str, hf_splits: Mapping[str, str] | None,
                 progress: bool = True) -> TokenCorpus:
    """Open the LM1B cache `<root>/lm1b/<key>/` (root default `default_data_root()`), making it first if absent.
    The settings are those of `LM1BDataModule` (their defaults: recipes/data/lm1b.yaml).

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
    splits = {"train": "train", "valid": "test", "test": "test", **(plain(hf_splits) or {})}
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
                        hf_data_files=plain(hf_data_files), hf_text_column=hf_text_column, hf_splits=splits)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(root).expanduser() if root else default_data_root()
    folder = base / "lm1b" / key
    corpus = TokenCorpus.open_finished(folder, rebuild=None if path is None else f"from {path}")  # damaged
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
        sample, parts, check = shards.sample, shards.parts(), shards.check
    else:
        hf = HFSource(hf_name, hf_config, hf_revision, plain(hf_data_files), hf_text_column)
        head.update(source=hf.describe(), hf_splits=splits)

        def sample(n: int) -> list[str]:
            return hf.sample(splits["train"], n)

        parts = ((split, splits[split], hf.sentences(hf.load(splits[split]))) for split in ("valid", "test"))

        def check(found: dict[str, list[str]]) -> None:
            pass

    # The tokenizer is saved in the cache folder before tokenising: a failed run's successor reuses it.
    folder.mkdir(parents=True, exist_ok=True)
    if given is not None:
        tok = given
        atomic_write_text(folder / TOKENIZER, tok.to_str())
    elif (folder / TOKENIZER).is_file():
        tok = read_tokenizer(folder / TOKENIZER, vocab_size, "delete it to train a new one")
        say(f"reusing the tokenizer {folder / TOKENIZER}")
    else:
        say(f"reading up to {tokenizer_sample:,} training sentences for the tokenizer from {head['source']}")
        sentences = sample(tokenizer_sample)
        say(f"training a {vocab_size:,}-subword byte-level BPE on {len(sentences):,} sentences")
        tok = train_tokenizer(sentences, vocab_size)
        atomic_write_text(folder / TOKENIZER, tok.to_str())
        head["tokenizer_trained_on_sentences"] = len(sentences)
    say(f"tokenising {head['source']} into {folder}")
    return write_corpus(folder, tok, parts, head, check, progress)
