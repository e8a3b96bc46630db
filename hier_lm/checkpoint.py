"""Checkpoints: atomic writes, finding them from a run folder, and `load` of a trained model.

A checkpoint is one file, or under FSDP2 (`trainer=fsdp`) a sharded folder `<name>.ckpt/` (one `.distcp`
shard per rank, `.metadata`, and `meta.pt` with everything but the weights and optimizer states), which
`load` reads directly and `python -m hier_lm.checkpoint consolidate <folder> [out.ckpt]` turns into one file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from hier_lm.files import atomic_torch_save
from hier_lm.models import build_model
from hier_lm.tasks.language_model import CHECKPOINT_KEY

SHARDED_META = "meta.pt"  # the non-tensor part of a sharded checkpoint (Lightning's name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves never leave a truncated file behind (an interrupted save keeps
    the previous `last.ckpt`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded checkpoint folder (written under FSDP2: shards and `meta.pt`)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def existing_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` if it is a checkpoint (a file or a sharded folder); else the complete previous version that an
    interrupted replacement of a sharded folder leaves as `.<name>.old` (see `publish_folder`); else None."""
    path = Path(path)
    for candidate in (path, _aside(path)):
        if candidate.is_file() or is_sharded(candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint (file or sharded folder), or a run folder (`<run>/checkpoints/last.ckpt`), or a run's
    `checkpoints/` folder."""
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if (found := existing_checkpoint(candidate)) is not None:
            return found
    if path.is_dir():
        raise FileNotFoundError(f"no checkpoint in {path}: expected {path / 'checkpoints' / 'last.ckpt'}")
    raise FileNotFoundError(f"checkpoint not found: {path} (expected a .ckpt file or a run folder)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish_folder(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`. For a new name that is one atomic rename. An existing `path`
    is first renamed aside to `.<name>.old`, then `tmp` is renamed to `path`, then the old one is deleted, so
    that at every moment `path` or `.<name>.old` is complete (`existing_checkpoint` finds whichever it is)."""
    old = _aside(path)
    if path.exists() or path.is_symlink():
        if old.exists():
            _remove(old)  # `path` is complete, so this is a leftover
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(path.parent)  # the renames reach the disk
    if old.exists():
        _remove(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as FSDP2 data parallelism over every process (tensor parallel size
    1): `LanguageModelTask.configure_model` applies `fully_shard` to each block and the root.

    `save_distributed_checkpoint=True` (default): each `<name>.ckpt` is a sharded folder. Every rank writes
    its shard into `.<name>.ckpt.tmp/`, rank 0 adds `meta.pt`; after a barrier rank 0 fsyncs the files and
    publishes the folder with `publish_folder`: an interrupted save never leaves a partial `<name>.ckpt`,
    and replacing `last.ckpt` always keeps one complete copy. `False`: rank 0 gathers the full state into
    one file, written by the trainer's (atomic) checkpoint IO.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.is_global_zero and (tmp.exists() or tmp.is_symlink()):
            _remove(tmp)  # left by an interrupted save
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every shard written
        if self.is_global_zero:
            for file in (*tmp.iterdir(), tmp):
                _fsync(file)  # on disk before the folder is published (the shards are already)
            publish_folder(tmp, path)
        self.barrier()


def _numbered_optimizer_state(state: dict) -> dict:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's) in torch's own
    format: parameters numbered 0, 1, ... in the order of the parameter groups."""
    ids: dict[str, int] = {}
    groups = [{**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def read_sharded(folder: str | os.PathLike, model_only: bool = False) -> dict:
    """A sharded checkpoint folder as the checkpoint dict of one file, assembled in CPU memory: `state_dict`
    (full tensors), `optimizer_states` (in torch's format, so a single-process run can resume from it) and
    the rest from `meta.pt`. `model_only`: read the model's weights only (no optimizer states)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    tensors: dict[str, Any] = {}  # filled from the folder's metadata (the public `load` needs a template)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_state_dict(tensors, storage_reader=FileSystemReader(folder), no_dist=True,
                         planner=_EmptyStateDictLoadPlanner(keys=["state_dict"] if model_only else None))
    checkpoint = torch.load(folder / SHARDED_META, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optimizers = sorted((k for k in tensors if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if optimizers:
        checkpoint["optimizer_states"] = [_numbered_optimizer_state(tensors[k]) for k in optimizers]
    return checkpoint


def read_checkpoint(path: str | os.PathLike, model_only: bool = False) -> tuple[Path, dict]:
    """Resolve and read a hier_lm checkpoint (a file or a sharded folder) on CPU; a clear error for another
    kind of file. `model_only` skips the optimizer states of a sharded folder (a file is read whole)."""
    file = resolve_checkpoint(path)
    try:
        if is_sharded(file):
            checkpoint = read_sharded(file, model_only=model_only)
        else:
            checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated file, not a torch file, missing shard, ...
        raise ValueError(f"{file} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{file} is not a hier_lm checkpoint (expected one written by `python -m hier_lm.train`)")
    return file, checkpoint


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """`module.load_state_dict(state)` (strict); a ValueError naming the checkpoint `file` where they do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{file}: its weights do not fit the model its config describes ({err})") from err


def load(path: str | os.PathLike) -> nn.Module:
    """The trained model of a checkpoint file or run folder, on CPU, in eval mode. `model.image_size` is the
    image size of an image model (`hier_lm.tasks.ImageModelTask`), None for a text model."""
    file, checkpoint = read_checkpoint(path, model_only=True)
    model = build_model(checkpoint[CHECKPOINT_KEY]["model"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    load_weights(model, state, file)
    model.image_size = checkpoint[CHECKPOINT_KEY].get("image_size")
    return model.eval()


def consolidate(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write a sharded checkpoint folder (or the sharded `last.ckpt` of a run folder) as one file, atomically
    (default: `<name>.consolidated.ckpt` beside the folder), which `load`, `hier_lm.sample`, `hier_lm.evaluate`
    and a single-process resume read. Returns the file."""
    folder = resolve_checkpoint(checkpoint)
    if not is_sharded(folder):
        raise ValueError(f"{folder} is a single-file checkpoint already: there is nothing to consolidate")
    name = folder.name.removeprefix(".").removesuffix(".old").removesuffix(".ckpt")
    out = Path(out) if out is not None else folder.with_name(f"{name}.consolidated.ckpt")
    _, state = read_checkpoint(folder)
    atomic_torch_save(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m hier_lm.checkpoint consolidate <sharded .ckpt folder> [out.ckpt]`."""
    parser = argparse.ArgumentParser(prog="python -m hier_lm.checkpoint", description="hier_lm checkpoint tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    merge = commands.add_parser("consolidate", help="write a sharded (FSDP) checkpoint folder as one file")
    merge.add_argument("checkpoint", help="the sharded folder, e.g. runs/<recipe>/<run>/checkpoints/last.ckpt")
    merge.add_argument("out", nargs="?", default=None,
                       help="the file to write (default: <folder stem>.consolidated.ckpt beside the folder)")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
