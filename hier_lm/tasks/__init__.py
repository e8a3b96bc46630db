"""LightningModules: what is optimised and measured for each kind of data."""

from hier_lm.tasks.language_model import (
    CHECKPOINT_KEY,
    LanguageModelTask,
    metric_value,
    next_token_loss,
    scored_next_token_loss,
)

__all__ = ["CHECKPOINT_KEY", "LanguageModelTask", "metric_value", "next_token_loss", "scored_next_token_loss"]
