"""Images from an image model: unconditional samples, completion of top halves, PNG grids and prompt images.

A model of `hier_lm.tasks.ImageModelTask` reads `[START] + pixels` (`hier_lm.tasks.image_model`), so an image
is `generate(model, [START] + known pixels, the rest)` without its START token, decoded by
`hier_lm.data.pixels.decode_images`. Images are `uint8 [N, H, W, 3]` throughout.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hier_lm.files import atomic_write
from hier_lm.data.pixels import decode_images, encode_images
from hier_lm.generation import check_count, check_sampling, generate
from hier_lm.tasks.image_model import START_TOKEN, image_length


def top_half_tokens(images: torch.Tensor | np.ndarray, image_size: int) -> torch.Tensor:
    """The pixel tokens of the top `image_size // 2` rows of `uint8 [N, S, S, 3]` images: `[N, 3 * S * (S // 2)]`."""
    return encode_images(images)[:, : 3 * image_size * (image_size // 2)]


@torch.inference_mode()
def sample_images(
    model: nn.Module,
    image_size: int,
    num_images: int | None = None,
    prompt_pixels: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`num_images` sampled images, or one completion of each row of `prompt_pixels: LongTensor[N, P]` (the
    first `P < 3HW` pixel tokens, kept as they are), as `uint8 [N, image_size, image_size, 3]`.

    Images are drawn `batch_size` at a time (default: all at once), batch `i` with seed `seed + i`; the same
    seed gives the same images with `use_cache=True` and `False`. Bad settings are a ValueError before any
    sampling (`check_sampling`).
    """
    length = image_length(image_size)
    if getattr(model, "max_len", length) != length:
        raise ValueError(f"this model reads {model.max_len} tokens, not the {length} sub-pixels of a "
                         f"{image_size}x{image_size} image: use the image size it was trained on")
    check_sampling(temperature, top_k, top_p)
    if batch_size is not None:
        check_count("batch_size", batch_size, minimum=1)
    if prompt_pixels is None:
        prompt_pixels = torch.zeros(check_count("num_images", num_images, minimum=1), 0, dtype=torch.long)
    prompt_pixels = torch.as_tensor(prompt_pixels, dtype=torch.long)
    if prompt_pixels.dim() != 2 or prompt_pixels.shape[1] >= length:
        raise ValueError(f"prompt_pixels must be [N, P] with P < {length}, got shape {list(prompt_pixels.shape)}")
    device = next(model.parameters()).device
    images = []
    for i, prompt in enumerate(prompt_pixels.split(batch_size or prompt_pixels.shape[0])):
        start = torch.full((prompt.shape[0], 1), START_TOKEN, dtype=torch.long)
        tokens = generate(model, torch.cat((start, prompt), dim=1).to(device), length - prompt.shape[1],
                          temperature, top_k, top_p, use_cache=use_cache,
                          seed=None if seed is None else seed + i, progress=progress)
        images.append(decode_images(tokens[:, 1:], image_size))
    return torch.cat(images)


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """`uint8 [N, H, W, 3]` -> one float `[3, H', W']` grid (torchvision `make_grid`, `nrow` images a row,
    default `ceil(sqrt(N))`, 2 px white padding)."""
    from torchvision.utils import make_grid

    batch = images.permute(0, 3, 1, 2).float() / 255
    return make_grid(batch, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a float `[3, H, W]` image in [0, 1] (e.g. an `image_grid`) as a PNG, atomically; returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    atomic_write(path, lambda f: save_image(image, f, format="png"))
    return path


def save_images(images: torch.Tensor, path: str | os.PathLike, save_each: bool = False,
                nrow: int | None = None) -> list[Path]:
    """Save `uint8 [N, H, W, 3]` images as one PNG grid at `path` and, with `save_each`, each image as
    `<stem>_000.png`, `<stem>_001.png`, ... beside it. Returns the paths written, the grid first."""
    path = Path(path)
    written = [save_png(image_grid(images, nrow), path)]
    if save_each:
        for i, image in enumerate(images):
            written.append(save_png(image.permute(2, 0, 1).float() / 255, path.with_name(f"{path.stem}_{i:03d}.png")))
    return written


def load_images(spec: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Images of size `image_size` from a folder of PNG files, a glob of PNG files (each sorted by name), or
    an `.npy` array `uint8 [N, H, W, 3]`, as `uint8 [N, image_size, image_size, 3]`."""
    spec = str(spec)
    if spec.endswith(".npy"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"prompt images not found: {spec}")
        array = np.load(spec)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (image_size, image_size, 3):
            raise ValueError(f"{spec}: expected uint8 [N, {image_size}, {image_size}, 3] images, got {array.dtype} "
                             f"{list(array.shape)}")
        return torch.from_numpy(array.copy())
    from PIL import Image

    files = sorted(Path(spec).glob("*.png")) if Path(spec).is_dir() else sorted(map(Path, glob.glob(spec)))
    if not files:
        raise FileNotFoundError(f"no PNG images found at {spec} (give a folder of .png files, a glob or an .npy)")
    images = []
    for file in files:
        with Image.open(file) as image:
            if image.size != (image_size, image_size):
                raise ValueError(f"{file} is {image.size[0]}x{image.size[1]}, this model makes "
                                 f"{image_size}x{image_size} images: resize it first")
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(images))
