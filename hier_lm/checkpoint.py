"""Checkpoints: atomic writes, finding them from a run folder, safe reading, export, and `load` of a trained model.

A checkpoint is one file, or under FSDP2 (`trainer=fsdp`) a sharded folder `<name>.ckpt/` (one `.distcp`
shard per rank, `.metadata`, and `meta.pt` with everything but the weights and optimizer states), which
`load` reads directly and `python -m hier_lm.checkpoint consolidate <folder> [out.ckpt]` turns into one file.

Reading never runs code: every read (`load`, `sample`, `evaluate`, a resume through Lightning) unpickles with
`torch.load(weights_only=True)`, which builds only tensors and plain containers and refuses any other class or
function a file names. A hier_lm checkpoint holds nothing else (configs are saved as plain dicts and lists, the
NumPy RNG state as a tensor), so torch's default allow-list is all it needs; a file that names anything more is
refused with a one-line error (`safe_load`).

`python -m hier_lm.checkpoint export <run or ckpt> <dir>` writes the weights with no pickle at all:
`<dir>/model.safetensors`, `<dir>/config.json` (the model config, the data and optimizer settings) and, for a
subword (LM1B) model, `<dir>/tokenizer.json`. `load`, `sample` and `evaluate` read such a folder too.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from hier_lm.data.lm1b.tokenizer import STATE_KEY, tokenizer_from_checkpoint
from hier_lm.files import atomic_torch_save
from hier_lm.models import build_model
from hier_lm.tasks.language_model import CHECKPOINT_KEY

SHARDED_META = "meta.pt"  # the non-tensor part of a sharded checkpoint (Lightning's name)
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
EXPORT_FORMAT = "hier_lm export 1"  # `format` in an export's config.json
UNREADABLE_FIX = "give a checkpoint written by hier_lm (a truncated or damaged copy cannot be read)"


def _first_line(err: BaseException) -> str:
    """The informative part of a load error, on one line (torch's weights-only errors open with a generic
    paragraph; the reason follows it)."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        paragraphs = paragraphs[1:]
    text = " ".join((paragraphs or [type(err).__name__])[0].split())
    return text.split(". ")[0].removesuffix(".")


