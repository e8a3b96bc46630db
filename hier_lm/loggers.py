"""Experiment loggers chosen by `logger=csv|tensorboard|wandb|none`; W&B goes offline without credentials."""

from __future__ import annotations

import csv
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

LOGGERS = ("csv", "tensorboard", "wandb", "none")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to its `metrics.csv` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` writing `<save_dir>/<name>/metrics.csv`, continued (not replaced) when a run resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_has_credentials() -> bool:
    """True when an API key is in `WANDB_API_KEY` or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_logger(config: Mapping, run_dir: Path, run_name: str) -> Logger | None:
    """The logger of `config = {"name": one of LOGGERS, ...its options}`, writing under `run_dir`."""
    options = dict(config)
    kind = options.pop("name")
    if kind == "csv":
        return ResumableCSVLogger(run_dir, name="logs", version="", **options)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, name="tensorboard", version="", **options)
    if kind == "wandb":
        mode = options.pop("mode", None) or os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if wandb_has_credentials() else "offline"
            if mode == "offline":
                print(f"W&B: no credentials found, logging offline under {run_dir}/wandb; "
                      f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`")
        # the run name doubles as the W&B run id, so that a resumed run continues the same W&B run
        return WandbLogger(name=run_name, version=run_name, save_dir=str(run_dir), offline=mode == "offline",
                           mode=mode, **options)
    if kind == "none":
        return None
    raise ValueError(f"unknown logger {kind!r}; choose one of {LOGGERS}")
