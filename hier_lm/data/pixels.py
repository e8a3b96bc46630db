"""The pixel codec of the image datasets: an RGB image is the sequence of its sub-pixel values (vocab 256) in
raster order, row by row, left to right, with R, G, B interleaved per pixel: token `3 * (y * W + x) + c` is
channel `c` of pixel `(y, x)`. This is `img.reshape(N, -1)` of the HWC image, as Trax's
`downsampled_imagenet_flatten_bare_preprocess` (the Hourglass ImageNet setup): 32x32 -> 3,072 tokens,
64x64 -> 12,288."""

from __future__ import annotations

import numpy as np
import torch

IMAGE_VOCAB = 256
CHANNELS = 3


def _as_uint8(images: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer values 0..255 (uint8 or an integer dtype), got {tensor.dtype}")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() >= IMAGE_VOCAB):
        raise ValueError(f"{what} must hold values 0..255, got the range [{int(tensor.min())}, {int(tensor.max())}]")
    return tensor.to(torch.uint8)


def encode_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`uint8 [N, H, W, 3]` (array or tensor) -> `LongTensor[N, H * W * 3]` of pixel tokens in raster order,
    R, G, B interleaved per pixel."""
    pixels = _as_uint8(images, "images")
    if pixels.ndim != 4 or pixels.shape[-1] != CHANNELS:
        raise ValueError(f"images must be [N, H, W, 3] (RGB, channels last), got shape {list(pixels.shape)}")
    return pixels.reshape(pixels.shape[0], -1).long()


def decode_images(tokens: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Pixel tokens `[N, 3 * size * size]` (or one image `[3 * size * size]`) -> `uint8 [N, size, size, 3]`
    (`[1, size, size, 3]` for one image); the inverse of `encode_images`."""
    values = _as_uint8(tokens, "pixel tokens")
    if values.ndim == 1:
        values = values[None]
    length = CHANNELS * size * size
    if values.ndim != 2 or values.shape[1] != length:
        raise ValueError(f"a {size}x{size} RGB image is 3 * {size} * {size} = {length} pixel tokens, got shape "
                         f"{list(values.shape)}: pass [N, {length}] tokens or the image size they were made with")
    return values.reshape(-1, size, size, CHANNELS)


def planar_to_hwc(rows: np.ndarray, size: int) -> np.ndarray:
    """Chrabaszcz et al. rows `uint8 [N, 3 * size * size]` (all R in raster order, then all G, then all B)
    -> `uint8 [N, size, size, 3]`."""
    rows = np.asarray(rows)
    length = CHANNELS * size * size
    if rows.ndim != 2 or rows.shape[1] != length:
        raise ValueError(f"planar {size}x{size} RGB rows must be [N, {length}], got shape {list(rows.shape)}")
    if rows.dtype != np.uint8:
        raise ValueError(f"planar image rows must be uint8, got {rows.dtype}")
    return np.ascontiguousarray(rows.reshape(-1, CHANNELS, size, size).transpose(0, 2, 3, 1))
