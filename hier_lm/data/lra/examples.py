"""Long Range Arena examples on disk and in batches: `LRACache` (each split's token sequences, their offsets
and labels, as raw memmap files written by `CacheWriter`), `write_cache`, and the readers: `Examples` (one
split), `TrainExamples` (endless training batches) and `EvalExamples` (every example once, in order).

An example is `(sequences, label)`: one token sequence (`uint8`/`uint16 [n]`), or two for the pair task
(Retrieval), and an int class. Batches are dicts, right-padded with 0 (the padding is hidden by `lengths`):
`tokens: LongTensor[B, L]` and `lengths: LongTensor[B]` (pairs: `[B, 2, L]` and `[B, 2]`), `labels: [B]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hier_lm.data.cache import MemmapCache
from hier_lm.data.images import TrainImages

FORMAT = 1  # bump when the layout changes: a cache of another format is not finished
Example = tuple[Sequence[np.ndarray], int]


class LRACache(MemmapCache):
    """A finished LRA cache folder: per split `<split>.tokens` (every sequence, concatenated; example `i`'s
    sequence `f` is sequence `i * fields + f`), `<split>.offsets` (`int64 [n * fields + 1]`, where each
    sequence starts) and `<split>.labels` (`int64 [n]`), and `meta.json` (task, dtype, fields, classes, the
    source, counts and sha256 per file)."""

    kind = "LRA cache"

    @classmethod
    def file_sizes(cls, meta: dict) -> dict[str, int]:
        if meta["format"] != FORMAT:
            raise ValueError(f"cache format {meta['format']}, not {FORMAT}")
        itemsize, fields = np.dtype(meta["dtype"]).itemsize, meta["fields"]
        sizes = {}
        for split, info in meta["splits"].items():
            sizes[f"{split}.tokens"] = info["tokens"] * itemsize
            sizes[f"{split}.offsets"] = (info["examples"] * fields + 1) * 8
            sizes[f"{split}.labels"] = info["examples"] * 8
        return sizes

    def examples(self, split: str) -> Examples:
        """The cached `split` as a lazily opened reader."""
        return Examples(self.path, split, self.meta["splits"][split]["examples"], self.meta["fields"],
                        self.meta["dtype"])

    def describe(self, name: str) -> str:
        """Where the cache is, the examples and tokens per split, their checksums."""
        meta = self.meta
        lines = [f"{name} cache: {self.path.resolve()}", f"  source: {meta['source']}",
                 f"  {meta['num_classes']} classes, vocab {meta['vocab_size']}, {meta['fields']} sequence(s) per "
                 f"example of at most {meta['seq_len']:,} tokens"]
        for split, info in meta["splits"].items():
            counts = np.bincount(self.examples(split).labels(), minlength=meta["num_classes"])
            lines.append(f"  {split:<5} {info['examples']:>9,} examples, {info['tokens']:>13,} tokens, labels "
                         f"{counts.tolist()}, sha256 {info['sha256']}")
        return "\n".join(lines)


def write_cache(folder: Path, splits: Mapping[str, Iterable[Example]], meta: dict, progress: bool) -> LRACache:
    """Write the examples of each split (`meta` holds `fields`, `dtype`, `seq_len`, `num_classes`, `vocab_size`
    and `source`) through `CacheWriter`, and open the cache. A sequence longer than `seq_len` is cut to it (as
    the benchmark does); an empty one or a label outside `[0, num_classes)` is an error naming the source."""
    fields, dtype, seq_len = meta["fields"], np.dtype(meta["dtype"]), meta["seq_len"]
    with LRACache.writer(folder, progress) as writer:
        split_meta = {}
        for split, examples in splits.items():
            lengths, labels = [], []

            def sequences(examples: Iterable[Example]) -> Iterator[np.ndarray]:
                for seqs, label in examples:
                    if len(seqs) != fields or not 0 <= label < meta["num_classes"]:
                        raise ValueError(f"{meta['source']}: a {split} example has {len(seqs)} sequences and label "
                                         f"{label}; expected {fields} and a label in [0, {meta['num_classes']})")
                    labels.append(label)
                    for seq in seqs:
                        if len(seq) == 0:
                            raise ValueError(f"{meta['source']}: {split} example {len(labels) - 1} has an empty "
                                             "sequence; every example needs at least one token")
                        seq = np.ascontiguousarray(seq[:seq_len], dtype=dtype)
                        lengths.append(len(seq))
                        yield seq

            written = writer.add(f"{split}.tokens", sequences(examples))
            if not labels:
                raise ValueError(f"{meta['source']} holds no {split} examples: pass the complete data set")
            writer.add(f"{split}.offsets", [np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)])
            writer.add(f"{split}.labels", [np.asarray(labels, dtype=np.int64)])
            split_meta[split] = {"examples": len(labels), "tokens": int(sum(lengths)), "sha256": written.sha256}
        writer.publish({**meta, "format": FORMAT, "splits": split_meta})
    return LRACache(folder)


def pad_batch(sequences: Sequence[np.ndarray], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `sequences` with 0 into `LongTensor[n, L]` (`L = length`, default the longest) and their
    lengths `LongTensor[n]`."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.zeros(len(sequences), int(lengths.max()) if length is None else length, dtype=torch.long)
    for row, seq in zip(tokens, sequences):
        row[:len(seq)] = torch.from_numpy(seq.astype(np.int64))
    return tokens, lengths


class Examples:
    """One split of an `LRACache`, read through memmaps opened lazily in the process that reads (a DataLoader
    worker included; the memmaps are never pickled)."""

    def __init__(self, folder: Path, split: str, count: int, fields: int, dtype: str):
        self.folder, self.split, self.count, self.fields, self.dtype = Path(folder), split, count, fields, dtype
        self._files: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": None}

    def __len__(self) -> int:
        return self.count

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._files is None:
            self._files = tuple(np.memmap(self.folder / f"{self.split}.{name}", dtype=dtype, mode="r")
                                for name, dtype in (("tokens", self.dtype), ("offsets", np.int64),
                                                    ("labels", np.int64)))
        return self._files

    def labels(self) -> np.ndarray:
        """`int64 [count]`: every label of the split."""
        return np.asarray(self._open()[2])

    def sequences(self, i: int) -> list[np.ndarray]:
        """The token sequences of example `i`."""
        tokens, offsets, _ = self._open()
        return [np.asarray(tokens[offsets[k]:offsets[k + 1]]) for k in range(i * self.fields, (i + 1) * self.fields)]

    def read(self, indices: np.ndarray, length: int | None = None) -> dict[str, torch.Tensor]:
        """The batch of examples `indices`, right-padded to `length` (default: the longest sequence)."""
        seqs = [s for i in np.asarray(indices, dtype=np.int64) for s in self.sequences(int(i))]
        tokens, lengths = pad_batch(seqs, length)
        if self.fields > 1:
            tokens, lengths = tokens.view(-1, self.fields, tokens.shape[-1]), lengths.view(-1, self.fields)
        labels = torch.from_numpy(self.labels()[np.asarray(indices, dtype=np.int64)])
        return {"tokens": tokens, "lengths": lengths, "labels": labels}


class TrainExamples(TrainImages):
    """Endless training batches of an `Examples` split: the epoch order, the dealing of batches to the
    data-parallel ranks and the worker interleaving of `TrainImages`, batches padded to their longest sequence."""

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        return self.source.read(self.indices(b))


class EvalExamples(Dataset):
    """Every example of an evaluation split once, in order: item `i` = the batch dict of one example padded
    to `seq_len` (so that the default collation stacks them; the task trims the common padding)."""

    num_targets = 1  # one label per example

    def __init__(self, source: Examples, seq_len: int):
        self.source, self.seq_len = source, seq_len

    def __len__(self) -> int:
        return len(self.source)

    def num_scored(self) -> int:
        return len(self)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        return {key: value[0] for key, value in self.source.read(np.array([i]), self.seq_len).items()}

