"""Byte-level LM data served from a `ByteCorpus`: the shared `ByteLMDataModule` (random training windows,
resumable; contiguous evaluation windows, optionally with unscored context) and `TextFilesDataModule` (any
files, by default the Python standard library)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from hier_lm.data.corpus import DEFAULT_SPLITS, ByteCorpus, check_splits, resolve_paths

EVAL_SPLITS = ("valid", "test")


class _SplitReader:
    """Reads one split of a `ByteCorpus` through a memmap opened lazily in the process that reads (a
    DataLoader worker included); the memmap is never pickled."""

    def __init__(self, corpus: ByteCorpus, split: str, seq_len: int, hint: str = ""):
        start, end = corpus.meta["splits"][split]
        if end - start < seq_len + 1:
            raise ValueError(f"the {split} split has {end - start:,} bytes, fewer than data.seq_len + 1 = "
                             f"{seq_len + 1:,}: lower data.seq_len{hint}")
        self.corpus, self.split, self.seq_len, self.length = corpus, split, seq_len, end - start
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        """`LongTensor[len(starts), seq_len + 1]`: the split's bytes `[s, s + seq_len + 1)` for each start."""
        if self._data is None:
            self._data = self.corpus.split(self.split)
        index = starts[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.array(self._data[index], dtype=np.int64))


class TrainBatches(_SplitReader, IterableDataset):
    """Endless batches `LongTensor[batch_size, seq_len + 1]` of random windows of the train split.

    Optimizer step `s` trains on one global batch of `batch_size * world_size * accumulate` windows whose
    starts are drawn from `np.random.default_rng([seed, s])`. This dataset's batch `b` (b = start, start + 1,
    ...; `b = s * accumulate + a` for micro-batch `a` of step `s`) is rank `rank`'s share of it: rows
    `[(a * world_size + rank) * batch_size, ... + batch_size)`. So a step trains on the same windows however
    they are split over ranks and micro-batches: 2 ranks x batch 2, 2 accumulated x batch 2 and 1 x batch 4
    see the same 4 windows (with mean losses and averaged gradients: the same training), and a run resumed
    on another number of devices continues the same sequence. Worker `w` of `W` yields b = start + w,
    start + w + W, ..., so a DataLoader's round-robin over its workers gives the same sequence for any number
    of workers.
    """

    def __init__(self, corpus: ByteCorpus, seq_len: int, batch_size: int, seed: int, rank: int, start: int,
                 hint: str = "", world_size: int = 1, accumulate: int = 1):
        super().__init__(corpus, "train", seq_len, hint)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        self.batch_size, self.seed, self.rank, self.start = batch_size, seed, rank, start
        self.world_size, self.accumulate = world_size, accumulate

    def batch(self, b: int) -> torch.Tensor:
        step, micro = divmod(b, self.accumulate)
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.length - self.seq_len, size=self.batch_size * self.world_size * self.accumulate)
        first = (micro * self.world_size + self.rank) * self.batch_size
        return self._windows(starts[first: first + self.batch_size])

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return map(self.batch, itertools.count(self.start + worker, workers))


class EvalShard(Dataset):
    """One data-parallel rank's share of evaluation windows, for a distributed evaluation that scores every
    target exactly once: items `rank, rank + world_size, ...` of `windows`, padded to `ceil(len / world_size)`
    items (the same number on every rank, so that every rank runs as many forward passes: FSDP's collectives
    need it) by window 0 scoring nothing. Items are `(window, n_context)` pairs (see `EvalWindows`): a real
    window keeps its `n_context` (0 without evaluation context), a padding item has `n_context = seq_len`.
    """

    def __init__(self, windows: EvalWindows, rank: int, world_size: int):
        self.windows, self.rank, self.world_size = windows, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.windows) // self.world_size)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        if not 0 <= j < len(self):
            raise IndexError(f"item {j} out of range [0, {len(self)})")
        i = self.rank + j * self.world_size
        if i >= len(self.windows):
            item = self.windows[0]
            return (item[0] if isinstance(item, tuple) else item), self.windows.seq_len
        item = self.windows[i]
        return item if isinstance(item, tuple) else (item, 0)


