"""`ImageNetDataModule`: downsampled ImageNet 32x32 / 64x64, batches of pixel tokens."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hier_lm.data.images import ImageDataModule, MemmapImages
from hier_lm.data.imagenet.cache import ImageNetCache
from hier_lm.data.imagenet.prepare import check_args, plain_sha256, prepare_imagenet
from hier_lm.data.settings import check_sizes

HELD_OUT_SEED = 0  # which train images the module holds out as `valid`: fixed, not data.seed


class ImageNetDataModule(ImageDataModule):
    """Downsampled ImageNet `size x size` (32 or 64) for image modelling: vocab 256, metric bpd, batches
    `LongTensor[B, 3 * size * size]` of pixel tokens (raster order, R, G, B per pixel; `ImageDataModule`).

    The images come from `prepare_imagenet(size, format, root, path, url, sha256)`. Splits: `test` is the
    source's official validation split (what Hourglass and the other generative papers report bpd on);
    `valid` is `valid_images` images held out of the official train split (a fixed random subset, the same
    for every run and data.seed), and `train` is the rest, so that model selection never looks at the
    reported split. `valid_images=0` makes `valid` the official validation split too (as Trax did) and
    trains on all of train.
    """

    def __init__(self, size: int = 32, format: str = "oord", root: str | Path | None = None,
                 path: str | Path | None = None, url: str | None = None, sha256: Mapping[str, str] | None = None,
                 valid_images: int = 10_000, batch_size: int = 8, eval_batch_size: int | None = None,
                 num_workers: int = 1, seed: int = 0):
        super().__init__()
        check_args(size, format)
        check_sizes(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if valid_images < 0:
            raise ValueError(f"data.valid_images must be at least 0, got {valid_images}")
        # Plain Python values (not Hydra's DictConfig, not Path) so that checkpoints load with weights_only=True.
        root = None if root is None else os.fspath(root)
        path = None if path is None else os.fspath(path)
        sha256 = plain_sha256(sha256)
        self.save_hyperparameters()
        self.cache: ImageNetCache | None = None

    @property
    def name(self) -> str:
        return f"imagenet{self.hparams.size}"

    def prepare_cache(self) -> ImageNetCache:
        """Open the images' cache, converting the source into it first if absent (`prepare_imagenet`)."""
        if self.cache is None:
            h = self.hparams
            self.cache = prepare_imagenet(h.size, h.format, h.root, h.path, h.url, h.sha256)
        return self.cache

    def _open(self) -> dict[str, MemmapImages]:
        cache = self.prepare_cache()
        count, held_out = cache.images("train"), self.hparams.valid_images
        if held_out == 0:
            return {"train": cache.source("train"), "valid": cache.source("valid"), "test": cache.source("valid")}
        if held_out >= count:
            raise ValueError(f"data.valid_images={held_out:,} but the train split has only {count:,} images: "
                             "hold out fewer (data.valid_images=0 validates on the official validation split)")
        mask = np.zeros(count, dtype=bool)
        mask[np.random.default_rng(HELD_OUT_SEED).choice(count, held_out, replace=False)] = True
        return {"train": cache.source("train", np.flatnonzero(~mask)),
                "valid": cache.source("train", np.flatnonzero(mask)), "test": cache.source("valid")}
