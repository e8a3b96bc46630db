"""Image modelling data, shared by the image datasets: `ImageDataModule` (batches of pixel tokens, a seeded
permutation per epoch, exact resume, disjoint equal DDP shards, in-order evaluation sharded exactly over
the ranks), its training and evaluation datasets, and `MemmapImages`, images read from a raw uint8 file."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from hier_lm.data.base import ResumableDataModule
from hier_lm.data.pixels import CHANNELS, IMAGE_VOCAB, encode_images
from hier_lm.data.settings import SPLITS


class MemmapImages:
    """Images `uint8 [count, size, size, 3]` stored raw in `file`, read through a memmap opened lazily in the
    process that reads (a DataLoader worker included; the memmap is never pickled). `rows`, if given, is
    the subset of the file's images this source holds, in that order (image `i` is file row `rows[i]`)."""

    def __init__(self, file: str | Path, count: int, size: int, rows: np.ndarray | None = None):
        self.file, self.count, self.size = Path(file), int(count), int(size)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self.count if self.rows is None else len(self.rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """`uint8 [len(indices), size, size, 3]`: images `indices` of this source."""
        if self._data is None:
            self._data = np.memmap(self.file, dtype=np.uint8, mode="r", shape=(self.count, self.size, self.size,
                                                                             CHANNELS))
        indices = np.asarray(indices, dtype=np.int64)
        return np.asarray(self._data[indices if self.rows is None else self.rows[indices]])


def batches_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Training batches each rank gets per epoch: the epoch's permutation is cut into `num_images //
    batch_size` batches, dealt round-robin to the ranks, and the remainder that would give some rank one
    more batch than another is dropped (at most `batch_size * world_size - 1` images per epoch, a different
    random few each epoch)."""
    return num_images // batch_size // world_size


class TrainImages(IterableDataset):
    """Endless training batches `LongTensor[batch_size, 3 * size * size]` of pixel tokens from `source` (any
    object with `len()` and `read(indices) -> uint8 [n, size, size, 3]`).

    Epoch `e` visits the images in the order `np.random.default_rng([seed, e]).permutation(n)` (the same on
    every rank); its `k`-th batch is images `perm[k * batch_size : (k + 1) * batch_size]`, and rank `r` of
    `world_size` gets the batches `k = r, r + world_size, ...`, `batches_per_epoch` of them, so ranks read
    disjoint images and the same number of batches. This rank's batch `b` (b = start, start + 1, ...) is
    its batch `b % per_epoch` of epoch `b // per_epoch`. Worker `w` of `W` yields b = start + w,
    start + w + W, ..., so a DataLoader's round-robin over its workers gives the same sequence for any
    number of workers.
    """

    def __init__(self, source, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.per_epoch = batches_per_epoch(len(source), batch_size, world_size)
        if self.per_epoch < 1:
            raise ValueError(f"the train split has {len(source):,} images, fewer than data.batch_size * world size "
                             f"= {batch_size} * {world_size}: lower data.batch_size")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._perm: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perm": None}

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the train images in `epoch` (all ranks)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
        return self._perm[1]

    def indices(self, b: int) -> np.ndarray:
        """Image indices of this rank's batch `b`."""
        epoch, k = divmod(b, self.per_epoch)
        first = (k * self.world_size + self.rank) * self.batch_size
        return self.permutation(epoch)[first:first + self.batch_size]

    def batch(self, b: int) -> torch.Tensor:
        return encode_images(self.source.read(self.indices(b)))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return map(self.batch, itertools.count(self.start + worker, workers))


class EvalImages(Dataset):
    """Every image of an evaluation split once, in order: item `i` = `LongTensor[3 * size * size]`, every
    sub-pixel a target."""

    def __init__(self, source):
        self.source = source
        self.num_targets = CHANNELS * source.size ** 2  # targets per image

    def __len__(self) -> int:
        return len(self.source)

    def num_scored(self) -> int:
        """Targets scored over all images."""
        return len(self) * self.num_targets

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        return encode_images(self.source.read(np.array([i])))[0]


class ImageDataModule(ResumableDataModule):
    """Image modelling (vocab 256, metric bpd) on sources that a subclass opens in `_open()` (a dict
    `{"train", "valid", "test"} -> MemmapImages | SyntheticImages`, building caches if absent) and whose
    `__init__` saves at least the hyperparameters `size, batch_size, eval_batch_size, num_workers, seed`.

    Batches are `LongTensor[B, 3 * size * size]` of pixel tokens (`hier_lm.data.pixels`: raster order, R, G,
    B interleaved per pixel), with no start token (the image task prepends one). Training: endless batches,
    a seeded permutation per epoch, disjoint equal-count shards per DDP rank (`TrainImages`), resumable
    exactly (`state_dict`: the epoch and the images of it consumed by all ranks). Evaluation: every image of
    the split once, in order; with several data-parallel ranks, pairs `[LongTensor[B, 3 * size * size],
    LongTensor[B]]` of each rank's `EvalShard` (n_context 0: an image of the rank's share; 3 * size * size:
    padding that scores nothing), so that the ranks together score every image once.
    """

    vocab_size = IMAGE_VOCAB
    metric = "bpd"
    _position_keys = ("epoch", "position")

    @property
    def image_size(self) -> int:
        """H = W of the images."""
        return self.hparams.size

    @property
    def sources(self) -> dict | None:
        """The opened sources of the splits (after `setup()`), else None."""
        return self._data

    def _source(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self._opened()[split]

    def _train_dataset(self, rank: int, world_size: int, start: int) -> TrainImages:
        return TrainImages(self._source("train"), self.hparams.batch_size, self.hparams.seed, rank, world_size, start)

    def _per_epoch(self) -> int:
        return batches_per_epoch(len(self._source("train")), self.hparams.batch_size, self._data_parallel()[1])

    def _position(self, batch: int) -> dict[str, int]:
        """`{"epoch", "position": images of the epoch's permutation consumed by all ranks}` (the same on every
        rank: ranks advance in lockstep)."""
        if self.sources is None:
            return {"epoch": 0, "position": 0}
        epoch, k = divmod(batch, self._per_epoch())
        return {"epoch": epoch, "position": k * self.hparams.batch_size * self._data_parallel()[1]}

    def _batch_at(self, position: dict[str, int]) -> int:
        # The saved epoch at the saved image position (rounded down to a whole step of all ranks, which is
        # exact unless data.batch_size or the world size changed).
        per_step = self.hparams.batch_size * self._data_parallel()[1]
        return position["epoch"] * self._per_epoch() + position["position"] // per_step

    def _eval_dataset(self, split: str) -> EvalImages:
        self._check_eval_split(split)
        return EvalImages(self._source(split))

    def num_images(self, split: str) -> int:
        return len(self._source(split))
