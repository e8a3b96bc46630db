"""The base of every DataModule: the loaders, the data-parallel rank, the training position (resumable
exactly, saved in checkpoints with the seed that drew it) and evaluation sharded exactly over the ranks."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hier_lm.data.settings import EVAL_SPLITS


class EvalShard(Dataset):
    """One data-parallel rank's share of an evaluation dataset, for a distributed evaluation that scores every
    target exactly once: items `rank, rank + world_size, ...` of `items`, padded to `ceil(len / world_size)`
    items (the same number on every rank, so that every rank runs as many forward passes: FSDP's collectives
    need it) by item 0 scoring nothing.

    Items are `(tokens, n_context)` pairs, the first `n_context` targets of `tokens` being context only: an
    item of `items` keeps its pair (a plain tensor, all scored, gets `n_context = 0`), a padding item has
    `n_context = items.num_targets` (every target is context).
    """

    def __init__(self, items: Dataset, rank: int, world_size: int):
        self.items, self.rank, self.world_size = items, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.world_size)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        if not 0 <= j < len(self):
            raise IndexError(f"item {j} out of range [0, {len(self)})")
        i = self.rank + j * self.world_size
        item = self.items[i if i < len(self.items) else 0]
        tokens, n_context = item if isinstance(item, tuple) else (item, 0)
        return tokens, (n_context if i < len(self.items) else self.items.num_targets)


class ResumableDataModule(L.LightningDataModule):
    """The shared part of the DataModules. A subclass saves at least the hyperparameters `batch_size,
    eval_batch_size, num_workers, seed` and provides:

    - `prepare_cache()`: build the dataset's cache if absent (reusing an existing one) and return it (None
      when nothing is cached); `_open()`: the data that `setup()` keeps (default: the cache);
    - `_train_dataset(rank, world_size, start)`: the endless training batches of a rank from its batch
      `start` on, a function of `(seed, rank, world_size, batch index)` only;
    - `_eval_dataset(split)`: the items of an evaluation split, with `num_targets` (targets per item) and
      `num_scored()` (targets scored over all items);
    - the training position as saved: `_position(batch)` (a dict of `_position_keys`) and `_batch_at`, its
      inverse; by default the batch index itself, `{"train_batches": batch}`.

    Loaders use a private `torch.Generator` (the global RNG, restored on resume, is never drawn from),
    `num_workers` workers and pinned memory on CUDA. With several data-parallel ranks each rank reads its
    `EvalShard` of an evaluation split, and the ranks together score every target once.
    """

    _position_keys: tuple[str, ...] = ("train_batches",)

    def __init__(self):
        super().__init__()
        self._data = None
        self._resume: dict | None = None  # a loaded position, until a training loader starts from it
        self._start, self._offset = 0, 0  # the last loader's first batch; its index minus the trainer's count

    # ---------------------------------------------------------------------------------------------- data

    def prepare_cache(self):
        raise NotImplementedError

    def _open(self):
        return self.prepare_cache()

    def prepare_data(self) -> None:
        """Build the cache if absent (Lightning calls this on one process only)."""
        self.prepare_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the data (building the cache first if this process finds none)."""
        self._data = self._open()

    def _opened(self):
        if self._data is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before asking for data")
        return self._data

    def describe(self) -> str:
        """Where the dataset is cached, its split sizes and checksums: what `python -m hier_lm.data prepare`
        prints (after `prepare_data()`)."""
        cache = self.prepare_cache()
        return f"{self.name}: nothing is cached (generated on the fly)" if cache is None else cache.describe(self.name)

    # ---------------------------------------------------------------------------------------------- loaders

    def _data_parallel(self) -> tuple[int, int]:
        """(rank, number of ranks) of this process among the data-parallel replicas; (0, 1) without a trainer."""
        if self.trainer is None:
            return 0, 1
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None)  # None for a single device
        if kwargs:
            return kwargs["rank"], kwargs["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        # A private generator: creating the loader's iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint (dropout would diverge otherwise). A dataset
        # that is one sequence of batches caps the workers with `max_workers`.
        workers = min(self.hparams.num_workers, getattr(dataset, "max_workers", self.hparams.num_workers))
        return DataLoader(dataset, num_workers=workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator(), **kwargs)

    # ---------------------------------------------------------------------------------------------- training

    def _train_dataset(self, rank: int, world_size: int, start: int) -> Dataset:
        raise NotImplementedError

    def _trainer_batches(self) -> int | None:
        """Training batches this rank's trainer has consumed (optimizer steps x accumulation); None without one."""
        if self.trainer is None:
            return None
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def _position(self, batch: int) -> dict[str, int]:
        return {"train_batches": batch}

    def _batch_at(self, position: dict[str, int]) -> int:
        # A batch index counts micro-batches (optimizer steps x accumulation) and means the same data on any
        # number of ranks, so the trainer's count is the position whenever there is a trainer.
        consumed = self._trainer_batches()
        return position["train_batches"] if consumed is None else consumed

    def _next_batch(self) -> int:
        """Index of this rank's next training batch."""
        if self._resume is not None:
            return self._batch_at(self._resume)
        consumed = self._trainer_batches()
        return self._start if consumed is None else consumed + self._offset

    def train_dataloader(self) -> DataLoader:
        """This rank's endless training batches, from where the run stands (the loaded state after a resume)."""
        rank, world_size = self._data_parallel()
        start, consumed = self._next_batch(), self._trainer_batches()
        self._resume, self._start, self._offset = None, start, 0 if consumed is None else start - consumed
        return self._loader(self._train_dataset(rank, world_size, start), batch_size=None)

    # ---------------------------------------------------------------------------------------------- evaluation

    def _eval_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    @staticmethod
    def _check_eval_split(split: str) -> None:
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; choose one of {EVAL_SPLITS}")

    def _eval_dataloader(self, split: str) -> DataLoader:
        items, batch_size = self._eval_dataset(split), self.hparams.eval_batch_size or self.hparams.batch_size
        rank, world_size = self._data_parallel()
        if world_size == 1:
            return self._loader(items, batch_size=batch_size, shuffle=False)
        # Several ranks: each reads its `EvalShard` in order. The sampler is a one-replica DistributedSampler
        # (sequential) because Lightning keeps a DistributedSampler it finds; its own would shard again and pad
        # with repeated items, which would then be scored twice.
        shard = EvalShard(items, rank, world_size)
        return self._loader(shard, batch_size=batch_size,
                            sampler=DistributedSampler(shard, num_replicas=1, rank=0, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        """The valid split's evaluation batches, in order (see the class docstring of the dataset)."""
        return self._eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        """The test split's evaluation batches, in order (see the class docstring of the dataset)."""
        return self._eval_dataloader("test")

    def num_eval_tokens(self, split: str) -> int:
        """Number of scored targets of the `"valid"` or `"test"` split."""
        return self._eval_dataset(split).num_scored()

    # ---------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The training position (`_position`) and `seed`, saved in checkpoints."""
        position = dict(self._resume) if self._resume is not None else self._position(self._next_batch())
        return {**position, "seed": self.hparams.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next `train_dataloader()` continues at the saved position."""
        if state["seed"] != self.hparams.seed:
            raise ValueError(f"the checkpoint's data order was drawn with data.seed={state['seed']}, but this run "
                             f"has data.seed={self.hparams.seed}; resume with data.seed={state['seed']}")
        self._resume = {key: int(state[key]) for key in self._position_keys}
