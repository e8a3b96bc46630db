"""Training entry point: `python -m hier_lm.train recipe=<name> key=value ...` (Hydra 1.3).

A run lives in `<runs_dir>/<recipe>/<timestamp>/`: `config.yaml`, `checkpoints/{last,step_<N>}.ckpt`,
logs and samples. `<runs_dir>/<recipe>/last` points to the newest run. `resume=auto` continues it.

Several devices (`trainer=ddp` or `trainer=fsdp`, `trainer.devices=N`): Lightning starts this script again
for ranks 1..N-1 with the same arguments; rank 0 resolves the run folder and the checkpoint to resume from
and hands both to them (`RUN_ENV`), so that every rank writes the same run. Under an external launcher
(torchrun, SLURM, several nodes) pass `run_dir=` (and `resume=<checkpoint>`) explicitly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from hier_lm.callbacks import FinalCheckpoint, RNGState, Throughput, sample_callback
from hier_lm.checkpoint import AtomicCheckpointIO, existing_checkpoint, resolve_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_user_error
from hier_lm.files import atomic_write_text
from hier_lm.loggers import build_logger
from hier_lm.tasks import build_task

RUN_ENV = "HIER_LM_RUN"  # JSON {"run_dir", "ckpt"}: rank 0's run, for the ranks Lightning launches


def _launched_rank() -> int:
    """The rank a launcher gave this process (Lightning's subprocesses, torchrun, multi-node); 0 otherwise."""
    return max(int(os.environ.get(name) or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _new_run_dir(group: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = group / stamp, 1
    while run_dir.exists():
        run_dir, n = group / f"{stamp}-{n}", n + 1
    return run_dir


def _point_last(group: Path, run_dir: Path) -> None:
    """Atomically make `<group>/last` a symlink to `run_dir`."""
    tmp = group / f".last.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name if run_dir.parent == group else run_dir.resolve())
    os.replace(tmp, group / "last")


def resolve_run(cfg: DictConfig, recipe: str) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh run)."""
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


def train(cfg: DictConfig, recipe: str = "custom") -> Path:
    """Train (or resume) the run described by the composed config; returns the run folder."""
    rank, handed = _launched_rank(), os.environ.get(RUN_ENV)
    if rank > 0 and handed:  # started by rank 0's Lightning launcher: its run
        run = json.loads(handed)
        run_dir, ckpt_path = Path(run["run_dir"]), run["ckpt"] and Path(run["ckpt"])
    elif rank > 0 and not cfg.run_dir and cfg.resume in (None, "auto"):
        raise ValueError(f"this process has rank {rank} from an external launcher: pass run_dir=<folder> (the same "
                         f"on every process) so that all ranks write one run")
    else:
        run_dir, ckpt_path = resolve_run(cfg, recipe)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
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
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step_{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            save_top_k=-1,
            save_last=True,
            enable_version_counter=False,  # last.ckpt is always the newest state, never last-v1.ckpt
        ),
        FinalCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_n_steps),
        Throughput(peak_flops=cfg.get("peak_flops")),
        RNGState(),
        LearningRateMonitor(logging_interval="step"),
    ]
    samples = sample_callback(datamodule, run_dir, config["samples"], cfg.seed)  # image grids or text
    if samples is not None:
        callbacks.append(samples)
    logger = build_logger(cfg.logger, run_dir, run_name=f"{recipe}-{run_dir.name}")
    trainer_kwargs = dict(config["trainer"])
    if isinstance(trainer_kwargs.get("strategy"), dict):  # {_target_: ..., options} (trainer=fsdp)
        trainer_kwargs["strategy"] = instantiate(trainer_kwargs["strategy"])
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=run_dir,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    if rank == 0:  # Lightning launches ranks 1..N-1 inside fit, with a copy of this environment
        os.environ[RUN_ENV] = json.dumps({"run_dir": str(run_dir), "ckpt": ckpt_path and str(ckpt_path)})
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if rank == 0:
            os.environ.pop(RUN_ENV, None)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # flush the run's files (offline runs included)
    if rank == 0:
        print(f"done: {trainer.global_step} steps; checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}")
    return run_dir


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg, recipe=HydraConfig.get().runtime.choices.get("recipe") or "custom")


if __name__ == "__main__":
    main()
