"""Training entry point: `python -m hier_lm.train recipe=<name> key=value ...` (Hydra 1.3).

A run lives in `<runs_dir>/<recipe>/<timestamp>/`: `config.yaml`, `checkpoints/{last,step_<N>}.ckpt`,
logs and samples. `<runs_dir>/<recipe>/last` points to the newest run. `resume=auto` continues it.
"""

from __future__ import annotations

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

from hier_lm.callbacks import FinalCheckpoint, RNGState, TextSamples, Throughput
from hier_lm.checkpoint import AtomicCheckpointIO, atomic_write_text, resolve_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_user_error, register_recipes
from hier_lm.loggers import build_logger
from hier_lm.tasks import LanguageModelTask


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
        if cfg.resume == "auto" and (latest / "checkpoints" / "last.ckpt").is_file():
            run_dir = latest.resolve()
            return run_dir, run_dir / "checkpoints" / "last.ckpt"
        if cfg.resume == "auto":
            print(f"resume=auto: no earlier run of {recipe!r} under {group}, starting a new one")
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _new_run_dir(group)
        return run_dir, None
    ckpt = resolve_checkpoint(cfg.resume).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir, ckpt


def train(cfg: DictConfig, recipe: str = "custom") -> Path:
    """Train (or resume) the run described by the composed config; returns the run folder."""
    run_dir, ckpt_path = resolve_run(cfg, recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.parent == Path(cfg.runs_dir) / recipe:
        _point_last(run_dir.parent, run_dir)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run folder: {run_dir}" + (f"  (resuming from {ckpt_path})" if ckpt_path else ""))
    config = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    task = LanguageModelTask(
        model={**config["model"], "vocab_size": datamodule.vocab_size},
        optim=config["optim"],
        metric=datamodule.metric,
        config=config,
    )
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
        Throughput(),
        RNGState(),
        LearningRateMonitor(logging_interval="step"),
    ]
    if datamodule.metric == "bpc":
        callbacks.append(TextSamples(run_dir, **config["samples"], seed=cfg.seed))
    logger = build_logger(cfg.logger, run_dir, run_name=f"{recipe}-{run_dir.name}")
    trainer = L.Trainer(
        **config["trainer"],
        default_root_dir=run_dir,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # flush the run's files (offline runs included)
    print(f"done: {trainer.global_step} steps; checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}")
    return run_dir


register_recipes()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg, recipe=HydraConfig.get().runtime.choices.get("recipe") or "custom")


if __name__ == "__main__":
    main()
