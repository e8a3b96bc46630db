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
    once (the task's weighted mean syncs across ranks). `set_eval_windows(length, scored)` evaluates in windows
    of another length (longer than `seq_len` too) instead.
    """

    unit = "tokens"  # what the splits hold, in errors
    _eval_shape: tuple[int, int] | None = None  # (length, scored) of `set_eval_windows`; None: from seq_len
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

    def set_eval_windows(self, length: int, scored: int) -> None:
        """Evaluate in windows of `length` tokens (any length the model reads, longer than `seq_len` too) that
        score their last `scored` targets after `length - scored` unscored ones (`EvalWindows`); by default
        `length = seq_len` and `scored = seq_len - eval_context`. What `python -m hier_lm.evaluate context=
        score=` sets."""
        if not 1 <= scored <= length:
            raise ValueError(f"score={scored} must be in [1, context={length}]: each window scores its last "
                             f"`score` tokens after `context - score` tokens of context")
        self._eval_shape = (length, scored)

    @property
    def eval_windows(self) -> tuple[int, int]:
        """(tokens per evaluation window, targets scored in each window after the first)."""
        h = self.hparams
        return self._eval_shape or (h.seq_len, h.seq_len - h.get("eval_context", 0))

    def _eval_windows(self, split: str) -> EvalWindows:
        self._check_eval_split(split)
        length, scored = self.eval_windows
        return EvalWindows(self._opened(), split, length, length - scored, self.unit, self._more_data_hint,
                           "data.seq_len" if self._eval_shape is None else "context")

    def _eval_dataset(self, split: str) -> EvalWindows:
        return self._eval_windows(split)


class ByteLMDataModule(TokenWindowDataModule):
    """Byte-level language modelling (vocab 256, metric bpc) on a `ByteCorpus`: batches as in
    `TokenWindowDataModule`, of bytes."""

    vocab_size = 256
    metric = "bpc"
    unit = "bytes"
