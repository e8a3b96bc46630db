"""LRA Retrieval: do two ACL Anthology Network papers cite each other? Pairs of byte documents (each cut to
4,000 bytes), 2 classes. The release's `tsv_data/new_aan_pairs.{train,eval,test}.tsv`: rows `label<TAB>id1<TAB>
id2<TAB>text1<TAB>text2`, no header, no quoting (the benchmark reads them so).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import Example, LRACache, write_cache
from hier_lm.data.lra.sources import find_folder, text_bytes
from hier_lm.data.settings import SPLITS, check_sizes

FILES = {"train": "new_aan_pairs.train.tsv", "valid": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}


def read_pairs(path: Path) -> Iterator[Example]:
    """The examples `((text1 bytes, text2 bytes), label)` of one pairs TSV."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for line, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            try:
                label = int(float(row[0]))
            except (ValueError, IndexError):
                label = -1
            if len(row) != 5 or label not in (0, 1):
                raise ValueError(f"{path}:{line}: expected label<TAB>id1<TAB>id2<TAB>text1<TAB>text2 with a 0/1 label, "
                                 f"got {len(row)} fields")
            texts = (row[3].encode("utf-8", "surrogateescape"), row[4].encode("utf-8", "surrogateescape"))
            yield tuple(map(text_bytes, texts)), label


class RetrievalDataModule(LRADataModule):
    """LRA Retrieval (AAN pairs): two byte sequences per example (`fields = 2`), vocab 256, 2 classes, each
    cut to `seq_len` bytes (4,000 in the benchmark); from the TSVs in `path` (or its `tsv_data/`), cached under
    `<root>/lra_retrieval/`. Batches as in `LRADataModule`: `tokens [B, 2, L]`, `lengths [B, 2]`."""

    name = "lra_retrieval"
    vocab_size = 256
    num_classes = 2
    fields = 2

    def __init__(self, path: str | None = None, root: str | None = None, seq_len: int = 4000, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed)
        if path is None:
            raise ValueError("lra_retrieval needs data.path=<the folder of new_aan_pairs.{train,eval,test}.tsv>")
        path, root = str(path), None if root is None else str(root)
        self.save_hyperparameters()

    def cache_folder(self) -> Path:
        return self.root / self.name / f"aan-seq{self.hparams.seq_len}"

    def build_cache(self, folder: Path) -> LRACache:
        release = find_folder(self.hparams.path, list(FILES.values()), ["tsv_data", "lra_release/tsv_data"],
                              "<the folder of new_aan_pairs.{train,eval,test}.tsv (lra_release/tsv_data)>")
        splits = {split: read_pairs(release / FILES[split]) for split in SPLITS}
        return write_cache(folder, splits, self.base_meta(str(release.resolve())), progress=True)
