"""Config plumbing shared by the entry points: where the configs are, composing and instantiating them, argv
handling."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from importlib import resources

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
        objects.append(instantiate_option(entry, f"{group}.{name}"))
    return objects


def instantiate_option(node: DictConfig, key: str, **kwargs):
    """`instantiate(node, **kwargs)` for the config node at `key` (e.g. `data`); a key its `_target_` does not
    take (a recipe's data key that another data group lacks, a misspelt option) is a one-line ValueError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err.__cause__))
        if not isinstance(err.__cause__, TypeError) or unexpected is None:
            raise
        option = unexpected.group(1)
        raise ValueError(f"{key}.{option} is not an option of {node._target_}: drop it (~{key}.{option}) or "
                         f"rename it (`--cfg job` prints the composed config)") from err


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
    """Turn the errors a user can fix (missing files, bad values, also raised by a `_target_` that Hydra
    instantiates) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except InstantiationException as err:
            if not isinstance(err.__cause__, (FileNotFoundError, ValueError)):
                raise
            print(f"error: {err.__cause__}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def config_error_line(err: Exception) -> str:
    """A Hydra or OmegaConf error (and the OmegaConf error it wraps) as one line, without the keys' types."""
    text = str(err).split("Config search path:")[0]  # after the options of a missing config: Hydra's internals
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] + "".join(f" {line}" for line in lines[1:] if not line.startswith(("full_key:", "object_type=",
                                                                                       "reference_type=")))
    if isinstance(err.__cause__, OmegaConfBaseException):
        text += f": {str(err.__cause__).splitlines()[0]}"
    return text


def exit_on_config_error(main: Callable) -> Callable:
    """Around a `@hydra.main` entry point: an override Hydra cannot compose (a value of the wrong type, an unknown
    key or option, bad syntax) or an OmegaConf error becomes one line on stderr and exit code 2, instead of
    Hydra's report and exit code 1. Hydra hands these errors on only under HYDRA_FULL_ERROR, which this sets for
    the call; where the user set it, Hydra's full traceback is left as it is."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if os.environ.get("HYDRA_FULL_ERROR"):
            return main(*args, **kwargs)
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            if isinstance(err, InstantiationException):
                raise  # a user's error inside a `_target_` is `exit_on_user_error`'s: this one is a bug
            print(f"error: {config_error_line(err)} (`--cfg job` prints the composed config, `--help` the config "
                  f"groups and their options)", file=sys.stderr)
            sys.exit(2)
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)

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
