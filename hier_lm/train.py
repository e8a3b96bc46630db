"""Training entry point: `python -m hier_lm.train recipe=<name> key=value ...` (Hydra 1.3).

A run lives in `<runs_dir>/<recipe>/<timestamp>/`: `config.yaml`, `checkpoints/{last,step_<N>}.ckpt`,
logs and samples. `<runs_dir>/<recipe>/last` points to the newest run. `resume=auto` (or Lightning's spelling,
`ckpt_path=auto`) continues it. While a run writes its folder it holds `<run>/.lock` (a second run into the
folder is refused, naming the holder's pid); `config.yaml` and the `last` link are written once training has
started, so a command that fails at start leaves the previous run as it was. SIGINT / SIGTERM save
`last.ckpt` at the next step boundary and exit with 130 / 143.

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

import json
import os
import signal
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from hier_lm.callbacks import Interruption, RunStart
from hier_lm.checkpoint import AtomicCheckpointIO, check_resumable, existing_checkpoint, resolve_checkpoint
from hier_lm.config import (CONFIG_PATH, exit_on_config_error, exit_on_user_error, instantiate_entries,
                            instantiate_option)
from hier_lm.runs import RunLock, new_run_dir, outermost_missing, remove_run_dir
from hier_lm.tasks import build_task

RUN_ENV = "HIER_LM_RUN"  # JSON {"run_dir", "ckpt"}: rank 0's run, for the ranks Lightning launches


def _launched_rank() -> int:
    """The rank a launcher gave this process (Lightning's subprocesses, torchrun, multi-node); 0 otherwise."""
    return max(int(os.environ.get(name) or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _resume_setting(cfg: DictConfig) -> str | None:
    """`resume=`, or `ckpt_path=` (Lightning's name for it); both given with different values is an error."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume is not None and ckpt_path is not None and str(resume) != str(ckpt_path):
        raise ValueError(f"resume={resume} and ckpt_path={ckpt_path} differ: ckpt_path is Lightning's name for "
                         f"resume, give only one of them")
    return resume if resume is not None else ckpt_path


def resolve_run(cfg: DictConfig, recipe: str) -> tuple[Path, Path | None, Path | None]:
    """The run folder, the checkpoint to resume from (None for a fresh run) and the outermost folder created
    here for the run (None when it existed: a resumed run, a `run_dir=` that exists)."""
    group = Path(cfg.runs_dir) / recipe
    if cfg.resume in (None, "auto"):
        latest = group / "last"
        if cfg.resume == "auto" and (ckpt := existing_checkpoint(latest / "checkpoints" / "last.ckpt")):
            return latest.resolve(), ckpt.parent.resolve() / ckpt.name, None
        if cfg.resume == "auto":
            print(f"resume=auto: no earlier run of {recipe!r} under {group}, starting a new one")
        if not cfg.run_dir:
            top = outermost_missing(group)
            run_dir = new_run_dir(group)
            return run_dir, None, top or run_dir
        run_dir = Path(cfg.run_dir)
        top = outermost_missing(run_dir)
        try:
            run_dir.mkdir(parents=True)
            return run_dir, None, top
        except FileExistsError:
            return run_dir, None, None
    ckpt = resolve_checkpoint(cfg.resume)
    ckpt = ckpt.parent.resolve() / ckpt.name  # a sharded last.ckpt is a folder: keep its own name
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir, ckpt, None


def fit(cfg: DictConfig, recipe: str = "custom") -> tuple[Path, dict[str, float]]:
    """Train (or resume) the run described by the composed config. Returns the run folder and the trainer's
    metrics at the end (`trainer.callback_metrics`: the latest `train/...` and `val/...` values).

    Rank 0 holds the run folder's lock (`RunLock`) until it returns. `config.yaml` and the `last` link are written
    once training starts (`RunStart`); a run that fails before removes the folder it created. SIGINT / SIGTERM
    save `last.ckpt` at the next step boundary (`Interruption`), then raise SystemExit(130 / 143)."""
    resume = _resume_setting(cfg)
    every = OmegaConf.select(cfg, "checkpoint.every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint.every_n_steps={every}: give a whole number of steps >= 1 (a checkpoint is "
                         f"also written at the end of training)")
    with open_dict(cfg):
        cfg.resume = cfg.ckpt_path = resume
    rank, handed = _launched_rank(), os.environ.get(RUN_ENV)
    if rank > 0 and handed:  # started by rank 0's Lightning launcher: its run
        run = json.loads(handed)
        run_dir, ckpt_path, created = Path(run["run_dir"]), run["ckpt"] and Path(run["ckpt"]), None
    elif rank > 0 and not cfg.run_dir and resume in (None, "auto"):
        raise ValueError(f"this process has rank {rank} from an external launcher: pass run_dir=<folder> (the same "
                         f"on every process) so that all ranks write one run")
    else:
        run_dir, ckpt_path, created = resolve_run(cfg, recipe)
    if rank > 0:
        created = None  # rank 0's to remove (an externally launched rank may have made it first)
    try:
        lock = RunLock(run_dir) if rank == 0 else None  # only rank 0: the other ranks are the same run
    except ValueError:
        if created:
            remove_run_dir(run_dir, created)
        raise
    start = None
    try:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
            cfg.run_name = cfg.get("run_name") or f"{recipe}-{run_dir.name}"
        config = OmegaConf.to_container(cfg, resolve=True)
        group = Path(cfg.runs_dir) / recipe
        start = RunStart(run_dir, OmegaConf.to_yaml(config), group if run_dir.parent == group else None)
        interruption = Interruption(run_dir / "checkpoints")
        if rank == 0:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            print(f"run folder: {run_dir}" + (f"  (resuming from {ckpt_path})" if ckpt_path else ""))
            if ckpt_path:
                check_resumable(ckpt_path, config)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate_option(cfg.data, "data")
        task = build_task(config, datamodule)  # images (metric bpd) or text, chosen by the data
        callbacks = [*instantiate_entries(cfg.callbacks, "callbacks"), start, interruption]
        loggers = instantiate_entries(cfg.logger, "logger")
        trainer = instantiate_option(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir))
        if rank == 0:  # Lightning launches ranks 1..N-1 inside fit, with a copy of this environment
            os.environ[RUN_ENV] = json.dumps({"run_dir": str(run_dir), "ckpt": ckpt_path and str(ckpt_path)})
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning stopped at a step boundary; `interruption` saved last.ckpt
            interruption.signum = interruption.signum or signal.SIGTERM
            if not start.started:  # stopped before training (the sanity check): a failed start
                raise SystemExit(128 + interruption.signum) from None
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # flush the run's files (offline runs included)
    except BaseException:
        if created and not (start and start.started):  # failed at start: leave no empty run folder behind
            remove_run_dir(run_dir, created)
        raise
    finally:
        if rank == 0:
            os.environ.pop(RUN_ENV, None)
        if lock is not None:
            lock.release()
    if interruption.signum:
        raise SystemExit(128 + interruption.signum)
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


@exit_on_config_error
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
