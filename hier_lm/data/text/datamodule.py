"""Language modelling on a token cache: `TokenWindowDataModule`, shared by bytes and subwords, and
`ByteLMDataModule`, its byte-level form (vocab 256, metric bpc)."""

from __future__ import annotations

from hier_lm.data.base import ResumableDataModule
from hier_lm.data.text.windows import EvalWindows, TrainWindows


class TokenWindowDataModule(ResumableDataModule):
    """Language modelling on a cache of 1-D token splits (`meta["splits"]`, `split(name)`: `ByteCorpus`, the
    LM1B `TokenCorpus`) that `prepare_cache()` makes or reuses; `__init__` saves at least the hyperparameters
    `seq_len, batch_size, eval_batch_size, num_workers, seed` (and optionally `eval_context`).

    Training batches are `LongTensor[batch_size, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`):
    endless random windows (`TrainWindows`), resumable by batch index (`state_dict`). Evaluation batches are
    contiguous windows (`EvalWindows`): `LongTensor[B, seq_len + 1]` with `eval_context = 0`, else the pair
    `[LongTensor[B, seq_len + 1], LongTensor[B]]` = (windows, n_context): the targets `[:, 1 + n_context:]`
    of each row are scored, the first `n_context` targets are context only. With several data-parallel ranks,
    each rank's evaluation batches are pairs from its `EvalShard`, and the ranks together score every target
    once (the task's weighted mean syncs across ranks).
    """

    unit = "tokens"  # what the splits hold, in errors
    _more_data_hint = ""  # appended to "lower data.seq_len" when a split is too short

    @property
    def corpus(self):
        """The opened token cache (after `setup()`), else None."""
        return self._data

    def _train_dataset(self, rank: int, world_size: int, start: int) -> TrainWindows:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        h = self.hparams
        return TrainWindows(self._opened(), h.seq_len, h.batch_size, h.seed, rank, start, world_size, accumulate,
                            self.unit, self._more_data_hint)

    def _eval_windows(self, split: str) -> EvalWindows:
        self._check_eval_split(split)
        return EvalWindows(self._opened(), split, self.hparams.seq_len, self.hparams.get("eval_context", 0),
                           self.unit, self._more_data_hint)

    def _eval_dataset(self, split: str) -> EvalWindows:
        return self._eval_windows(split)


class ByteLMDataModule(TokenWindowDataModule):
    """Byte-level language modelling (vocab 256, metric bpc) on a `ByteCorpus`: batches as in
    `TokenWindowDataModule`, of bytes."""

    vocab_size = 256
    metric = "bpc"
    unit = "bytes"
