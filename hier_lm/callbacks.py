"""Lightning callbacks of the training entry point (`recipes/callbacks/default.yaml`): token throughput and MFU,
samples after each validation, RNG state, the final checkpoint; and the two that `hier_lm.train` always adds:
what a run publishes once it has started (`RunStart`) and the checkpoint at an interruption (`Interruption`)."""

from __future__ import annotations

import io
import random
import signal
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from hier_lm.files import atomic_write_text, remove_stale_temporaries
from hier_lm.generation import generate
from hier_lm.image_sampling import image_grid, sample_images, save_png
from hier_lm.models import build_model
from hier_lm.runs import point_last


def model_flops_per_token(model_config: dict, length: int) -> float:
    """Training FLOPs (forward + backward) per token of `build_model(model_config)` on a sequence of `length`
    tokens, counted by `torch.utils.flop_counter` on a meta-device copy (nothing is computed or allocated):
    every matmul, attention included (the fused attention kernels count as their matmuls)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(model_config)
        tokens = torch.zeros(1, length + 1, dtype=torch.long)
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # noqa: E731
    return measure_flops(model, lambda: model(tokens[:, :-1]), loss) / length


class TokenThroughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` over the model's input tokens, logged under hier_lm's names (rank 0):

    - `train/tokens_per_sec`: input tokens of all ranks per wall-clock second between consecutive training
      batches (its rolling window of 2; data loading included). The pause from the training batch before a
      validation to the next one (validation, samples, checkpoints) is left out as a whole;
    - `train/mfu`, model FLOPs utilisation: the model FLOPs of those tokens per second over the peak FLOP/s of
      all the devices, where the peak is known: `peak_flops` (per device) if given, else Lightning's table for
      the run's compute dtype (`available_flops`: NVIDIA data-centre and RTX GPUs, TPUs; never a CPU).

    A batch counts as the task's `last_input_shape` `(B, L)`: its training micro-batch's model input. The model
    FLOPs per token are counted once, after the first batch, by `model_flops_per_token` on the task's
    `model_config` at that `L`: forward and backward of every layer, so also the shortened layers and resampling
    of the hierarchical models, not a 6N rule. Activation-checkpoint recomputation is not counted (MFU counts
    the model's FLOPs, not the hardware's). After the first batch, rank 0 prints the batch layout: devices,
    per-device batch, gradient accumulation and the global batch (`sequences * L` tokens per optimizer step).

    Relies on `ThroughputMonitor`'s internals as of Lightning 2.6: its per-stage `Throughput` and start times
    (`_throughputs`, `_t0s`) and its `_compute`, which this class replaces to log under the names above.
    """

    def __init__(self, peak_flops: float | None = None):
        super().__init__(batch_size_fn=lambda batch: self._shape[0],
                         length_fn=lambda batch: self._shape[0] * self._shape[1], window_size=2)
        self.peak_flops = peak_flops
        self._module_has_flops = False  # the model FLOPs are counted here (train/mfu), not read from the task
        self._shape: tuple[int, int] = (1, 1)
        self._flops_per_token: float | None = None
        self._started, self._paused = False, False
        self._batch_end = 0.0  # when the latest training batch ended (perf_counter)

    def _start_counting(self, trainer, pl_module) -> None:
        """Print the batch layout and count the model FLOPs per token (where a peak is known)."""
        self._started = True
        (batch_size, length), world, accumulate = self._shape, trainer.world_size, trainer.accumulate_grad_batches
        sequences = batch_size * world * accumulate
        print(f"batch: {world} device(s) x {batch_size} sequences x {accumulate} accumulated = global batch "
              f"of {sequences} x {length} = {sequences * length:,} tokens per optimizer step", flush=True)
        if self.peak_flops or self.available_flops:
            try:
                self._flops_per_token = model_flops_per_token(pl_module.model_config, length)
            except Exception as err:  # an op without a meta kernel, ...
                print(f"train/mfu is not logged: the model FLOPs could not be counted "
                      f"({type(err).__name__}: {err})", flush=True)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._shape = tuple(pl_module.last_input_shape)
        if not self._started:
            self._start_counting(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._batch_end = time.perf_counter()  # after the parent's clock reading: a pause from here is never counted

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        """Log the training throughput as `train/tokens_per_sec` (and `train/mfu`) once the window is full."""
        if trainer.state.stage != RunningStage.TRAINING:
            return
        per_device = self._throughputs[RunningStage.TRAINING].compute().get("device/items_per_sec")
        if per_device is None:
            return
        tokens_per_sec = per_device * trainer.world_size
        module = trainer.lightning_module
        module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True)
        if self._flops_per_token:
            peak = (self.peak_flops or self.available_flops) * trainer.world_size
            module.log("train/mfu", tokens_per_sec * self._flops_per_token / peak, prog_bar=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        """Validation is not measured: the whole pause around it is left out (`on_train_batch_start`)."""

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        """See `on_validation_start`."""

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        self._paused = not trainer.sanity_checking

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._paused:  # leave out the time since the training batch before the validation ended
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._batch_end
            self._paused = False


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


class ValidationSamples(L.Callback):
    """After each validation (not the sanity check), samples from the model on rank 0 (`sampling_model`), by the
    task's kind of data:

    - byte text (metric `bpc`): a continuation of `prompt` (`max_new_tokens` bytes), appended to
      `<run_dir>/samples.txt`; also a W&B table and TensorBoard text;
    - images (metric `bpd`): a grid of `num_images` images from the cached `generate`, saved atomically as
      `<run_dir>/samples/step_<N>.png`; also a W&B image and a TensorBoard image;
    - other data (subwords): nothing.

    `temperature`, `top_k`, `top_p` and `seed` apply to both (`recipes/train.yaml` `samples:`).
    """

    def __init__(self, run_dir: str | Path, prompt: str = "\n", max_new_tokens: int = 200, num_images: int = 8,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        self.run_dir = Path(run_dir)
        self.prompt, self.max_new_tokens, self.num_images = prompt, max_new_tokens, num_images
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self._rows: list[list] = []  # (step, text) of every text sample so far: the W&B table

    def on_validation_end(self, trainer, pl_module) -> None:
        count = {"bpc": self.max_new_tokens, "bpd": self.num_images}.get(pl_module.metric, 0)
        if trainer.sanity_checking or count <= 0:
            return
        model = sampling_model(pl_module)  # None on ranks > 0
        if model is None:
            return
        with torch.autocast(pl_module.device.type, enabled=False):
            if pl_module.metric == "bpd":
                self._images(trainer, model, pl_module.image_size)
            else:
                self._text(trainer, model)

    def _text(self, trainer, model: nn.Module) -> None:
        prompt = list(self.prompt.encode("utf-8")) or [ord("\n")]
        tokens = generate(model, prompt, self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed=self.seed)
        text = bytes(tokens.tolist()).decode("utf-8", errors="replace")
        step = trainer.global_step
        with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"===== step {step} =====\n{text}\n")
        self._rows.append([step, text])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "text"], data=self._rows)
            elif isinstance(logger, TensorBoardLogger):  # indented 4 spaces: a Markdown code block, shown verbatim
                logger.experiment.add_text("samples", textwrap.indent(text, "    ", lambda line: True), step)

    def _images(self, trainer, model: nn.Module, image_size: int) -> None:
        images = sample_images(model, image_size, self.num_images, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p, seed=self.seed)
        grid, step = image_grid(images), trainer.global_step  # float [3, H', W'] in [0, 1]
        path = save_png(grid, self.run_dir / "samples" / f"step_{step}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[f"step {step}"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step)


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


class RunStart(L.Callback):
    """What a run publishes only once training starts, after Lightning restored the checkpoint it resumes from
    (rank 0): `<run_dir>/config.yaml` (the text `config_yaml`), and `<group>/last` pointing at the run (when
    `group` is given). A command that fails before (a bad option, a checkpoint that does not fit) leaves the
    previous `config.yaml` and `last` as they were; `started` says whether training started. At every save it
    removes the temporary files a killed process left in the run's checkpoint folders."""

    def __init__(self, run_dir: str | Path, config_yaml: str, group: str | Path | None = None):
        self.run_dir, self.config_yaml = Path(run_dir), config_yaml
        self.group = group and Path(group)
        self.started = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True
        if trainer.is_global_zero:
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
            if self.group:
                point_last(self.group, self.run_dir)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            folders = {self.run_dir / "checkpoints", *(Path(c.dirpath) for c in trainer.checkpoint_callbacks
                                                       if getattr(c, "dirpath", None))}
            for folder in folders:
                remove_stale_temporaries(folder)


class Interruption(L.Callback):
    """SIGINT (Ctrl-C) and SIGTERM stop training at the next step boundary with `<dirpath>/last.ckpt` saved, so
    that `resume=auto` continues exactly; `signum` is the signal received (None if none was), the entry point
    then exits with 128 + it (130, 143).

    Built on Lightning's SIGTERM handling (2.6): its handler sets `trainer.received_sigterm` (and forwards the
    signal to the ranks it launched), and the loops then raise `SIGTERMException` on every rank. From
    `on_train_start` (Lightning has set its handler by then, and restores the previous ones when it tears down)
    both signals come here first: SIGINT takes Lightning's path instead of a KeyboardInterrupt in the middle of a
    step, and a second Ctrl-C stops at once (saves are atomic: the previous `last.ckpt` stays whole). The flag
    is held off during a validation, which Lightning would stop in the middle. The checkpoint (a collective
    save, on every rank) is written where Lightning resumes from exactly: at the end of the step's validation if
    the step has one (as a checkpoint monitoring a validation metric would be), else in `on_exception` after
    the step. (A save after a validated step's end resumes with the logging step off by one in Lightning 2.6.)"""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.signum: int | None = None
        self._lightning = None  # Lightning's SIGTERM handler, while training
        self._passed = False  # whether it was called
        self._saved_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        lightning = signal.getsignal(signal.SIGTERM)
        if not callable(lightning) or threading.current_thread() is not threading.main_thread():
            return
        self._lightning = lightning

        def stop_at_step_end(signum, frame) -> None:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.signum = self.signum or signum
            if not trainer.validating:
                self._pass_on(trainer)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop_at_step_end)

    def _pass_on(self, trainer) -> None:
        """Set Lightning's flag: through its handler the first time, directly after a validation held it."""
        if self._lightning is None:  # training has ended: nothing to stop (the entry point still exits 128 + signum)
            return
        if self._passed:
            trainer._signal_connector.received_sigterm = True
        else:
            self._passed = True
            self._lightning(self.signum, None)

    def _save(self, trainer) -> None:
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"{signal.Signals(self.signum).name}: stopping after step {trainer.global_step}, saved {path}; "
                  f"continue with resume=auto (or resume={self.dirpath.parent})", flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._lightning and trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False  # held until the validation ends

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._lightning and self.signum:
            self._save(trainer)
            self._pass_on(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._lightning and self.signum and not trainer.received_sigterm:
            self._pass_on(trainer)  # received after the validation's end, before its loop returned

    def on_train_end(self, trainer, pl_module) -> None:
        self._lightning = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._lightning and isinstance(exception, SIGTERMException):
            self.signum = self.signum or signal.SIGTERM
            if self._saved_step != trainer.global_step:
                self._save(trainer)
