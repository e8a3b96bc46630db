"""Image modelling data: the shared `ImageDataModule` (batches of pixel tokens, a seeded permutation per
epoch, exact resume, disjoint equal DDP shards, in-order evaluation) and `SyntheticImagesDataModule`
(procedural, deterministic, learnable small images: offline tests and smoke runs)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from hier_lm.data.corpus import plain_split_sizes
from hier_lm.data.pixels import CHANNELS, IMAGE_VOCAB, encode_images

SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")


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


_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# The colours of the synthetic images: every channel value is a multiple of 17 (16 levels, 0..255).
_LEVELS = 16
_STEP = 255 // (_LEVELS - 1)


class SyntheticImages:
    """`count` procedural RGB images `size x size` of one split: a smooth two-colour gradient along a random
    direction plus one to three solid rectangles or discs in saturated colours. Image `i` is a function of
    `(seed, split, i)` only (`np.random.default_rng([seed, split_id, i])`), so it is never stored. Every
    channel value is a multiple of 17 (16 levels), and neighbouring pixels are mostly equal or one level
    apart: a small model gets far below 8 bits per sub-pixel quickly."""

    def __init__(self, size: int, count: int, seed: int, split: str):
        self.size, self.count, self.seed, self.split_id = int(size), int(count), int(seed), _SPLIT_IDS[split]
        grid = (np.arange(self.size) + 0.5) / self.size
        self._y, self._x = np.meshgrid(grid, grid, indexing="ij")  # [size, size] pixel centres in (0, 1)

    def __len__(self) -> int:
        return self.count

    def image(self, i: int) -> np.ndarray:
        """`uint8 [size, size, 3]`: image `i`."""
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * self._x + np.sin(angle) * self._y
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)  # 0 .. 1 across the image
        start, end = rng.integers(0, _LEVELS, 3), rng.integers(0, _LEVELS, 3)
        levels = np.rint(start + (end - start) * t[..., None])  # [size, size, 3]
        for _ in range(rng.integers(1, 4)):
            colour = rng.integers(0, 2, 3) * (_LEVELS - 1)  # one of the 8 saturated colours
            cy, cx = rng.uniform(0.1, 0.9, 2)
            ry, rx = rng.uniform(0.1, 0.35, 2)
            if rng.integers(0, 2):
                inside = (np.abs(self._y - cy) <= ry) & (np.abs(self._x - cx) <= rx)
            else:
                inside = (self._y - cy) ** 2 + (self._x - cx) ** 2 <= ry ** 2
            levels[inside] = colour
        return (levels * _STEP).astype(np.uint8)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """`uint8 [len(indices), size, size, 3]`: images `indices`."""
        return np.stack([self.image(i) for i in np.asarray(indices, dtype=np.int64)]) if len(indices) else \
            np.zeros((0, self.size, self.size, CHANNELS), dtype=np.uint8)


ImageSource = MemmapImages | SyntheticImages


def batches_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Training batches each rank gets per epoch: the epoch's permutation is cut into `num_images //
    batch_size` batches, dealt round-robin to the ranks, and the remainder that would give some rank one
    more batch than another is dropped (at most `batch_size * world_size - 1` images per epoch, a different
    random few each epoch)."""
    return num_images // batch_size // world_size


