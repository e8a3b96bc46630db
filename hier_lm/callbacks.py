"""Lightning callbacks of the training entry point: throughput, text samples, RNG state."""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from hier_lm.generation import generate


class Throughput(L.Callback):
    """Logs `train/tokens_per_sec`: input tokens of all ranks per wall-clock second between training
    batches (data loading included, validation excluded)."""

    def __init__(self):
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch[:, 1:].numel() * trainer.world_size
            pl_module.log("train/tokens_per_sec", tokens / (now - self._last), prog_bar=True)
        self._last = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None  # do not count the validation time as training time


class TextSamples(L.Callback):
    """After each validation, samples a continuation of `prompt` and logs it: a W&B table when W&B is a
    logger, and appended to `<run>/samples.txt` always."""

    def __init__(self, run_dir: str | Path, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0):
        self.path = Path(run_dir) / "samples.txt"
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self._rows: list[list] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.max_new_tokens <= 0:
            return
        model = pl_module.model
        prompt = list(self.prompt.encode("utf-8")) or [ord("\n")]
        with torch.autocast(pl_module.device.type, enabled=False):
            tokens = generate(model, prompt, self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                              seed=self.seed)
        text = bytes(tokens.tolist()).decode("utf-8", errors="replace")
        step = trainer.global_step
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"===== step {step} =====\n{text}\n")
        self._rows.append([step, text])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "text"], data=self._rows)


class RNGState(L.Callback):
    """Saves the process RNG states (Python, NumPy, torch CPU and CUDA) in checkpoints and restores them
    on resume, so that dropout draws after a resume are the ones an uninterrupted run would make."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        random.setstate(state["python"])
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class FinalCheckpoint(L.Callback):
    """Writes `step_<N>.ckpt` and `last.ckpt` at the last training step (`trainer.max_steps`) when the
    periodic `ModelCheckpoint` (every `every_n_steps`) would not, from the same point of the training loop,
    so that resuming a finished run to train it further continues exactly."""

    def __init__(self, dirpath: str | Path, every_n_steps: int):
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == trainer.max_steps and step % self.every_n_steps:
            trainer.save_checkpoint(self.dirpath / f"step_{step}.ckpt")
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