def safe_load(file: str | os.PathLike, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """`torch.load(file, weights_only=True)`: only tensors and plain containers are built, no code of the file
    runs. A ValueError naming the file (and the class or function it refers to) for a file that carries
    anything else or is not a torch file. `mmap`: map the tensors instead of reading them (zip-format files:
    what `torch.save` and Lightning write)."""
    try:
        mmap = mmap and zipfile.is_zipfile(file)  # the old (non-zip) format cannot be mapped
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        if named:
            raise ValueError(f"{file} is not a hier_lm checkpoint or carries code (it refers to {named.group(1)}, "
                             "which a checkpoint of tensors and plain values never does): refused without running "
                             "it; only load files you trust with torch.load(weights_only=False)") from None
        raise ValueError(f"{file} is not a readable checkpoint ({_first_line(err)}): {UNREADABLE_FIX}") from None
    except Exception as err:  # truncated file, not a torch file, ...
        raise ValueError(f"{file} is not a readable checkpoint ({_first_line(err)}): {UNREADABLE_FIX}") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves never leave a truncated file behind (an interrupted save keeps
    the previous `last.ckpt`) and whose loads (a resume) are `safe_load`s: a checkpoint that carries code or
    is not a torch file is a one-line ValueError, whatever `weights_only` Lightning asks for."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return safe_load(path, map_location=map_location)


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded checkpoint folder (written under FSDP2: shards and `meta.pt`)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `export` (`model.safetensors` and `config.json`)."""
    return (Path(path) / EXPORT_WEIGHTS).is_file() and (Path(path) / EXPORT_CONFIG).is_file()


def existing_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` if it is a checkpoint (a file, a sharded folder or an export); else the complete previous version
    that an interrupted replacement of a folder leaves as `.<name>.old` (see `publish_folder`); else None."""
    path = Path(path)
    for candidate in (path, _aside(path)):
        if candidate.is_file() or is_sharded(candidate) or is_export(candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint (file, sharded folder or export folder), or a run folder (`<run>/checkpoints/last.ckpt`),
    or a run's `checkpoints/` folder."""
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

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (a resume), with `weights_only=True` whatever is asked, after a `safe_load` of the
        file's pickled part (a sharded folder's `meta.pt`, a file memory-mapped) for a one-line error."""
        path = Path(checkpoint_path)
        safe_load(path / SHARDED_META if is_sharded(path) else path, mmap=True)
        return super().load_checkpoint(checkpoint_path, weights_only=True)

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
    checkpoint = safe_load(folder / SHARDED_META)  # first: a meta.pt that carries code stops everything
    tensors: dict[str, Any] = {}  # filled from the folder's metadata (the public `load` needs a template)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_state_dict(tensors, storage_reader=FileSystemReader(folder), no_dist=True,
                         planner=_EmptyStateDictLoadPlanner(keys=["state_dict"] if model_only else None))
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optimizers = sorted((k for k in tensors if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if optimizers:
        checkpoint["optimizer_states"] = [_numbered_optimizer_state(tensors[k]) for k in optimizers]
    return checkpoint


def read_checkpoint(path: str | os.PathLike, model_only: bool = False) -> tuple[Path, dict]:
    """Resolve and read a hier_lm checkpoint (a file, a sharded folder or an export folder) on CPU, without
    running any code it may carry (`safe_load`); a clear error for another kind of file. Returns the file
    read and the checkpoint dict (an export as the dict of a file: `state_dict` with `model.` keys and
    `hier_lm`). `model_only`: the optimizer states are not needed (a sharded folder skips them, a file is
    memory-mapped so that they are never read)."""
    file = resolve_checkpoint(path)
    if is_export(file):
        return read_export(file)
    if is_sharded(file):
        try:
            checkpoint = read_sharded(file, model_only=model_only)
        except ValueError:
            raise
        except Exception as err:  # missing or truncated shard, ...
            raise ValueError(f"{file} is not a readable checkpoint ({_first_line(err)})") from err
    else:
        checkpoint = safe_load(file, mmap=model_only)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
        raise ValueError(f"{file} is not a hier_lm checkpoint (expected one written by `python -m hier_lm.train`)")
    return file, checkpoint


def model_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint dict: its `state_dict` entries `model.<name>`, as `<name>`."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def check_resumable(ckpt: str | os.PathLike, config: dict) -> None:
    """A one-line ValueError unless the checkpoint `ckpt` can resume the run whose composed config (plain
    containers) is `config`: it must be a readable hier_lm checkpoint that carries no code, of the same model
    family, with weights of the shapes `config["model"]` builds. Cheap: a file is memory-mapped (its tensors are
    not read) and the model built on the meta device (no memory, no initialisation). Options that hold no weights
    (dropout, attention implementation, activation checkpointing) may differ."""
    file, checkpoint = read_checkpoint(ckpt, model_only=True)
    saved = checkpoint[CHECKPOINT_KEY]["model"]
    options = {k: v for k, v in config["model"].items() if k != "activation_checkpointing" and v is not None}
    wanted = {**saved, **options}  # vocab_size (and an image model's max_len) come from the data: as saved
    fix = "resume with the settings it was trained with (its run's config.yaml), or start a new run without resume="
    if wanted.get("name") != saved.get("name"):
        raise ValueError(f"{file} holds a model of family {saved.get('name')!r} but this run's config describes family "
                         f"{wanted.get('name')!r}: {fix}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(wanted).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model_state(checkpoint).items()}
    differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differ:
        shown = ", ".join(f"{k} {found.get(k, 'missing')} vs {expected.get(k, 'none')}" for k in differ[:3])
        raise ValueError(f"{file}: its {saved.get('name')} weights do not fit the model this run's config describes "
                         f"({len(differ)} differ: {shown}{', ...' if len(differ) > 3 else ''}): {fix}")


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
    load_weights(model, model_state(checkpoint), file)
    model.image_size = checkpoint[CHECKPOINT_KEY].get("image_size")
    return model.eval()


def _weights_with_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors stores no tensor twice: `state` without the entries that are the same tensor as an earlier
    one (tied weights, shared parameters), and `{dropped name: name kept}` to restore them."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.contiguous()
    storages = {}
    for name, tensor in tensors.items():  # distinct tensors viewing one storage: give each its own
        if storages.setdefault(tensor.untyped_storage().data_ptr(), name) != name:
            tensors[name] = tensor.clone()
    return tensors, aliases


def export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model of a checkpoint (file, sharded folder or run folder) to the folder `out` with no pickle:
    `model.safetensors` (the weights; tied ones stored once), `config.json` (`format`, the model config, the
    run's data and optimizer settings, an image model's `image_size`) and, for a subword model,
    `tokenizer.json`. Atomic: written into a hidden folder beside `out`, then renamed, so a failed export
    leaves nothing and an earlier export at `out` is replaced whole. Returns `out`."""
    from safetensors.torch import save_file

    file, state = read_checkpoint(checkpoint, model_only=True)
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not is_export(out) and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an export: give a new or empty folder (an earlier export there "
                         f"would be replaced)")
    saved = state[CHECKPOINT_KEY]
    config = {"format": EXPORT_FORMAT, **{k: v for k, v in saved.items() if k != "config"},
              "config": {k: saved["config"][k] for k in ("data", "optim") if k in saved["config"]}}
    tensors, aliases = _weights_with_aliases(model_state(state))
    tokenizer = tokenizer_from_checkpoint(state)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists() or tmp.is_symlink():
        _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, tmp / EXPORT_WEIGHTS, metadata={"source": file.name, "aliases": json.dumps(aliases)})
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            (tmp / EXPORT_TOKENIZER).write_text(tokenizer.to_str(), encoding="utf-8")
        for written in (*tmp.iterdir(), tmp):
            _fsync(written)
        publish_folder(tmp, out)
    finally:
        if tmp.exists():
            _remove(tmp)
    return out


