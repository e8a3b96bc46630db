"""LRA Pathfinder (32x32): is there a path between the two dots? 1,024 grayscale pixels, 2 classes. The
release's `pathfinder32/<difficulty>/`: `metadata/<n>.npy` (text, despite the suffix: one line per image,
`<image folder> <file name> <n> <label> ...`) and the PNGs `<image folder>/<file name>`. Difficulties:
`curv_baseline` (easy), `curv_contour_length_9` (intermediate), `curv_contour_length_14` (hard). As the
benchmark: the first 80% of the images (metadata files in numeric order) train, the next 10% valid, the last
10% test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import Example, LRACache, write_cache
from hier_lm.data.lra.sources import find_folder
from hier_lm.data.settings import SPLITS, check_sizes

DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")
SIZE = 32


def read_metadata(folder: Path) -> list[tuple[Path, int]]:
    """(image file, label) of every line of the metadata files of a difficulty folder, in numeric file order."""
    files = sorted((folder / "metadata").glob("*.npy"), key=lambda f: (not f.stem.isdigit(), int(f.stem)
                                                                       if f.stem.isdigit() else 0, f.stem))
    items = []
    for file in files:
        for line_no, line in enumerate(file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise ValueError(f"{file}:{line_no}: expected '<image folder> <file name> <n> <label 0|1> ...', "
                                 f"got {line[:80]!r}")
            items.append((folder / fields[0] / fields[1], int(fields[3])))
    if not items:
        raise ValueError(f"{folder}/metadata holds no image lines: pass the release's pathfinder32 folder")
    return items


def read_image(path: Path) -> np.ndarray:
    """`uint8 [1024]`: the grayscale pixels of a 32x32 PNG, raster order."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    if pixels.shape != (SIZE, SIZE):
        raise ValueError(f"{path}: a {pixels.shape[1]}x{pixels.shape[0]} image, expected {SIZE}x{SIZE}")
    return pixels.reshape(-1)


def read_examples(items: list[tuple[Path, int]]) -> Iterator[Example]:
    for path, label in items:
        yield (read_image(path),), label


class PathfinderDataModule(LRADataModule):
    """LRA Pathfinder 32x32: vocab 256 (pixel values), 2 classes, 1,024 tokens per example; from the release's
    `pathfinder32` folder at `path` (`difficulty` one of `DIFFICULTIES`), cached under `<root>/lra_pathfinder/`.
    Batches as in `LRADataModule`."""

    name = "lra_pathfinder"
    vocab_size = 256
    num_classes = 2

    def __init__(self, path: str | None = None, difficulty: str = "curv_contour_length_14", root: str | None = None,
                 seq_len: int = 1024, batch_size: int = 512, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed)
        if seq_len != SIZE * SIZE:
            raise ValueError(f"data.seq_len must be {SIZE * SIZE} (32 x 32 pixels) for lra_pathfinder, got {seq_len}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"data.difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
        if path is None:
            raise ValueError("lra_pathfinder needs data.path=<the release's pathfinder32 folder>")
        path, root = str(path), None if root is None else str(root)
        self.save_hyperparameters()

    def cache_folder(self) -> Path:
        return self.root / self.name / self.hparams.difficulty

    def build_cache(self, folder: Path) -> LRACache:
        difficulty = self.hparams.difficulty
        release = find_folder(self.hparams.path, [f"{difficulty}/metadata"],
                              ["pathfinder32", "lra_release/pathfinder32"], "<the release's pathfinder32 folder>")
        release = release / difficulty
        items = read_metadata(release)
        bounds = [0, int(0.8 * len(items)), int(0.9 * len(items)), len(items)]
        splits = {split: read_examples(items[bounds[i]:bounds[i + 1]]) for i, split in enumerate(SPLITS)}
        return write_cache(folder, splits, self.base_meta(str(release.resolve())), progress=True)
