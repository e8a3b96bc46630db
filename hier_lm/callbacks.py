"""Lightning callbacks of the training entry point: throughput, text and image samples, RNG state."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from hier_lm.generation import generate
from hier_lm.models import build_model
from hier_lm.image_sampling import sample_images, save_images


def model_flops_per_token(model_config: dict, length: int) -> float:
    """Training FLOPs (forward + backward) per token of `build_model(model_config)` on a sequence of `length`
    tokens, counted by `torch.utils.flop_counter` on a meta-device copy (nothing is computed or allocated):
    every matmul, attention included (the fused attention kernels count as their matmuls)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(model_config)
        tokens = torch.zeros(1, length + 1, dtype=torch.long)
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # noqa: E731
    return measure_flops(model, lambda: model(tokens[:, :-1]), loss) / length


class Throughput(L.Callback):
    """Logs `train/tokens_per_sec`: input tokens of all ranks per wall-clock second between training
    batches (data loading included, validation excluded); and `train/mfu`, model FLOPs utilisation: the
    model FLOPs of those tokens per second over the peak FLOP/s of all the devices, where the peak is known:
    `peak_flops` (per device) if given, else Lightning's table for the run's compute dtype
    (`get_available_flops`: NVIDIA data-centre and RTX GPUs, TPUs; never a CPU).

    The model FLOPs per token are counted once, after the first batch, by `model_flops_per_token` on the
    task's `model_config` at the batch's sequence length: forward and backward of every layer, so also the
    shortened layers and resampling of the hierarchical models, not a 6N rule. Activation-checkpoint
    recomputation is not counted (MFU counts the model's FLOPs, not the hardware's).

    After the first batch, rank 0 prints the batch layout: devices, per-device batch, gradient accumulation
    and the global batch (`sequences * seq_len` tokens per optimizer step).
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self._last: float | None = None
        self._flops_per_token: float | None = None
        self._peak: float | None = None
        self._started, self._restart = False, False

    @staticmethod
    def _input_shape(pl_module, batch) -> tuple[int, int]:
        """(B, L) of the model input of a training batch, as the task reports it (else a `[B, L + 1]` batch)."""
        shape = getattr(pl_module, "last_input_shape", None)
        return tuple(shape) if shape is not None else (batch.shape[0], batch.shape[1] - 1)

    def _start(self, trainer, pl_module, batch_size: int, length: int) -> None:
        self._started = True
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        sequences = batch_size * world * accumulate
        if trainer.is_global_zero:
            print(f"batch: {world} device(s) x {batch_size} sequences x {accumulate} accumulated = global batch "
                  f"of {sequences} x {length} = {sequences * length:,} tokens per optimizer step", flush=True)
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self._peak = self.peak_flops or get_available_flops(pl_module.device, dtype)
        if self._peak and hasattr(pl_module, "model_config"):
            try:
                self._flops_per_token = model_flops_per_token(pl_module.model_config, length)
            except Exception as err:  # an op without a meta kernel, ...
                if trainer.is_global_zero:
                    print(f"train/mfu is not logged: the model FLOPs could not be counted "
                          f"({type(err).__name__}: {err})", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        batch_size, length = self._input_shape(pl_module, batch)
        if not self._started:
            self._start(trainer, pl_module, batch_size, length)
        if self._last is not None:
            tokens_per_sec = batch_size * length * trainer.world_size / (now - self._last)
            pl_module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True)
            if self._flops_per_token:
                mfu = tokens_per_sec * self._flops_per_token / (self._peak * trainer.world_size)
                pl_module.log("train/mfu", mfu, prog_bar=True)
        self._last = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart = True  # do not count the validation (and sampling) time as training time

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restart:
            self._last, self._restart = time.perf_counter(), False


def sampling_model(pl_module) -> nn.Module | None:
    """The model to sample from on rank 0, None on the other ranks: `pl_module.model` itself, or when it is
    sharded (FSDP2) an unsharded copy gathered from every rank, on rank 0's device. Sharded, this is a
    collective: every rank must call it (a sharded forward on rank 0 alone would wait for the others)."""
    from torch.distributed.tensor import DTensor

    model = pl_module.model
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if pl_module.global_rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if pl_module.global_rank != 0:
        return None
    copy = build_model(pl_module.model_config)
    copy.load_state_dict(state)
    return copy.to(pl_module.device)


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
        if trainer.sanity_checking or self.max_new_tokens <= 0:
            return
        model = sampling_model(pl_module)  # None on ranks > 0
        if model is None:
            return
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


class ImageSamples(L.Callback):
    """After each validation, on rank 0 (from `sampling_model`), samples `num_images` images with the cached
    `generate` and saves their grid as `<run>/samples/step_<N>.png` (atomically); also logs it as a W&B image
    when W&B is a logger."""

    def __init__(self, run_dir: str | Path, image_size: int, num_images: int = 8, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        self.dir = Path(run_dir) / "samples"
        self.image_size, self.num_images = image_size, num_images
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.num_images <= 0:
            return
        model = sampling_model(pl_module)  # None on ranks > 0
        if model is None:
            return
        with torch.autocast(pl_module.device.type, enabled=False):
            images = sample_images(model, self.image_size, self.num_images, temperature=self.temperature,
                                   top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        step = trainer.global_step
        (path,) = save_images(images, self.dir / f"step_{step}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[f"step {step}"])


def sample_callback(datamodule, run_dir: str | Path, samples: dict, seed: int) -> L.Callback | None:
    """The samples of a run's validations for its data: image grids (`metric == "bpd"`, from
    `samples.num_images`, `temperature`, `top_k`, `top_p`), text (`"bpc"`, byte data), none otherwise."""
    samples = dict(samples)
    num_images = samples.pop("num_images", 8)
    if datamodule.metric == "bpd":
        return ImageSamples(run_dir, datamodule.image_size, num_images, samples.get("temperature", 1.0),
                            samples.get("top_k"), samples.get("top_p"), seed=seed)
    if datamodule.metric == "bpc":
        return TextSamples(run_dir, **samples, seed=seed)
    return None


class RNGState(L.Callback):
    """Saves the process RNG states (Python, NumPy, torch CPU and CUDA) in checkpoints and restores them
    on resume, so that dropout draws after a resume are the ones an uninterrupted run would make. With
    several processes, every rank's states are gathered into the checkpoint (`{"ranks": [...]}`) and each
    rank restores its own (rank 0's when the checkpoint has fewer ranks than the resumed run)."""

    @staticmethod
    def _local() -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict:  # called on every rank when a checkpoint is saved
        state = self._local()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return state
        buffer = io.BytesIO()
        torch.save(state, buffer)  # gathered as bytes: all_gather_object cannot unpickle tensors
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, buffer.getvalue())
        return {"ranks": [torch.load(io.BytesIO(b), weights_only=True) for b in ranks]}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            state = state["ranks"][rank if rank < len(state["ranks"]) else 0]
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
