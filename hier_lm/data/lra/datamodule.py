"""`LRADataModule`, the base of the Long Range Arena DataModules: a task's cache built once from its source
(`build_cache`), batches of right-padded examples with `lengths`, exact resume and data-parallel shards."""

from __future__ import annotations

from pathlib import Path

from hier_lm.data.cache import default_data_root
from hier_lm.data.images import ImageDataModule
from hier_lm.data.lra.examples import EvalExamples, LRACache, TrainExamples
from hier_lm.data.settings import SPLITS


class LRADataModule(ImageDataModule):
    """A Long Range Arena classification task (metric `accuracy`). Training order, data-parallel shards and
    the saved position are `ImageDataModule`'s, with examples in place of images: a seeded permutation of the
    train split per epoch, batch `k` of it to rank `k % world_size`, resumed exactly at the saved epoch and
    position. Evaluation: every example of the split once, in order (several ranks: each its `EvalShard`).

    Batches (`hier_lm.data.lra.examples`): `{"tokens": LongTensor[B, L], "lengths": LongTensor[B], "labels":
    LongTensor[B]}`, right-padded with 0, `L <= seq_len`; the pair task (`fields = 2`) has `tokens [B, 2, L]`
    and `lengths [B, 2]`.

    A subclass sets `name`, `vocab_size`, `num_classes`, `fields` and `dtype`, saves its hyperparameters (at
    least `root, seq_len, batch_size, eval_batch_size, num_workers, seed`) and implements `cache_folder()` and
    `build_cache(folder)` (read its source, call `write_cache`).
    """

    metric = "accuracy"
    num_classes: int
    fields = 1  # token sequences per example: 2 for the pair task
    dtype = "uint8"  # of the cached tokens

    @property
    def root(self) -> Path:
        return Path(self.hparams.root).expanduser() if self.hparams.root else default_data_root()

    def cache_folder(self) -> Path:
        raise NotImplementedError

    def build_cache(self, folder: Path) -> LRACache:
        raise NotImplementedError

    def base_meta(self, source: str) -> dict:
        """The meta keys every LRA cache has."""
        return {"task": self.name, "source": source, "fields": self.fields, "dtype": self.dtype,
                "seq_len": self.hparams.seq_len, "num_classes": self.num_classes, "vocab_size": self.vocab_size}

    def prepare_cache(self) -> LRACache:
        """The finished cache of this task and `seq_len`, built from the source if absent."""
        folder = self.cache_folder()
        return LRACache.open_finished(folder) or self.build_cache(folder)

    def _open(self) -> dict:
        cache = self.prepare_cache()
        return {split: cache.examples(split) for split in SPLITS}

    def _train_dataset(self, rank: int, world_size: int, start: int) -> TrainExamples:
        return TrainExamples(self._source("train"), self.hparams.batch_size, self.hparams.seed, rank, world_size,
                             start)

    def _eval_dataset(self, split: str) -> EvalExamples:
        self._check_eval_split(split)
        return EvalExamples(self._source(split), self.hparams.seq_len)
