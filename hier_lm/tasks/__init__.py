"""LightningModules: what is optimised and measured for each kind of data."""

from collections.abc import Mapping

from hier_lm.tasks.classification import ClassificationTask
from hier_lm.tasks.image_model import START_TOKEN, ImageModelTask, image_length, image_model_config, with_start_token
from hier_lm.tasks.language_model import (
    CHECKPOINT_KEY,
    LanguageModelTask,
    metric_value,
    next_token_loss,
    scored_next_token_loss,
)

__all__ = ["CHECKPOINT_KEY", "START_TOKEN", "ClassificationTask", "ImageModelTask", "LanguageModelTask", "build_task",
           "image_length", "image_model_config", "metric_value", "next_token_loss", "scored_next_token_loss",
           "with_start_token"]


def build_task(config: Mapping, datamodule) -> LanguageModelTask | ClassificationTask:
    """The task of a run config for its datamodule: `ClassificationTask` for classification data (`metric ==
    "accuracy"`: the classes and whether examples are pairs come from the data, the head width from
    `config["classifier"]["mlp_dim"]` if given), `ImageModelTask` for image data (`metric == "bpd"`),
    `LanguageModelTask` otherwise; the model's `vocab_size` (and for images `max_len`) come from the data."""
    model = {**config["model"], "vocab_size": datamodule.vocab_size}
    if datamodule.metric == "accuracy":
        return ClassificationTask(model=model, optim=config["optim"], num_classes=datamodule.num_classes,
                                  pairs=datamodule.fields == 2, mlp_dim=(config.get("classifier") or {}).get("mlp_dim"),
                                  config=config)
    if datamodule.metric == "bpd":
        return ImageModelTask(model=model, optim=config["optim"], image_size=datamodule.image_size, config=config)
    return LanguageModelTask(model=model, optim=config["optim"], metric=datamodule.metric, config=config)
