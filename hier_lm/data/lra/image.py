"""LRA Image: CIFAR-10 as sequences of 1,024 grayscale pixels (10 classes). As the benchmark: train = the
first 90% of CIFAR-10's training images (45,000), valid = the last 10% (5,000), test = its test images
(10,000); gray = round(0.2989 R + 0.5870 G + 0.1140 B), TensorFlow's `rgb_to_grayscale`.

`data.path` is torchvision's CIFAR10 folder: `cifar-10-batches-py/` (`data_batch_1` .. `data_batch_5`,
`test_batch`: pickled dicts with `data`, uint8 `[10000, 3072]` planar R, G, B, and `labels`) or the folder that
holds it. The pickles are read with an unpickler that builds only dicts, lists, bytes, numbers and numpy
arrays: a file from elsewhere is data, never code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import LRACache, write_cache
from hier_lm.data.lra.sources import find_folder
from hier_lm.data.settings import check_sizes

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
GRAY = np.array([0.2989, 0.5870, 0.1140])
# What the CIFAR-10 pickles may build: numpy arrays and their dtypes (numpy 1 and 2 module names), and the
# bytes of an array as a protocol-2 pickle written by Python 3 spells them (`_codecs.encode`).
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class DataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global but numpy's array reconstruction (no code runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(`uint8 [n, 1024]` grayscale pixels in raster order, `int64 [n]` labels) of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            batch = DataUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 1024)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch file ({err})") from None
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    gray = np.rint(np.einsum("c,ncp->np", GRAY, data.astype(np.float64))).clip(0, 255).astype(np.uint8)
    return gray, labels


class LRAImageDataModule(LRADataModule):
    """LRA Image (CIFAR-10 grayscale): vocab 256 (pixel values), 10 classes, 1,024 tokens per example; from the
    `cifar-10-batches-py` folder at `path`, cached under `<root>/lra_image/`. `valid_fraction` of the training
    images (the last ones) is the valid split. Batches as in `LRADataModule`."""

    name = "lra_image"
    vocab_size = 256
    num_classes = 10

    def __init__(self, path: str | None = None, root: str | None = None, seq_len: int = 1024,
                 valid_fraction: float = 0.1, batch_size: int = 256, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed)
        if seq_len != 1024:
            raise ValueError(f"data.seq_len must be 1024 (32 x 32 pixels) for lra_image, got {seq_len}")
        if not 0 < valid_fraction < 1:
            raise ValueError(f"data.valid_fraction must lie in (0, 1), got {valid_fraction}")
        if path is None:
            raise ValueError("lra_image needs data.path=<the cifar-10-batches-py folder (torchvision's CIFAR10) or the "
                             "folder holding it>")
        path, root, valid_fraction = str(path), None if root is None else str(root), float(valid_fraction)
        self.save_hyperparameters()

    def cache_folder(self) -> Path:
        return self.root / self.name / f"cifar10-valid{self.hparams.valid_fraction:g}"

    def build_cache(self, folder: Path) -> LRACache:
        batches = find_folder(self.hparams.path, [*TRAIN_FILES, TEST_FILE], ["cifar-10-batches-py"],
                              "<the cifar-10-batches-py folder (torchvision's CIFAR10) or the folder holding it>")
        train = [read_batch(batches / name) for name in TRAIN_FILES]
        pixels, labels = np.concatenate([p for p, _ in train]), np.concatenate([label for _, label in train])
        test_pixels, test_labels = read_batch(batches / TEST_FILE)
        n_train = round(len(pixels) * (1 - self.hparams.valid_fraction))

        def examples(rows: np.ndarray, row_labels: np.ndarray) -> list:
            return [((row,), int(label)) for row, label in zip(rows, row_labels)]

        splits = {"train": examples(pixels[:n_train], labels[:n_train]),
                  "valid": examples(pixels[n_train:], labels[n_train:]), "test": examples(test_pixels, test_labels)}
        return write_cache(folder, splits, self.base_meta(str(batches.resolve())), progress=True)
