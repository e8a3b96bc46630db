"""Helpers shared by the test modules."""

import dataclasses
import os
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate

import hier_lm
from hier_lm.checkpoint import read_checkpoint
from hier_lm.config import compose_train_config, hydra_quote_escape
from hier_lm.models import MODELS
from hier_lm.tasks import scored_next_token_loss


def tiny_model_overrides(name: str) -> list[str]:
    """Hydra overrides `model.<key>=<value>` that make a run's model family `name` its `tiny()` config: every
    option where `tiny()` differs from the defaults, except `vocab_size` and `max_len` (a run sets them from
    its data). The other options stay as the recipe sets them."""
    config_class = MODELS[name].config_class
    tiny, default = dataclasses.asdict(config_class.tiny()), dataclasses.asdict(config_class())
    return [f"model.{key}={hydra_value(value)}" for key, value in tiny.items()
            if value != default[key] and key not in ("vocab_size", "max_len")]


def hydra_value(value) -> str:
    """`value` (a config option: str, bool, number or None) as a Hydra override value."""
    if isinstance(value, str):
        return f"'{hydra_quote_escape(value)}'"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


TINY_MODEL = {name: tiny_model_overrides(name) for name in MODELS}  # every family's overrides


# Data overrides of image recipes (datamodule metric "bpd"): a few procedural 4x4 images instead of a corpus.
TINY_IMAGES = ["data=synthetic_images", "data.size=4", "data.split_sizes=[64,8,8]", "data.batch_size=4",
               "data.eval_batch_size=4", "data.num_workers=0"]


def is_image_recipe(recipe: str) -> bool:
    """Whether `recipe` trains on images (its datamodule's metric is bpd)."""
    return get_class(compose_train_config([f"recipe={recipe}"]).data._target_).metric == "bpd"


def tiny_overrides(corpus_dir: Path, runs_dir: Path, steps: int = 2, recipe: str = "quickstart") -> list[str]:
    """Hydra overrides that make `recipe` train `steps` steps of a tiny model on a small text corpus (image
    recipes: on a few tiny images) in seconds, whatever its model family and dataset."""
    model = compose_train_config([f"recipe={recipe}", "data=textfiles"]).model.name
    text = [f"data.paths=[{corpus_dir}/*.py]", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0"]
    return [
        f"runs_dir={runs_dir}",
        *(TINY_IMAGES if is_image_recipe(recipe) else ["data=textfiles", *text]),
        *TINY_MODEL[model],
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "checkpoint.every_n_steps=2",
        "optim.warmup_steps=1",
        "samples.max_new_tokens=8",
        "samples.num_images=2",
        "logger=csv",
    ]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def plain_validation_loss(run_dir) -> tuple[float, int, object]:
    """(mean next-token loss, scored tokens, the data module) of the run's model over its validation loader, batch
    by batch with `scored_next_token_loss`: the reference that `evaluate` must equal."""
    data = instantiate(read_checkpoint(run_dir)[1]["hier_lm"]["config"]["data"])
    data.prepare_data()
    data.setup("validate")
    model, total, tokens = hier_lm.load(run_dir), 0.0, 0
    with torch.inference_mode():
        for batch in data.val_dataloader():
            loss, count = scored_next_token_loss(model, batch)
            total, tokens = total + loss.item() * count, tokens + count
    return total / tokens, tokens, data
