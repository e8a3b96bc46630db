"""The LM1B token cache: `TokenCorpus` (a finished cache folder) and `write_corpus` (tokenise sentences into one)."""

from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from hier_lm.data.cache import MemmapCache, entropy_bits
from hier_lm.data.lm1b.sources import Part
from hier_lm.data.lm1b.tokenizer import EOS, encode_sentences
from hier_lm.data.settings import SPLITS

TOKENS, TOKENIZER = "tokens.bin", "tokenizer.json"
_ENCODE_LINES = 10_000  # sentences tokenised at a time
_COPY = 16 << 20


def text_sha256(text: str) -> str:
    """sha256 of the UTF-8 bytes of `text` (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TokenCorpus(MemmapCache):
    """A finished LM1B cache folder: `tokens.bin` (every split's token ids, `</s>` after each sentence,
    concatenated train, valid, test; uint16 for vocabularies up to 65,536, else int32), `tokenizer.json`
    (its sha256 checked on opening) and `meta.json` (split offsets, per-split sentence / word / token counts,
    sha256s, unigram entropies, and the chunk checksums of `tokens.bin` checked on opening: see `MemmapCache`).

    Serves a `TokenWindowDataModule` like a `ByteCorpus`: `meta["splits"]`, `split(name)`, `unigram_entropy`.
    """

    kind = "LM1B cache"

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        return {TOKENS: meta["tokens"] * np.dtype(meta["dtype"]).itemsize}

    @classmethod
    def file_checksums(cls, meta: dict) -> dict[str, str]:
        return {TOKENIZER: meta["tokenizer_sha256"]}

    @classmethod
    def file_regions(cls, meta: dict) -> dict[str, dict[str, tuple[int, int]]]:
        size = np.dtype(meta["dtype"]).itemsize
        return {TOKENS: {f"the {name} split": (start * size, end * size)
                         for name, (start, end) in meta["splits"].items()}}

    @classmethod
    def data_sha256(cls, meta: dict) -> dict[str, str]:
        return {TOKENS: meta["sha256"]}

    def _check_name(self, name: str) -> None:
        if name not in self.meta["splits"]:
            raise ValueError(f"unknown split {name!r}; this cache has {list(self.meta['splits'])}")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / TOKENIZER))

    def split(self, name: str) -> np.memmap:
        """Read-only memmap of the split's token ids (`meta["dtype"]`)."""
        self._check_name(name)
        return self.memmap(TOKENS, self.meta["dtype"], *self.meta["splits"][name])

    def word_ppl_exponent(self, name: str) -> float:
        """`tokens / words` of the split: word-level perplexity = `exp(mean_token_nll * this)`."""
        self._check_name(name)
        counts = self.meta["counts"][name]
        return counts["tokens"] / counts["words"]

    def unigram_entropy(self, name: str) -> float:
        """Token-unigram entropy of the split in bits per token: the loss of a model that ignores context."""
        self._check_name(name)
        return self.meta["unigram_entropy_bits"][name]

    def describe(self, name: str) -> str:
        """Where the cache is, its tokenizer, source, and each split's sentences, words, tokens and shards."""
        meta = self.meta
        lines = [f"{name} cache: {self.path.resolve()}",
                 f"  {TOKENS}: {meta['tokens']:,} tokens ({meta['dtype']}), sha256 {meta['sha256']}",
                 f"  {TOKENIZER}: {meta['vocab_size']:,} subwords (byte-level BPE, {EOS} = end of sentence), "
                 f"sha256 {meta['tokenizer_sha256']}",
                 f"  source: {meta['source']}" + (f", sha256 {sha}" if (sha := meta.get("source_sha256")) else "")]
        for split, (start, end) in meta["splits"].items():
            c = meta["counts"][split]
            lines.append(f"  {split:<5}  {c['sentences']:>11,} sentences  {c['words']:>13,} words  {c['tokens']:>13,} "
                         f"tokens  tokens/words {c['tokens'] / c['words']:.4f}  [{start:,}, {end:,})  "
                         f"shards {','.join(meta['shards'][split])}")
        return "\n".join(lines)


def _batched(lines: Iterable[str]) -> Iterator[tuple[str, ...]]:  # itertools.batched before Python 3.12
    it = iter(lines)
    while batch := tuple(itertools.islice(it, _ENCODE_LINES)):
        yield batch


def _file_chunks(files: Iterable[Path]) -> Iterator[bytes]:
    """The files' bytes in order, each file deleted once read."""
    for file in files:
        with open(file, "rb") as src:
            while chunk := src.read(_COPY):
                yield chunk
        file.unlink()


def write_corpus(folder: Path, tokenizer: Tokenizer, parts: Iterable[Part], head: dict,
                 check: Callable[[dict[str, list[str]]], None], progress: bool = False) -> TokenCorpus:
    """Tokenise `parts` into the finished cache `folder`, whose `tokenizer.json` is already `tokenizer`, and
    open it.

    Each part is tokenised into a scratch file of the writer as it comes; `check(shards)` (split -> shard
    names read) may reject the set; the parts are then concatenated per split, in shard-name order, into
    `tokens.bin` (through `CacheWriter`: an interrupted or failed write leaves no finished cache behind).
    """
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)
    eos = tokenizer.token_to_id(EOS)
    files: dict[str, dict[str, Path]] = {}
    counts: dict[str, dict[str, int]] = {}
    histograms: dict[str, np.ndarray] = {}
    with TokenCorpus.writer(folder) as writer:
        for split, shard, lines in parts:
            file = writer.scratch / f"{split}-{shard}.bin"
            c = counts.setdefault(split, {"sentences": 0, "words": 0, "tokens": 0})
            histogram = histograms.setdefault(split, np.zeros(vocab, dtype=np.int64))
            with open(file, "wb") as out:
                for batch in _batched(lines):
                    ids, sentences, words = encode_sentences(tokenizer, list(batch), eos)
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
        order = [split for split in SPLITS if split in files]
        ends = np.cumsum([counts[split]["tokens"] for split in order]).tolist()
        bounds = {split: [end - counts[split]["tokens"], end] for split, end in zip(order, ends)}
        written = writer.add(TOKENS, _file_chunks(files[split][shard] for split in order
                                                  for shard in sorted(files[split])))
        writer.publish({**head, "dtype": dtype.name, "tokens": ends[-1], "vocab_size": vocab,
                        "tokenizer_sha256": text_sha256(tokenizer.to_str()), "splits": bounds,
                        "shards": {split: sorted(files[split]) for split in order},
                        "counts": {split: counts[split] for split in order}, "sha256": written.sha256,
                        "unigram_entropy_bits": {split: entropy_bits(histograms[split]) for split in order}})
    return TokenCorpus(folder, verify=False)  # just written and checksummed
