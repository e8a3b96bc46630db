"""LRA Text: IMDB movie reviews as bytes, positive or negative (2 classes, the first 4,000 bytes of each).
As the benchmark: train = IMDB train (25,000), valid = test = IMDB test (25,000; IMDB has no validation set).

`data.path` is the Stanford tarball `aclImdb_v1.tar.gz`, its extracted `aclImdb/` folder (`train/{pos,neg}/*.txt`,
`test/{pos,neg}/*.txt`; `train/unsup` is not used), or a folder of the Hugging Face `imdb` parquet files
(`*train*.parquet`, `*test*.parquet` with columns `text` and `label`: 0 negative, 1 positive).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import Example, LRACache, write_cache
from hier_lm.data.lra.sources import text_bytes
from hier_lm.data.settings import check_sizes

LABELS = {"neg": 0, "pos": 1}
IMDB_SPLITS = {"train": "train", "valid": "test", "test": "test"}  # our split -> IMDB's


def review_split(name: str) -> tuple[str, int] | None:
    """(IMDB split, label) of an `aclImdb/<split>/<pos|neg>/<id>.txt` path, else None."""
    parts = Path(name).parts
    if len(parts) >= 4 and parts[-4] == "aclImdb" and parts[-3] in ("train", "test") and parts[-2] in LABELS \
            and parts[-1].endswith(".txt"):
        return parts[-3], LABELS[parts[-2]]
    return None


def read_aclimdb(path: Path) -> dict[str, list[Example]]:
    """{IMDB split: examples} of the tarball or the extracted folder, in file-name order."""
    found: dict[str, list[tuple[str, Example]]] = {"train": [], "test": []}
    if path.is_file():
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                where = review_split(member.name) if member.isfile() else None
                if where:
                    found[where[0]].append((member.name, ((text_bytes(tar.extractfile(member).read()),), where[1])))
    else:
        for file in path.rglob("*.txt"):
            where = review_split(str(file))
            if where:
                found[where[0]].append((str(file), ((text_bytes(file.read_bytes()),), where[1])))
    return {split: [example for _, example in sorted(items, key=lambda item: item[0])]
            for split, items in found.items()}


def read_parquet(path: Path) -> dict[str, list[Example]]:
    """{IMDB split: examples} of the Hugging Face parquet files in `path`."""
    import pyarrow.parquet as pq

    found: dict[str, list[Example]] = {"train": [], "test": []}
    for file in sorted(path.rglob("*.parquet")):
        split = next((s for s in found if file.name.startswith(s) or f"/{s}" in file.as_posix()), None)
        if split is None or "unsupervised" in file.name:
            continue
        table = pq.read_table(file, columns=["text", "label"]).to_pydict()
        found[split] += [((text_bytes(text),), int(label)) for text, label in zip(table["text"], table["label"])]
    return found


class LRATextDataModule(LRADataModule):
    """LRA Text (IMDB bytes): vocab 256, 2 classes, sequences cut to `seq_len` bytes (4,000 in the benchmark);
    from `path` (see the module docstring), cached under `<root>/lra_text/`. Batches as in `LRADataModule`."""

    name = "lra_text"
    vocab_size = 256
    num_classes = 2

    def __init__(self, path: str | None = None, root: str | None = None, seq_len: int = 4000, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed)
        if path is None:
            raise ValueError("lra_text needs data.path=<aclImdb_v1.tar.gz, its aclImdb folder, or a folder of the "
                             "Hugging Face imdb parquet files>")
        path, root = str(path), None if root is None else str(root)
        self.save_hyperparameters()

    def cache_folder(self) -> Path:
        return self.root / self.name / f"imdb-seq{self.hparams.seq_len}"

    def build_cache(self, folder: Path) -> LRACache:
        path = Path(self.hparams.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.path={path} does not exist: pass aclImdb_v1.tar.gz, its aclImdb folder, "
                                    "or a folder of the Hugging Face imdb parquet files")
        parquet = path.is_dir() and any(path.rglob("*.parquet"))
        imdb = read_parquet(path) if parquet else read_aclimdb(path)
        for split, examples in imdb.items():
            if not examples:
                raise ValueError(f"{path} holds no IMDB {split} reviews: pass aclImdb_v1.tar.gz, its aclImdb "
                                 "folder, or a folder of the Hugging Face imdb parquet files")
        splits = {split: imdb[imdb_split] for split, imdb_split in IMDB_SPLITS.items()}
        return write_cache(folder, splits, self.base_meta(str(path.resolve())), progress=True)
