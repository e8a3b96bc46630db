"""`StreamBatches`: the training batches of `data.source=hf`, packed from a streamed Hugging Face split."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset

from hier_lm.data.lm1b.sources import HFSource
from hier_lm.data.lm1b.tokenizer import EOS, encode_sentences

_STREAM_LINES = 1_000  # sentences tokenised at a time


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
    One DataLoader worker at most (`max_workers`): more would each read a share of the one stream.
    """

    max_workers = 1

    def __init__(self, source: HFSource, split: str, tokenizer_json: str, seq_len: int, batch_size: int, seed: int,
                 *, shuffle_buffer: int, rank: int = 0, world_size: int = 1, start: int = 0):
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
            empty = True
            for text in _buffer_shuffle(self.source.sentences(dataset), self.shuffle_buffer, rng):
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
            ids, _, _ = encode_sentences(tokenizer, list(itertools.islice(sentences, _STREAM_LINES)), eos)
            buffer = np.concatenate([buffer, ids])
            while len(buffer) > step:
                if b >= self.start:
                    yield torch.from_numpy(buffer[offsets])
                buffer, b = buffer[step:], b + 1
