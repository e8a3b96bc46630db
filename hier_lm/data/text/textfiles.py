"""`TextFilesDataModule`: byte-level language modelling on any files, by default the Python standard library."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hier_lm.data.settings import check_sizes, check_splits
from hier_lm.data.text.corpus import DEFAULT_SPLITS, ByteCorpus
from hier_lm.data.text.datamodule import ByteLMDataModule
from hier_lm.data.text.paths import resolve_paths


class TextFilesDataModule(ByteLMDataModule):
    """Byte-level language modelling (vocab 256, metric bpc) on any files (`paths`: see `resolve_paths`), by
    default the running interpreter's standard library; the bytes are cached once as a uint8 memmap (see
    `ByteCorpus`) and split by `splits` (train, valid, test fractions of the bytes).

    Batches as in `ByteLMDataModule`: `LongTensor[B, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`),
    endless random windows for training, resumable by batch index (`state_dict`), and contiguous windows
    for valid/test (after `eval_context` unscored bytes when it is positive).
    """

    name = "textfiles"
    _more_data_hint = " or add files to data.paths"

    def __init__(self, paths: Sequence[str] = ("stdlib",), root: str | Path | None = None, seq_len: int = 256,
                 batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 splits: Sequence[float] = DEFAULT_SPLITS, eval_context: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed, eval_context=eval_context)
        # Plain Python values (not Hydra's ListConfig, not Path) so that checkpoints load with weights_only=True.
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        root = None if root is None else os.fspath(root)
        splits = check_splits(splits)
        self.save_hyperparameters()

    def prepare_cache(self) -> ByteCorpus:
        """Open the files' `ByteCorpus`, building it first if absent."""
        return ByteCorpus.build(resolve_paths(self.hparams.paths), self.hparams.root, self.hparams.splits)
