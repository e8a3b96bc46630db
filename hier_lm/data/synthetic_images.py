"""Procedural, deterministic, learnable small RGB images (`SyntheticImages`) and their DataModule: offline
tests and smoke runs of image models, nothing downloaded or stored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hier_lm.data.images import ImageDataModule
from hier_lm.data.pixels import CHANNELS
from hier_lm.data.settings import SPLITS, check_sizes, plain_split_sizes

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# The colours of the synthetic images: every channel value is a multiple of 17 (16 levels, 0..255).
_LEVELS = 16
_STEP = 255 // (_LEVELS - 1)


class SyntheticImages:
    """`count` procedural RGB images `size x size` of one split: a smooth two-colour gradient along a random
    direction plus one to three solid rectangles or discs in saturated colours. Image `i` is a function of
    `(seed, split, i)` only (`np.random.default_rng([seed, split_id, i])`), so it is never stored. Every
    channel value is a multiple of 17 (16 levels), and neighbouring pixels are mostly equal or one level
    apart: a small model gets far below 8 bits per sub-pixel quickly."""

    def __init__(self, size: int, count: int, seed: int, split: str):
        self.size, self.count, self.seed, self.split_id = int(size), int(count), int(seed), _SPLIT_IDS[split]
        grid = (np.arange(self.size) + 0.5) / self.size
        self._y, self._x = np.meshgrid(grid, grid, indexing="ij")  # [size, size] pixel centres in (0, 1)

    def __len__(self) -> int:
        return self.count

    def image(self, i: int) -> np.ndarray:
        """`uint8 [size, size, 3]`: image `i`."""
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * self._x + np.sin(angle) * self._y
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)  # 0 .. 1 across the image
        start, end = rng.integers(0, _LEVELS, 3), rng.integers(0, _LEVELS, 3)
        levels = np.rint(start + (end - start) * t[..., None])  # [size, size, 3]
        for _ in range(rng.integers(1, 4)):
            colour = rng.integers(0, 2, 3) * (_LEVELS - 1)  # one of the 8 saturated colours
            cy, cx = rng.uniform(0.1, 0.9, 2)
            ry, rx = rng.uniform(0.1, 0.35, 2)
            if rng.integers(0, 2):
                inside = (np.abs(self._y - cy) <= ry) & (np.abs(self._x - cx) <= rx)
            else:
                inside = (self._y - cy) ** 2 + (self._x - cx) ** 2 <= ry ** 2
            levels[inside] = colour
        return (levels * _STEP).astype(np.uint8)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """`uint8 [len(indices), size, size, 3]`: images `indices`."""
        return np.stack([self.image(i) for i in np.asarray(indices, dtype=np.int64)]) if len(indices) else \
            np.zeros((0, self.size, self.size, CHANNELS), dtype=np.uint8)


class SyntheticImagesDataModule(ImageDataModule):
    """Procedural RGB images (`SyntheticImages`: gradients plus solid shapes, 16 levels per channel), vocab
    256, metric bpd; nothing is downloaded or stored. `split_sizes` images per split (train, valid, test),
    drawn from `image_seed`; `seed` orders the training batches. Batches as in `ImageDataModule`:
    `LongTensor[B, 3 * size * size]`."""

    name = "synthetic_images"

    def __init__(self, size: int = 8, split_sizes: Sequence[int] = (8192, 512, 512), image_seed: int = 0,
                 batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_sizes(size=size, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed)
        if image_seed < 0:
            raise ValueError(f"data.image_seed must be at least 0, got {image_seed}")
        # A plain list (not Hydra's ListConfig), so that checkpoints load with weights_only=True.
        split_sizes = plain_split_sizes(split_sizes, "image", (8192, 512, 512))
        self.save_hyperparameters()

    def prepare_cache(self) -> None:
        """Nothing to cache: the images are generated when read."""
        return None

    def _open(self) -> dict[str, SyntheticImages]:
        h = self.hparams
        return {name: SyntheticImages(h.size, count, h.image_seed, name) for name, count in zip(SPLITS, h.split_sizes)}

