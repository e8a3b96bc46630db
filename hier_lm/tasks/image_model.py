"""The image-modelling LightningModule: next-subpixel cross-entropy over 256 values, bits per dimension.

An image of `H x W` RGB pixels is the sequence of its `3HW` sub-pixel tokens (raster order, R, G, B interleaved;
`hier_lm.data.pixels`). The model reads `[START] + pixels[:-1]` and predicts every pixel token, START being
token 0, as Trax's `ShiftRight` does for the Hourglass ImageNet models (it prepends a 0; a pixel value 0 is
still a real target). So `logits[:, t]` predicts pixel `t` from pixels `< t` only, the model's `max_len` is
exactly `3HW` (3,072 for 32x32, 12,288 for 64x64) and every sub-pixel is scored:

    bpd = mean NLL (nats) / ln 2 = total NLL of an image / (ln 2 * 3 * H * W)

Sampling starts from `[START]` (or `[START] + known pixels` for completion) and draws `3HW` tokens (or the rest).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hier_lm.tasks.language_model import CHECKPOINT_KEY, LanguageModelTask

START_TOKEN = 0
CHANNELS = 3


def image_length(image_size: int) -> int:
    """Sub-pixel tokens of one `image_size x image_size` RGB image: `3 * size * size`."""
    return CHANNELS * image_size * image_size


def with_start_token(pixels: torch.Tensor) -> torch.Tensor:
    """`LongTensor[B, 3HW]` pixel tokens -> `[B, 1 + 3HW]`, START prepended: a language-model batch whose
    inputs `[:, :-1]` are `[START] + pixels[:-1]` and whose targets `[:, 1:]` are all the pixels."""
    if pixels.dim() != 2:
        raise ValueError(f"image batches must be pixel tokens [B, 3 * H * W], got shape {list(pixels.shape)}")
    return torch.cat((pixels.new_full((pixels.shape[0], 1), START_TOKEN), pixels), dim=1)


def image_model_config(model: Mapping, image_size: int) -> dict:
    """`model` with `max_len = 3 * image_size**2`; an explicit `max_len` that differs is an error."""
    length = image_length(image_size)
    max_len = model.get("max_len")
    if max_len is not None and max_len != length:
        raise ValueError(f"model.max_len={max_len} but {image_size}x{image_size} images are exactly {length} "
                         f"sub-pixel tokens: set model.max_len={length} or null (null: set from the data)")
    return {**model, "max_len": length}


class ImageModelTask(LanguageModelTask):
    """Trains `build_model(model)` on image batches `LongTensor[B, 3HW]` of pixel tokens (no START token):
    the `LanguageModelTask` of the batches `with_start_token(pixels)`, with the metric `bpd`.

    Logs `train/loss`, `val/loss`, `val/bpd` (`test/...` in testing). Checkpoints also carry `image_size`,
    which tells `hier_lm.sample` (and `hier_lm.load`'s `model.image_size`) that this is an image model.
    """

    def __init__(self, model: Mapping, optim: Mapping, image_size: int, config: Mapping | None = None):
        model = image_model_config(model, image_size)
        super().__init__(model=model, optim=optim, metric="bpd", config=config)
        self.image_size = image_size

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return super().training_step(with_start_token(batch), batch_idx)

    def _eval_step(self, batch) -> None:
        # Under data parallelism the pair (pixels, n_context) of an `EvalShard`: n_context = 3HW scores nothing.
        pixels, n_context = (batch, None) if isinstance(batch, torch.Tensor) else batch
        super()._eval_step(with_start_token(pixels) if n_context is None else (with_start_token(pixels), n_context))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["image_size"] = self.image_size
