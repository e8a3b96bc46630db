"""Checkpoints: atomic writes, finding them from a run folder, and `load` of a trained model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from hier_lm.models import build_model
from hier_lm.tasks.language_model import CHECKPOINT_KEY


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through `atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves never leave a truncated file behind (an interrupted save keeps
    the previous `last.ckpt`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (`<run>/checkpoints/last.ckpt`), or a run's `checkpoints/` folder."""
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise FileNotFoundError(f"no checkpoint in {path}: expected {path / 'checkpoints' / 'last.ckpt'}")
    raise FileNotFoundError(f"checkpoint not found: {path} (expected a .ckpt file or a run folder)")


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """Resolve and read a hier_lm checkpoint on CPU; a clear error for another kind of file."""
    file = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated file, not a torch file, ...
        raise ValueError(f"{file} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{file} is not a hier_lm checkpoint (expected one written by `python -m hier_lm.train`)")
    return file, checkpoint


def load(path: str | os.PathLike) -> nn.Module:
    """The trained model of a checkpoint file or run folder, on CPU, in eval mode."""
    file, checkpoint = read_checkpoint(path)
    model = build_model(checkpoint[CHECKPOINT_KEY]["model"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{file}: its weights do not fit the model its config describes ({err})") from err
    return model.eval()
