"""Config plumbing: recipe registry, free-text command-line values, `_target_` entries of the trainer, callbacks
and loggers."""

import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from omegaconf import OmegaConf

from hier_lm.config import (compose_train_config, hydra_quote_escape, instantiate_entries, quote_free_text_args,
                            recipe_names)


@pytest.mark.parametrize("text", ["def main(", "it's", "a\\nb", "ends with \\", "\\'", "[1, 2]", "a=b", "", "x'y\\"])
def test_free_text_reaches_hydra_literally(text, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", f"prompt={text}", "seed=1"])
    quote_free_text_args(("prompt",))
    parser = OverridesParser.create()
    assert parser.parse_override(sys.argv[1]).value() == text
    assert sys.argv[2] == "seed=1"
    assert parser.parse_override(f"prompt='{hydra_quote_escape(text)}'").value() == text


def test_recipes_are_listed():
    assert "quickstart" in recipe_names()


def test_trainer_callbacks_and_loggers_are_target_entries():
    cfg = compose_train_config(["recipe=quickstart"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert list(cfg.callbacks) == ["checkpoint", "final_checkpoint", "rng_state", "lr_monitor", "throughput", "samples"]
    assert all("_target_" in entry for entry in cfg.callbacks.values())
    every_7 = compose_train_config(["recipe=quickstart", "checkpoint.every_n_steps=7"]).callbacks  # the public key
    assert every_7.checkpoint.every_n_train_steps == every_7.final_checkpoint.every_n_steps == 7
    assert list(cfg.logger) == ["csv"] and cfg.logger.csv._target_ == "hier_lm.loggers.ResumableCSVLogger"
    for name in ("tensorboard", "wandb"):
        assert list(compose_train_config(["recipe=quickstart", f"logger={name}"]).logger) == [name]
    assert len(compose_train_config(["recipe=quickstart", "logger=none"]).logger) == 0
    both = compose_train_config(["recipe=quickstart", "logger=[csv,tensorboard]"]).logger
    assert list(both) == ["csv", "tensorboard"]
    assert "samples" not in compose_train_config(["recipe=quickstart", "~callbacks.samples"]).callbacks


def test_entries_are_instantiated_in_order_and_checked():
    cfg = OmegaConf.create({"run_dir": "/tmp/run", "callbacks": {
        "lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "logging_interval": "step"},
        "off": None,
        "stop": {"_target_": "lightning.pytorch.callbacks.EarlyStopping", "monitor": "val/loss"}}})
    lr, stop = instantiate_entries(cfg.callbacks, "callbacks")
    assert isinstance(lr, LearningRateMonitor) and lr.logging_interval == "step"
    assert isinstance(stop, EarlyStopping) and stop.monitor == "val/loss"
    cfg.callbacks.odd = {"monitor": "val/loss"}
    with pytest.raises(ValueError, match=r"callbacks.odd has no _target_: give one \(\+callbacks.odd._target_="):
        instantiate_entries(cfg.callbacks, "callbacks")
