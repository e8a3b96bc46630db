"""Windows of a token cache (bytes or subwords): random training windows, drawn the same way on any number of
ranks, workers and accumulated micro-batches, and contiguous evaluation windows that score every target of a
split once, optionally after unscored context."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class _SplitReader:
    """Reads one split of a token cache (`meta["splits"][split] = [start, end)`, `split(name)` a 1-D memmap)
    through a memmap opened lazily in the process that reads (a DataLoader worker included); the memmap is
    never pickled. `unit` names what the split holds (bytes, tokens), `setting` the key that sets `seq_len` and
    `hint` what else helps, in errors."""

    def __init__(self, corpus, split: str, seq_len: int, unit: str = "tokens", hint: str = "",
                 setting: str = "data.seq_len"):
        start, end = corpus.meta["splits"][split]
        if end - start < seq_len + 1:
            raise ValueError(f"the {split} split has {end - start:,} {unit}, fewer than {setting} + 1 = "
                             f"{seq_len + 1:,}: lower {setting}{hint}")
        self.corpus, self.split, self.seq_len, self.length = corpus, split, seq_len, end - start
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        """`LongTensor[len(starts), seq_len + 1]`: the split's tokens `[s, s + seq_len + 1)` for each start."""
        if self._data is None:
            self._data = self.corpus.split(self.split)
        index = starts[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.array(self._data[index], dtype=np.int64))


class TrainWindows(_SplitReader, IterableDataset):
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

    def __init__(self, corpus, seq_len: int, batch_size: int, seed: int, rank: int, start: int,
                 world_size: int = 1, accumulate: int = 1, unit: str = "tokens", hint: str = ""):
        super().__init__(corpus, "train", seq_len, unit, hint)
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


class EvalWindows(_SplitReader, Dataset):
    """Contiguous windows `LongTensor[seq_len + 1]` of an evaluation split that score its tokens in order.

    `context == 0`: non-overlapping windows, item `i` = tokens `[i * seq_len, i * seq_len + seq_len + 1)`;
    every token after the first is a target exactly once, except the last partial window, which is dropped.

    `context > 0`: item `i` is `(window, n_context)`: the window's first `n_context` targets are context
    only (fed to the model, not scored) and the remaining `seq_len - n_context` are scored. Window 0 is
    tokens `[0, seq_len + 1)` with `n_context = 0`; every later window scores the next `seq_len - context`
    targets after `context` unscored ones, and the last window is aligned to the split's end (more context,
    fewer scored). So every token after the first is scored exactly once (`length - 1` in all), each with
    at least `context` earlier tokens of the window before it, except in window 0.

    `seq_len` is the window length C, by default the training `data.seq_len` but any length the model reads
    (`TokenWindowDataModule.set_eval_windows`): C = S = seq_len is the plain evaluation, C > S the paper's
    sliding windows (chunks of S scored tokens after C - S of context; `context = C - S`).
    """

    def __init__(self, corpus, split: str, seq_len: int, context: int = 0, unit: str = "tokens", hint: str = "",
                 setting: str = "data.seq_len"):
        super().__init__(corpus, split, seq_len, unit, hint, setting)
        if not 0 <= context < seq_len:
            raise ValueError(f"data.eval_context must be in [0, data.seq_len) = [0, {seq_len}), got {context}")
        self.context = context

    @property
    def num_targets(self) -> int:
        """Targets per window (`seq_len`), scored or context."""
        return self.seq_len

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