class EvalWindows(_SplitReader, Dataset):
    """Contiguous windows `LongTensor[seq_len + 1]` of an evaluation split that score its bytes in order.

    `context == 0`: non-overlapping windows, item `i` = bytes `[i * seq_len, i * seq_len + seq_len + 1)`;
    every byte after the first is a target exactly once, except the last partial window, which is dropped.

    `context > 0`: item `i` is `(window, n_context)`: the window's first `n_context` targets are context
    only (fed to the model, not scored) and the remaining `seq_len - n_context` are scored. Window 0 is
    bytes `[0, seq_len + 1)` with `n_context = 0`; every later window scores the next `seq_len - context`
    targets after `context` unscored ones, and the last window is aligned to the split's end (more context,
    fewer scored). So every byte after the first is scored exactly once (`length - 1` in all), each with
    at least `context` earlier bytes of the window before it, except in window 0.
    """

    def __init__(self, corpus: ByteCorpus, split: str, seq_len: int, context: int = 0, hint: str = ""):
        super().__init__(corpus, split, seq_len, hint)
        if not 0 <= context < seq_len:
            raise ValueError(f"data.eval_context must be in [0, data.seq_len) = [0, {seq_len}), got {context}")
        self.context = context

    def __len__(self) -> int:
        if self.context == 0:
            return (self.length - 1) // self.seq_len
        stride = self.seq_len - self.context
        return 1 + -(-(self.length - 1 - self.seq_len) // stride)

    def num_scored(self) -> int:
        """Targets scored over all windows."""
        return len(self) * self.seq_len if self.context == 0 else self.length - 1

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        if self.context == 0:
            return self._windows(np.array([i * self.seq_len]))[0]
        if i == 0:
            return self._windows(np.array([0]))[0], 0
        # Window i scores targets (split positions) [first, last]; its start puts `last` at its end.
        first = self.seq_len + 1 + (i - 1) * (self.seq_len - self.context)
        last = min(first + self.seq_len - self.context, self.length) - 1
        start = last - self.seq_len
        return self._windows(np.array([start]))[0], first - 1 - start


class ByteLMDataModule(L.LightningDataModule):
    """Byte-level language modelling (vocab 256, metric bpc) on a `ByteCorpus` that a subclass makes in
    `_build()` (which must reuse an existing cache) and whose `__init__` saves at least the hyperparameters
    `seq_len, batch_size, eval_batch_size, num_workers, seed` (and optionally `eval_context`).

    Training batches are `LongTensor[batch_size, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`):
    endless random windows, resumable by batch index (`state_dict`). Evaluation batches are contiguous
    windows (`EvalWindows`): `LongTensor[B, seq_len + 1]` with `eval_context = 0`, else the pair
    `[LongTensor[B, seq_len + 1], LongTensor[B]]` = (windows, n_context): the targets `[:, 1 + n_context:]`
    of each row are scored, the first `n_context` targets are context only. With several data-parallel ranks,
    each rank's evaluation batches are pairs from its `EvalShard`, and the ranks together score every target
    once (the task's weighted mean syncs across ranks).
    """

    vocab_size = 256
    metric = "bpc"
    _more_data_hint = ""  # appended to "lower data.seq_len" when a split is too short

    @staticmethod
    def _check_sizes(**values: int) -> None:
        least = {"num_workers": 0, "seed": 0, "eval_context": 0}
        for name, value in values.items():
            if value is not None and value < least.get(name, 1):
                raise ValueError(f"data.{name} must be at least {least.get(name, 1)}, got {value}")
        if values.get("eval_context", 0) >= values["seq_len"]:
            raise ValueError(f"data.eval_context must be smaller than data.seq_len = {values['seq_len']} (the window "
                             f"scores its last seq_len - eval_context bytes), got {values['eval_context']}")

    def __init__(self):
        super().__init__()
        self.corpus: ByteCorpus | None = None
        self._train_batches = 0

    def _build(self) -> ByteCorpus:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Build the byte cache if absent (Lightning calls this on one process only)."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Open the byte cache as `self.corpus` (building it first if this process finds none)."""
        self.corpus = self._build()

    def _opened(self) -> ByteCorpus:
        if self.corpus is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before asking for data")
        return self.corpus

    def _batches_consumed(self) -> int:
        if self.trainer is not None:
            return self.trainer.global_step * self.trainer.accumulate_grad_batches
        return self._train_batches

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        # A private generator: creating the loader's iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint (dropout would diverge otherwise).
        return DataLoader(dataset, num_workers=self.hparams.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator(), **kwargs)

    def _data_parallel(self) -> tuple[int, int]:
        """(rank, number of ranks) of this process among the data-parallel replicas; (0, 1) without a trainer."""
        if self.trainer is None:
            return 0, 1
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None)  # None for a single device
        if kwargs:
            return kwargs["rank"], kwargs["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        """Endless `LongTensor[batch_size, seq_len + 1]` batches, starting at the batch index consumed so far:
        this rank's rows of each step's global batch (see `TrainBatches`)."""
        rank, world = self._data_parallel()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        dataset = TrainBatches(self._opened(), self.hparams.seq_len, self.hparams.batch_size, self.hparams.seed,
                               rank, self._batches_consumed(), self._more_data_hint, world, accumulate)
        return self._loader(dataset, batch_size=None)

    def _eval_windows(self, split: str) -> EvalWindows:
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; choose one of {EVAL_SPLITS}")
        return EvalWindows(self._opened(), split, self.hparams.seq_len, self.hparams.get("eval_context", 0),
                           self._more_data_hint)

    def _eval_dataloader(self, split: str) -> DataLoader:
        windows, batch_size = self._eval_windows(split), self.hparams.eval_batch_size or self.hparams.batch_size
        rank, world = self._data_parallel()
        if world == 1:
            return self._loader(windows, batch_size=batch_size, shuffle=False)
        # Several ranks: each reads its `EvalShard` in order. The sampler is a one-replica DistributedSampler
        # (sequential) because Lightning keeps a DistributedSampler it finds; its own would shard again and pad
        # with repeated windows, which would then be scored twice.
        shard = EvalShard(windows, rank, world)
        return self._loader(shard, batch_size=batch_size,
                            sampler=DistributedSampler(shard, num_replicas=1, rank=0, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        """Contiguous windows of the valid split (see the class docstring for the batch format)."""
        return self._eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        """Contiguous windows of the test split (see the class docstring for the batch format)."""
        return self._eval_dataloader("test")

    def num_eval_tokens(self, split: str) -> int:
        """Number of scored bytes in the `"valid"` or `"test"` evaluation windows."""
        return self._eval_windows(split).num_scored()

    def state_dict(self) -> dict:
        """`{"train_batches": batches consumed so far, "seed": seed}`, saved in checkpoints."""
        return {"train_batches": self._batches_consumed(), "seed": self.hparams.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next `train_dataloader()` starts at batch `state["train_batches"]`."""
        if state["seed"] != self.hparams.seed:
            raise ValueError(f"the checkpoint's data was drawn with data.seed={state['seed']}, but this run has "
                             f"data.seed={self.hparams.seed}; resume with data.seed={state['seed']}")
        self._train_batches = int(state["train_batches"])


class TextFilesDataModule(ByteLMDataModule):
    """Byte-level language modelling (vocab 256, metric bpc) on any files, by default the running
    interpreter's standard library; the bytes are cached once as a uint8 memmap (see `ByteCorpus`).

    Batches as in `ByteLMDataModule`: `LongTensor[B, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`),
    endless random windows for training, resumable by batch index (`state_dict`), and contiguous windows
    for valid/test.
    """

    _more_data_hint = " or add files to data.paths"

    def __init__(self, paths: Sequence[str] = ("stdlib",), root: str | Path | None = None, seq_len: int = 256,
                 batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 splits: Sequence[float] = DEFAULT_SPLITS, eval_context: int = 0):
        super().__init__()
        self._check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size,
                          num_workers=num_workers, seed=seed, eval_context=eval_context)
        # Plain Python values (not Hydra's ListConfig, not Path) so that checkpoints load with weights_only=True.
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        root = None if root is None else os.fspath(root)
        splits = check_splits(splits)
        self.save_hyperparameters()

    def _build(self) -> ByteCorpus:
        return ByteCorpus.build(resolve_paths(self.hparams.paths), self.hparams.root, self.hparams.splits)
