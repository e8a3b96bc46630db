"""Training entry point: `python -m hier_lm.train recipe=<name> key=value ...` (Hydra 1.3).

A run lives in `<runs_dir>/<recipe>/<timestamp>/`: `config.yaml`, `checkpoints/{last,step_<N>}.ckpt`,
logs and samples. `<runs_dir>/<recipe>/last` points to the newest run. `resume=auto` (or Lightning's spelling,
`ckpt_path=auto`) continues it.

The Trainer (`recipes/trainer/`), its callbacks (`recipes/callbacks/`) and loggers (`recipes/logger/`) are
Hydra `_target_` entries, instantiated once the run folder is known: they write under `${run_dir}`.

Sweeps: `python -m hier_lm.train -m recipe=quickstart optim.lr=1e-3,2e-3` runs one job after the other, each in
its own run folder; `main` returns each job's `optimized_metric` (default `val/loss`), the objective of an
optimising sweeper (e.g. `hydra/sweeper=optuna` where hydra-optuna-sweeper is installed). A job is one process.

Several devices (`trainer=ddp` or `trainer=fsdp`, `trainer.devices=N`): Lightning starts this script again
for ranks 1..N-1 with the same arguments; rank 0 resolves the run folder and the checkpoint to resume from
and hands both to them (`RUN_ENV`), so that every rank writes the same run. Under an external launcher
(torchrun, SLURM, several nodes) pass `run_dir=` (and `resume=<checkpoint>`) explicitly.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from hier_lm.checkpoint import AtomicCheckpointIO, existing_checkpoint, resolve_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_user_error, instantiate_entries
from hier_lm.files import atomic_write_text
from hier_lm.tasks import build_task

RUN_ENV = "HIER_LM_RUN"  # JSON {"run_dir", "ckpt"}: rank 0's run, for the ranks Lightning launches


def _launched_rank() -> int:
    """The rank a launcher gave this process (Lightning's subprocesses, torchrun, multi-node); 0 otherwise."""
    return max(int(os.environ.get(name) or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _new_run_dir(group: Path) -> Path:
    """Create and return `<group>/<timestamp>`, or `<timestamp>-<n>` when that exists (the jobs of a sweep may
    start within one second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        run_dir = group / (f"{stamp}-{n}" if n else stamp)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue


def _point_last(group: Path, run_dir: Path) -> None:
    """Atomically make `<group>/last` a symlink to `run_dir`."""
    tmp = group / f".last.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name if run_dir.parent == group else run_dir.resolve())
    os.replace(tmp, group / "last")


def _resume_setting(cfg: DictConfig) -> str | None:
    """`resume=`, or `ckpt_path=` (Lightning's name for it); both given with different values is an error."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume is not None and ckpt_path is not None and str(resume) != str(ckpt_path):
        raise ValueError(f"resume={resume} and ckpt_path={ckpt_path} differ: ckpt_path is Lightning's name for "
                         f"resume, give only one of them")
    return resume if resume is not None else ckpt_path


def resolve_run(cfg: DictConfig, recipe: str) -> tuple[Path, Path | None]:
    """The run folder (created when new) and the checkpoint to resume from (None for a fresh run)."""
    group = Path(cfg.runs_dir) / recipe
    if cfg.resume in (None, "auto"):
        latest = group / "last"
        if cfg.resume == "auto" and (ckpt := existing_checkpoint(latest / "checkpoints" / "last.ckpt")):
            return latest.resolve(), ckpt.parent.resolve() / ckpt.name
        if cfg.resume == "auto":
            print(f"resume=auto: no earlier run of {recipe!r} under {group}, starting a new one")
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _new_run_dir(group)
        return run_dir, None
    ckpt = resolve_checkpoint(cfg.resume)
    ckpt = ckpt.parent.resolve() / ckpt.name  # a sharded last.ckpt is a folder: keep its own name
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir, ckpt


def fit(cfg: DictConfig, recipe: str = "custom") -> tuple[Path, dict[str, float]]:
    """Train (or resume) the run described by the composed config. Returns the run folder and the trainer's
    metrics at the end (`trainer.callback_metrics`: the latest `train/...` and `val/...` values)."""
    resume = _resume_setting(cfg)
    with open_dict(cfg):
        cfg.resume = cfg.ckpt_path = resume
    rank, handed = _launched_rank(), os.environ.get(RUN_ENV)
    if rank > 0 and handed:  # started by rank 0's Lightning launcher: its run
        run = json.loads(handed)
        run_dir, ckpt_path = Path(run["run_dir"]), run["ckpt"] and Path(run["ckpt"])
    elif rank > 0 and not cfg.run_dir and resume in (None, "auto"):
        raise ValueError(f"this process has rank {rank} from an external launcher: pass run_dir=<folder> (the same "
                         f"on every process) so that all ranks write one run")
    else:
        run_dir, ckpt_path = resolve_run(cfg, recipe)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.run_name = cfg.get("run_name") or f"{recipe}-{run_dir.name}"
    config = OmegaConf.to_container(cfg, resolve=True)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_dir.parent == Path(cfg.runs_dir) / recipe:
            _point_last(run_dir.parent, run_dir)
        print(OmegaConf.to_yaml(cfg, resolve=True))
        print(f"run folder: {run_dir}" + (f"  (resuming from {ckpt_path})" if ckpt_path else ""))
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    task = build_task(config, datamodule)  # images (metric bpd) or text, chosen by the data
    callbacks = instantiate_entries(cfg.callbacks, "callbacks")
    loggers = instantiate_entries(cfg.logger, "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir))
    if rank == 0:  # Lightning launches ranks 1..N-1 inside fit, with a copy of this environment
        os.environ[RUN_ENV] = json.dumps({"run_dir": str(run_dir), "ckpt": ckpt_path and str(ckpt_path)})
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if rank == 0:
            os.environ.pop(RUN_ENV, None)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # flush the run's files (offline runs included)
    if rank == 0:
        print(f"done: {trainer.global_step} steps; checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}")
    return run_dir, {name: float(value) for name, value in trainer.callback_metrics.items()}


def train(cfg: DictConfig, recipe: str = "custom") -> Path:
    """Train (or resume) the run described by the composed config; returns the run folder."""
    return fit(cfg, recipe)[0]


def _one_process(trainer: DictConfig, choice: str | None) -> bool:
    """Whether the trainer config (the option `choice` of the `trainer` group) trains in this process alone."""
    devices = trainer.get("devices", 1)
    one_device = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    return one_device and trainer.get("num_nodes", 1) == 1 and choice not in ("ddp", "fsdp")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Train; returns the last value of `optimized_metric` (None where it was never logged): what a Hydra sweeper
    optimises."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and not _one_process(cfg.trainer, hydra_cfg.runtime.choices.get("trainer")):
        raise ValueError("a sweep (-m) runs its jobs in one process, but trainer=ddp|fsdp or trainer.devices > 1 start "
                         "the other ranks from the command line, which would rerun the sweep: sweep with one device, "
                         "or run one command per setting")
    _, metrics = fit(cfg, recipe=hydra_cfg.runtime.choices.get("recipe") or "custom")
    value = metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None
    if _launched_rank() == 0 and cfg.optimized_metric:
        print(f"optimized_metric {cfg.optimized_metric}: {value}")
    return value


if __name__ == "__main__":
    main()
