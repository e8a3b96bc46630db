"""The models, as plain `nn.Module`s (no Lightning): `model(tokens: [B, L]) -> logits: [B, L, vocab]`.

Each family is one model file holding its model class and its config dataclass (a `ModelConfig`, with the
options' defaults and checks); the class names the config (`config_class`) and its residual block types
(`block_types`). A new family is its model file and one line of `MODELS`; `hier_lm.config` makes every family of
`MODELS` the Hydra option `model=<family>`, with the config's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from hier_lm.models.config import ModelConfig
from hier_lm.models.flash import FLASH, FLASHConfig
from hier_lm.models.h_transformer import HTransformer1D, HTransformer1DConfig
from hier_lm.models.hourglass import Hourglass, HourglassConfig
from hier_lm.models.transformer import Transformer, TransformerConfig

MODELS: dict[str, type[nn.Module]] = {  # the `model` config group: name -> model class
    "transformer": Transformer,
    "hourglass": Hourglass,
    "h_transformer": HTransformer1D,
    "flash": FLASH,
}

__all__ = ["FLASH", "MODELS", "FLASHConfig", "HTransformer1D", "HTransformer1DConfig", "Hourglass", "HourglassConfig",
           "ModelConfig", "Transformer", "TransformerConfig", "build_model"]


def build_model(config: Mapping | ModelConfig) -> nn.Module:
    """Build a model from a family's config, or from a mapping `{"name": <one of MODELS>, **options}` (the
    `model` config group, as checkpoints store it; its `activation_checkpointing` is for the training task)."""
    if isinstance(config, ModelConfig):
        for model_class in MODELS.values():
            if type(config) is model_class.config_class:
                return model_class(config)
        raise ValueError(f"{type(config).__name__} is the config of no model in MODELS")
    options = dict(config)
    name = options.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name](**options)
