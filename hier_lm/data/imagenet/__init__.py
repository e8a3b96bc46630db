"""Downsampled ImageNet 32x32 / 64x64 for image modelling (vocab 256, metric bpd), from any of its three
distributed forms (`formats`, read by `readers`), converted once (`prepare`) into a uint8 memmap
`[N, S, S, 3]` per split (`cache`) and served as pixel tokens (`datamodule`):

- `oord`: van den Oord et al. 2016 (PixelRNN), `train_SxS.tar` / `valid_SxS.tar` of PNG files: the set
  Hourglass (TFDS `downsampled_imagenet`) trained and reported on; train 1,281,149 / valid 49,999 images.
- `npz`: Chrabaszcz et al. 2017, `Imagenet32_train_npz.zip` / `Imagenet32_val_npz.zip` (64x64: train
  part1 + part2), `train_data_batch_K.npz` / `val_data.npz` with `data` uint8 `[N, 3*S*S]` planar; another
  resize (box) of ImageNet, train 1,281,167 / valid 50,000 images.
- `parquet`: a Hugging Face parquet copy (e.g. `benjamin-paine/imagenet-1k-32x32`), an `image` column.

The cache is `<root>/imagenet<S>/<format>/{train.u8, valid.u8, meta.json}`: `train` and `valid` are the
source's official splits; the DataModule holds out part of train as its `valid` and uses the official
validation split as `test` (see `ImageNetDataModule`).
"""

from hier_lm.data.imagenet.cache import ImageNetCache
from hier_lm.data.imagenet.datamodule import ImageNetDataModule
from hier_lm.data.imagenet.prepare import prepare_imagenet
from hier_lm.data.imagenet.readers import DamagedFileError, ImageSizeError

__all__ = ["DamagedFileError", "ImageNetCache", "ImageNetDataModule", "ImageSizeError", "prepare_imagenet"]
