"""Saving and restoring checkpoints: the safe reads (no code runs) against the old `weights_only=False` path.

    python -m benchmarks.checkpoint_io                                    # quickstart and enwik8_hourglass (123M)
    python -m benchmarks.checkpoint_io --recipes quickstart --repeats 5

For each recipe's model (`--recipes`; vocabulary 256) a checkpoint as training writes it: the weights, AdamW's
two moment buffers per parameter, the run config, the RNG states. Measured on this machine (CPU), interleaved
(every operation once per repeat, in turn), best of `--repeats`, the files in the page cache (as they are right
after a save):
- save: the checkpoint file (`atomic_torch_save`, what the trainer's checkpoint IO does: unchanged) and an
  `export` folder (safetensors + JSON);
- resume: reading the whole file, old (`torch.load(weights_only=False)`) and new (`safe_load`: weights-only
  unpickling, Lightning's read through `AtomicCheckpointIO`), plus `check_resumable` (the checks before a
  resume: family and weight shapes, the file memory-mapped, the model built on the meta device);
- load the model (what `hier_lm.load`, `sample` and `evaluate` do): old (read the whole file unsafely, build,
  load the weights) and new (`hier_lm.load`: weights-only and memory-mapped, so the optimizer states are never
  read), and `hier_lm.load` of the export.

Writes `benchmarks/results/checkpoint_io.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

import hier_lm
from benchmarks.common import RESULTS, load_average, markdown_table, publish, pyplot, save_figure, timed_interleaved
from hier_lm.callbacks import RNGState
from hier_lm.checkpoint import AtomicCheckpointIO, check_resumable, export, model_state
from hier_lm.config import compose_train_config
from hier_lm.files import atomic_torch_save
from hier_lm.models import build_model
from hier_lm.tasks import CHECKPOINT_KEY

QUICK = ["--recipes", "quickstart", "--repeats", "1"]
# (row, old operation or None, new operation): the old and new ways of each step, side by side.
OPERATIONS = (("save checkpoint", None, "save"), ("save export (safetensors)", None, "export"),
              ("resume: read the file", "read_unsafe", "read_safe"), ("resume: check_resumable", None, "check"),
              ("load model from the file", "load_unsafe", "load_safe"), ("load model from the export", None,
                                                                          "load_export"))


def training_checkpoint(recipe: str) -> tuple[dict, dict]:
    """(a checkpoint dict of `recipe`'s model as training writes it, the run config), one AdamW step taken."""
    config = OmegaConf.to_container(compose_train_config([f"recipe={recipe}"]), resolve=True)
    model_config = {**config["model"], "vocab_size": 256}
    model_config.pop("activation_checkpointing", None)
    torch.manual_seed(0)
    model = build_model(model_config)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the two moment buffers of every parameter
    checkpoint = {"epoch": 0, "global_step": 1, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "optimizer_states": [optimizer.state_dict()], "callbacks": {"RNGState": RNGState._local()},
                  CHECKPOINT_KEY: {"model": model_config, "config": config}}
    return checkpoint, config


def measure(recipe: str, folder: Path, repeats: int) -> dict:
    checkpoint, config = training_checkpoint(recipe)
    model_config = checkpoint[CHECKPOINT_KEY]["model"]
    file, out = folder / f"{recipe}.ckpt", folder / f"{recipe}_export"
    atomic_torch_save(checkpoint, file)

    def load_unsafe() -> torch.nn.Module:
        old = torch.load(file, map_location="cpu", weights_only=False)
        model = build_model(old[CHECKPOINT_KEY]["model"])
        model.load_state_dict(model_state(old))
        return model

    operations = {
        "save": lambda: atomic_torch_save(checkpoint, file),
        "export": lambda: export(file, out),
        "read_unsafe": lambda: torch.load(file, map_location="cpu", weights_only=False),
        "read_safe": lambda: AtomicCheckpointIO().load_checkpoint(file),
        "check": lambda: check_resumable(file, config),
        "load_unsafe": load_unsafe,
        "load_safe": lambda: hier_lm.load(file),
        "load_export": lambda: hier_lm.load(out),
    }
    seconds = timed_interleaved(operations, torch.device("cpu"), repeats=repeats)
    return {"recipe": recipe, "model": model_config["name"],
            "parameters": sum(v.numel() for v in build_model(model_config).parameters()),
            "checkpoint_mb": file.stat().st_size / 1e6,
            "export_mb": sum(p.stat().st_size for p in out.iterdir()) / 1e6, "seconds": seconds}


def markdown(results: dict) -> str:
    head = (f"Checkpoints with AdamW states, in the page cache; CPU, best of {results['repeats']} interleaved repeats; "
            f"load average {results['load_1min_before']} before. `new / old` is the time of the safe path over the "
            "old `torch.load(weights_only=False)` path of the same step.")
    rows = []
    for r in results["runs"]:
        s = r["seconds"]
        for name, old, new in OPERATIONS:
            rows.append([f"{r['recipe']} ({r['parameters'] / 1e6:.1f}M, {r['checkpoint_mb']:.0f} MB)", name,
                         f"{s[old]:.3f}" if old else "", f"{s[new]:.3f}", f"{s[new] / s[old]:.2f}" if old else ""])
    return head + "\n\n" + markdown_table(["checkpoint", "step", "old s", "new s", "new / old"], rows)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        names = [name for name, _, _ in OPERATIONS]
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], [r["seconds"][new] for _, _, new in OPERATIONS], height=0.4, label="new")
        ax.barh([i - 0.2 for i in y], [r["seconds"][old] if old else 0 for _, old, _ in OPERATIONS], height=0.4,
                label="old (weights_only=False)")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set(xlabel="seconds (best)", title=f"{r['recipe']}: {r['parameters'] / 1e6:.1f}M parameters")
        ax.legend()
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    lines = []
    for r in results["runs"]:
        s = r["seconds"]
        lines.append(f"{r['recipe']} checkpoint ({r['checkpoint_mb']:.0f} MB): safe resume read "
                     f"{s['read_safe'] / s['read_unsafe']:.2f}x the old time, hier_lm.load "
                     f"{s['load_safe'] / s['load_unsafe']:.2f}x (memory-mapped: optimizer states never read)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "enwik8_hourglass"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    results = {"device": "cpu", "load_1min_before": load_average(), "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory(prefix="hier_lm_ckpt_bench_") as folder:
        for recipe in args.recipes:
            results["runs"].append(measure(recipe, Path(folder), args.repeats))
    return publish("checkpoint_io", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