def read_export(folder: str | os.PathLike) -> tuple[Path, dict]:
    """An `export` folder as `read_checkpoint` returns a checkpoint: (its `model.safetensors`, a dict with
    `state_dict` (`model.<name>` keys, tied entries restored), `hier_lm` (model config, data and optimizer
    settings, `image_size`) and, with a tokenizer, the tokenizer's JSON where `tokenizer_from_checkpoint`
    finds it). Nothing in the folder is unpickled."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    file = folder / EXPORT_WEIGHTS
    try:
        config = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / EXPORT_CONFIG} is not valid JSON ({err}): export the checkpoint again") from err
    is_ours = isinstance(config, dict) and config.get("format") == EXPORT_FORMAT
    if not is_ours or not isinstance(config.get("model"), dict):
        raise ValueError(f"{folder / EXPORT_CONFIG} is not a hier_lm export config (expected format "
                         f"{EXPORT_FORMAT!r}, written by `python -m hier_lm.checkpoint export`)")
    try:
        state = load_file(file, device="cpu")
        with safe_open(file, "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({_first_line(err)})") from err
    missing = sorted(set(aliases.values()) - state.keys())
    if missing:
        raise ValueError(f"{file}: its aliases name tensors it does not hold ({', '.join(missing[:3])}): export again")
    state.update({name: state[target] for name, target in aliases.items()})
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in state.items()},
                  CHECKPOINT_KEY: {k: v for k, v in config.items() if k != "format"}}
    if (folder / EXPORT_TOKENIZER).is_file():
        checkpoint["tokenizer"] = {STATE_KEY: (folder / EXPORT_TOKENIZER).read_text(encoding="utf-8")}
    return file, checkpoint


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
    """`python -m hier_lm.checkpoint consolidate <sharded .ckpt folder> [out.ckpt]` and
    `python -m hier_lm.checkpoint export <run folder or checkpoint> <dir>`."""
    parser = argparse.ArgumentParser(prog="python -m hier_lm.checkpoint", description="hier_lm checkpoint tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    merge = commands.add_parser("consolidate", help="write a sharded (FSDP) checkpoint folder as one file")
    merge.add_argument("checkpoint", help="the sharded folder, e.g. runs/<recipe>/<run>/checkpoints/last.ckpt")
    merge.add_argument("out", nargs="?", default=None,
                       help="the file to write (default: <folder stem>.consolidated.ckpt beside the folder)")
    share = commands.add_parser("export", help="write a checkpoint's model as model.safetensors + config.json "
                                               "(no pickle), which load, sample and evaluate read")
    share.add_argument("checkpoint", help="a run folder, a .ckpt file or a sharded checkpoint folder")
    share.add_argument("out", help="the folder to write (replaced if it holds an earlier export)")
    args = parser.parse_args(argv)
    try:
        out = (consolidate if args.command == "consolidate" else export)(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
