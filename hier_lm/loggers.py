"""What the logger configs (`recipes/logger/*.yaml`, `logger=csv|tensorboard|wandb|none`) instantiate beside
Lightning's own loggers: a CSV logger that a resumed run appends to, and W&B that goes offline without
credentials."""

from __future__ import annotations

import csv
import netrc
import os
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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


def wandb_logger(save_dir: str | os.PathLike, name: str, project: str = "hier_lm", mode: str | None = None,
                 **options) -> WandbLogger:
    """Lightning's `WandbLogger` for a run writing under `save_dir`. `mode`: online | offline | disabled; by
    default `WANDB_MODE`, else online with credentials and offline without (then it says so, with the command
    that uploads the run later). `name` is also the W&B run id, so that a resumed run continues the same W&B run.
    `options`: any other `WandbLogger` argument."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if wandb_has_credentials() else "offline"
        if mode == "offline":
            print(f"W&B: no credentials found, logging offline under {save_dir}/wandb; "
                  f"upload later with `wandb sync {save_dir}/wandb/offline-run-*`")
    return WandbLogger(name=name, version=name, save_dir=str(save_dir), project=project, offline=mode == "offline",
                       mode=mode, **options)
