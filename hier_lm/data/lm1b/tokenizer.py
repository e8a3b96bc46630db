"""The LM1B tokenizer: a byte-level BPE (`tokenizers`) trained on training sentences, `</s>` (id 0) ending
every sentence; encoding and decoding text with it, and reading it back from a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "</s>"  # id 0: ends every sentence
STATE_KEY = "tokenizer_json"  # the tokenizer in the DataModule's checkpoint state


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


def encode_sentences(tokenizer: Tokenizer, lines: list[str], eos: int) -> tuple[np.ndarray, int, int]:
    """(`int64[n]` ids of the non-blank `lines`, each followed by `</s>` (id `eos`); number of sentences;
    number of words, counted as whitespace tokens + 1 per sentence)."""
    sentences = [s for s in (line.strip() for line in lines) if s]
    flat: list[int] = []
    for encoding in tokenizer.encode_batch_fast(sentences, add_special_tokens=False):
        flat += encoding.ids
        flat.append(eos)
    words = sum(len(s.split()) for s in sentences) + len(sentences)
    return np.array(flat, dtype=np.int64), len(sentences), words
