"""The models, as plain `nn.Module`s (no Lightning): `model(tokens: [B, L]) -> logits: [B, L, vocab]`."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from hier_lm.models.flash import FLASH
from hier_lm.models.h_transformer import HTransformer1D
from hier_lm.models.hourglass import Hourglass
from hier_lm.models.transformer import Transformer

MODELS: dict[str, type[nn.Module]] = {"transformer": Transformer, "hourglass": Hourglass, "flash": FLASH,
                                      "h_transformer": HTransformer1D}

__all__ = ["FLASH", "MODELS", "HTransformer1D", "Hourglass", "Transformer", "build_model"]


def build_model(config: Mapping) -> nn.Module:
    """Build a model from a config mapping `{"name": <one of MODELS>, **constructor kwargs}` (the `model:` config
    group; its `activation_checkpointing` key is left to the training task)."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    kwargs.pop("activation_checkpointing", None)  # a training option that the task applies to the built model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for model {name!r}: {err}") from err