class TrainImages(IterableDataset):
    """Endless training batches `LongTensor[batch_size, 3 * size * size]` of pixel tokens.

    Epoch `e` visits the images in the order `np.random.default_rng([seed, e]).permutation(n)` (the same on
    every rank); its `k`-th batch is images `perm[k * batch_size : (k + 1) * batch_size]`, and rank `r` of
    `world_size` gets the batches `k = r, r + world_size, ...`, `batches_per_epoch` of them, so ranks read
    disjoint images and the same number of batches. This rank's batch `b` (b = start, start + 1, ...) is
    its batch `b % per_epoch` of epoch `b // per_epoch`. Worker `w` of `W` yields b = start + w,
    start + w + W, ..., so a DataLoader's round-robin over its workers gives the same sequence for any
    number of workers.
    """

    def __init__(self, source: ImageSource, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, hint: str = ""):
        self.per_epoch = batches_per_epoch(len(source), batch_size, world_size)
        if self.per_epoch < 1:
            raise ValueError(f"the train split has {len(source):,} images, fewer than data.batch_size * world size "
                             f"= {batch_size} * {world_size}: lower data.batch_size{hint}")
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
    """Every image of an evaluation split once, in order: item `i` = `LongTensor[3 * size * size]`."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        return encode_images(self.source.read(np.array([i])))[0]


class ImageDataModule(L.LightningDataModule):
    """Image modelling (vocab 256, metric bpd) on sources that a subclass opens in `_open()` (a dict
    `{"train", "valid", "test"} -> MemmapImages | SyntheticImages`, building caches if absent) and whose
    `__init__` saves at least the hyperparameters `size, batch_size, eval_batch_size, num_workers, seed`.

    Batches are `LongTensor[B, 3 * size * size]` of pixel tokens (`hier_lm.data.pixels`: raster order, R, G,
    B interleaved per pixel), with no start token (the image task prepends one). Training: endless batches,
    a seeded permutation per epoch, disjoint equal-count shards per DDP rank (`TrainImages`), resumable
    exactly (`state_dict`). Evaluation: every image of the split once, in order.
    """

    vocab_size = IMAGE_VOCAB
    metric = "bpd"
    _more_data_hint = ""

    @staticmethod
    def _check_sizes(**values: int | None) -> None:
        least = {"num_workers": 0, "seed": 0}
        for name, value in values.items():
            if value is not None and value < least.get(name, 1):
                raise ValueError(f"data.{name} must be at least {least.get(name, 1)}, got {value}")

    def __init__(self):
        super().__init__()
        self.sources: dict[str, ImageSource] | None = None
        self._resume: dict | None = None  # the loaded state, until a train loader starts from it
        self._origin: tuple[int, int] | None = None  # (first batch index, batches consumed then)

    @property
    def image_size(self) -> int:
        """H = W of the images."""
        return self.hparams.size

    def _open(self) -> dict[str, ImageSource]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Build the caches if absent (Lightning calls this on one process only)."""
        self._open()

    def setup(self, stage: str | None = None) -> None:
        self.sources = self._open()

    def _source(self, split: str) -> ImageSource:
        if self.sources is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before asking for data")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.sources[split]

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _consumed(self) -> int:
        """Training batches this rank has consumed, as the trainer counts them (0 without a trainer)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def _per_epoch(self) -> int:
        return batches_per_epoch(len(self._source("train")), self.hparams.batch_size, self._rank()[1])

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        # A private generator: creating the loader's iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint (dropout would diverge otherwise).
        return DataLoader(dataset, num_workers=self.hparams.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Endless `LongTensor[batch_size, 3 * size * size]` batches, from where the run stands (the loaded
        state after a resume)."""
        rank, world = self._rank()
        source = self._source("train")
        dataset = TrainImages(source, self.hparams.batch_size, self.hparams.seed, rank, world, 0,
                              self._more_data_hint)
        if self._resume is not None:
            # Continue in the saved epoch at the saved image position (rounded down to a whole step of all
            # ranks, which is exact unless data.batch_size or the world size changed).
            start = self._resume["epoch"] * dataset.per_epoch + \
                self._resume["position"] // (self.hparams.batch_size * world)
            self._resume = None
        else:
            start = self._consumed()
        dataset.start = start
        self._origin = (start, self._consumed())
        return self._loader(dataset, batch_size=None)

    def _eval_dataloader(self, split: str) -> DataLoader:
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; choose one of {EVAL_SPLITS}")
        return self._loader(EvalImages(self._source(split)),
                            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """Every image of the valid split once, in order: `LongTensor[B, 3 * size * size]`."""
        return self._eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        """Every image of the test split once, in order: `LongTensor[B, 3 * size * size]`."""
        return self._eval_dataloader("test")

    def num_images(self, split: str) -> int:
        return len(self._source(split))

    def num_eval_tokens(self, split: str) -> int:
        """Scored sub-pixels of the `"valid"` or `"test"` split: images * 3 * size * size."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; choose one of {EVAL_SPLITS}")
        return self.num_images(split) * CHANNELS * self.image_size ** 2

    def state_dict(self) -> dict:
        """`{"epoch", "position": images of the epoch's permutation consumed by all ranks, "seed"}`, saved in
        checkpoints (every rank computes the same values: ranks advance in lockstep)."""
        if self._resume is not None:  # loaded, no loader started yet
            return dict(self._resume)
        batch = self._origin[0] + self._consumed() - self._origin[1] if self._origin is not None else self._consumed()
        if self.sources is None:
            return {"epoch": 0, "position": 0, "seed": self.hparams.seed}
        epoch, k = divmod(batch, self._per_epoch())
        return {"epoch": epoch, "position": k * self.hparams.batch_size * self._rank()[1], "seed": self.hparams.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next `train_dataloader()` continues epoch `state["epoch"]` at `state["position"]`."""
        if state["seed"] != self.hparams.seed:
            raise ValueError(f"the checkpoint's data order was drawn with data.seed={state['seed']}, but this run "
                             f"has data.seed={self.hparams.seed}; resume with data.seed={state['seed']}")
        self._resume = {"epoch": int(state["epoch"]), "position": int(state["position"]), "seed": int(state["seed"])}


class SyntheticImagesDataModule(ImageDataModule):
    """Procedural RGB images (`SyntheticImages`: gradients plus solid shapes, 16 levels per channel), vocab
    256, metric bpd; nothing is downloaded or stored. `split_sizes` images per split (train, valid, test),
    drawn from `image_seed`; `seed` orders the training batches. Batches as in `ImageDataModule`:
    `LongTensor[B, 3 * size * size]`."""

    def __init__(self, size: int = 8, split_sizes: Sequence[int] = (8192, 512, 512), image_seed: int = 0,
                 batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self._check_sizes(size=size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                          num_workers=num_workers, seed=seed)
        if image_seed < 0:
            raise ValueError(f"data.image_seed must be at least 0, got {image_seed}")
        split_sizes = plain_split_sizes(split_sizes, "image", (8192, 512, 512))  # a plain list: checkpoints load with weights_only=True
        self.save_hyperparameters()

    def _open(self) -> dict[str, ImageSource]:
        h = self.hparams
        return {name: SyntheticImages(h.size, count, h.image_seed, name) for name, count in zip(SPLITS,
                                                                                                 h.split_sizes)}

