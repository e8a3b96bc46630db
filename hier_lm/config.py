"""Config plumbing shared by the entry points: where the configs are, composing and instantiating them, argv
handling."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from importlib import resources

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hier_lm.models import MODELS
from hier_lm.models.config import hydra_schema

CONFIG_MODULE = "hier_lm.recipes"  # primary configs and the config groups model/, data/, ..., recipe/
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def recipe_names() -> list[str]:
    """Names of the shipped recipes: the options `recipes/recipe/<name>.yaml` of the config group `recipe`."""
    root = resources.files(CONFIG_MODULE).joinpath("recipe")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The config `python -m hier_lm.train <overrides>` would compose (e.g. `["recipe=quickstart", "seed=1"]`)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides)


def instantiate_entries(entries: DictConfig | None, group: str) -> list:
    """The objects of a config node of named `_target_` entries (`callbacks`, `logger`), in order, as
    lightning-hydra-template's `instantiate_callbacks` / `instantiate_loggers`; a null entry is skipped."""
    objects = []
    for name, entry in (entries or {}).items():
        if entry is None:
            continue
        if not (isinstance(entry, DictConfig) and "_target_" in entry):
            raise ValueError(f"{group}.{name} has no _target_: give one (+{group}.{name}._target_=<class>) or "
                             f"remove the entry (~{group}.{name})")
        objects.append(instantiate(entry))
    return objects


def quote_free_text_args(keys: tuple[str, ...]) -> None:
    """Quote the values of free-text keys in `sys.argv` (e.g. `prompt=def main(`) so that Hydra's override
    grammar takes them literally. A value already in matching quotes is left to Hydra as it is."""
    for i, arg in enumerate(sys.argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            sys.argv[i] = f"{key}='{hydra_quote_escape(value)}'"


def hydra_quote_escape(text: str) -> str:
    """Escape `text` for a single-quoted Hydra override value: backslashes are escapes only before a quote
    or the closing quote, so only those runs are doubled, and each quote gets one."""
    return re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)


def exit_on_user_error(fn: Callable) -> Callable:
    """Turn the errors a user can fix (missing files, bad values) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def register_model_configs() -> None:
    """Make every family of `MODELS` the option `model=<family>` of Hydra's config group `model`: its config
    dataclass with its defaults (`hydra_schema`: `name` first, without `vocab_size`, which is always set from the
    data), `max_len` following `data.seq_len` (null for image data, which has none: the image task sets it). A
    value of the wrong type or an unknown key is a Hydra error at composition; a bad `Literal` value (typed `str`
    here) is the model's ValueError when it is built. A new family needs no config file: its model file and its
    line in `MODELS`."""
    store = ConfigStore.instance()
    for name, model_class in MODELS.items():
        node = OmegaConf.structured(hydra_schema(model_class.config_class, name, omit=("vocab_size",),
                                                 nullable=("max_len",)))
        node.max_len = "${oc.select:data.seq_len,null}"  # image data has no seq_len: set from the data
        store.store(group="model", name=name, node=node)


register_model_configs()
