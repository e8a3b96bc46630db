"""LRA ListOps on CPU: H-Transformer-1D vs the Transformer encoder at the same wall-clock, accuracy curves.

    python -m benchmarks run lra_listops
    python -m benchmarks.lra_listops --budget 420 --max-length 256 --train-examples 16000

ListOps comes from the generator (`hier_lm.data.lra.generate_listops`: the benchmark's grammar), at a reduced
length: expressions of `--min-length < tokens < --max-length` instead of 500 .. 2,000, and `--train-examples`
training examples instead of 96,000. Both models are built by the recipes `lra_listops_h_transformer` and
`lra_listops_transformer` with the same reduced sizes (`--d-model`, `--layers`, `--heads`), trained with the same
AdamW settings and batches. Their training is interleaved in one process, in equal slices of `--slice` seconds
of training time each (the order alternating), until each has trained `--budget` seconds: a change of machine
load hits both alike. Every `budget / evals` seconds of a model's training, its accuracy on the first
`--val-examples` of the valid split is measured (not counted as training time); at the end, on all of valid
and test. Writes `benchmarks/results/lra_listops.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, markdown_table, publish, pyplot, save_figure
from hier_lm.config import compose_train_config
from hier_lm.data.lra import ListOpsDataModule
from hier_lm.tasks import build_task
from hier_lm.tasks.optim import build_optimizer

RECIPES = {"h_transformer": "lra_listops_h_transformer", "transformer": "lra_listops_transformer"}
PAPER = {"transformer": (36.37, "Transformer, LRA leaderboard (2K tokens)"),
         "h_transformer": (49.53, "H-Transformer-1D, its paper (2K tokens)")}
CHANCE = 10.0
QUICK = ["--budget", "2", "--slice", "0.5", "--evals", "2", "--train-examples", "64", "--val-examples", "16",
         "--min-length", "8", "--max-length", "40", "--d-model", "16", "--layers", "1", "--batch-size", "8"]


def model_overrides(args) -> list[str]:
    return [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
            f"model.d_ff={2 * args.d_model}", "model.dropout=0.0", f"classifier.mlp_dim={2 * args.d_model}",
            f"data.seq_len={args.max_length}", f"data.batch_size={args.batch_size}", f"optim.lr={args.lr}",
            f"optim.warmup_steps={args.warmup}", "optim.schedule=constant"]


@torch.no_grad()
def accuracy(task, data: ListOpsDataModule, split: str, limit: int | None = None, batch_size: int = 64) -> float:
    """Accuracy (%) of `task` on the first `limit` examples of `split` (all by default)."""
    source = data._source(split)
    n = len(source) if limit is None else min(limit, len(source))
    task.eval()
    correct = 0
    for start in range(0, n, batch_size):
        batch = source.read(np.arange(start, min(start + batch_size, n)))
        correct += int((task(batch["tokens"], batch["lengths"]).argmax(-1) == batch["labels"]).sum())
    task.train()
    return 100.0 * correct / n


class Run:
    """One model's training state: its task, optimizer, batches, training time and accuracy curve."""

    def __init__(self, name: str, args, data: ListOpsDataModule):
        cfg = compose_train_config([f"recipe={RECIPES[name]}", *model_overrides(args)])
        torch.manual_seed(args.seed)
        self.name, self.task = name, build_task(cfg, data)
        self.optimizer, self.scheduler = build_optimizer(self.task, 10 ** 9, **cfg.optim)
        self.clip = cfg.trainer.gradient_clip_val
        self.batches = iter(data._train_dataset(0, 1, 0))
        self.parameters = sum(p.numel() for p in self.task.parameters() if p.requires_grad)
        self.trained, self.steps, self.curve, self.next_eval = 0.0, 0, [], 0.0

    def step(self) -> float:
        batch = next(self.batches)
        start = time.perf_counter()
        loss = F.cross_entropy(self.task(batch["tokens"], batch["lengths"]), batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.trained += time.perf_counter() - start
        self.steps += 1
        return loss.item()


def train_interleaved(runs: list[Run], data: ListOpsDataModule, args) -> None:
    """Train the runs in alternating slices of `args.slice` training seconds until each has `args.budget`."""
    bar = tqdm(total=round(args.budget * len(runs)), unit="s", desc="training (both models)")
    order = list(runs)
    while any(run.trained < args.budget for run in runs):
        for run in order:
            end = min(args.budget, run.trained + args.slice)
            while run.trained < end:
                if run.trained >= run.next_eval:
                    run.curve.append({"seconds": round(run.trained, 2), "step": run.steps,
                                      "accuracy": accuracy(run.task, data, "valid", args.val_examples)})
                    run.next_eval += args.budget / args.evals
                before = run.trained
                loss = run.step()
                bar.update(round(run.trained) - round(before))
                bar.set_postfix({run.name: f"step {run.steps} loss {loss:.3f}"})
        order.reverse()  # who goes first alternates
    bar.close()
    for run in runs:
        run.curve.append({"seconds": round(run.trained, 2), "step": run.steps,
                          "accuracy": accuracy(run.task, data, "valid", args.val_examples)})


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = [[r["name"], f"{r['parameters'] / 1e3:.0f}k", r["steps"], round(r["steps"] / r["seconds"], 2),
             round(r["curve"][-1]["accuracy"], 2), round(r["valid_accuracy"], 2), round(r["test_accuracy"], 2),
             PAPER[r["name"]][0]] for r in results["runs"]]
    text = markdown_table(["model", "trained params", "steps in budget", "steps/s", "valid acc. (curve end, %)",
                           "valid acc. (%)", "test acc. (%)", "paper, full task (%)"], rows)
    text += (f"\n\nReduced ListOps, generated here: {s['min_length']} < tokens < {s['max_length']} (the benchmark: "
             f"500 .. 2,000), {s['train_examples']:,} training examples (benchmark: 96,000), valid/test "
             f"{s['eval_examples']:,} each; d_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads "
             f"(benchmark: 512, 4, 8), batch {s['batch_size']}, AdamW lr {s['lr']} constant after {s['warmup']} warm-up steps; "
             f"{s['budget']:g} s of training per model, interleaved in {s['slice']:g} s slices in one process, "
             f"{s['threads']} torch thread(s). "
             f"Chance is {CHANCE:.0f}%; always answering the most frequent class of the training set gives "
             f"{results['majority_accuracy']:.1f}% on test. The papers' numbers are for the full task "
             f"(2K tokens, 5,000 steps of batch 32 at width 512 on accelerators), for scale only.\n")
    return text


def headlines(results: dict) -> list[str]:
    s = results["settings"]
    accs = ", ".join(f"{r['name']} {r['test_accuracy']:.1f}% ({r['steps']} steps)" for r in results["runs"])
    return [f"ListOps reduced to < {s['max_length']} tokens, {s['budget']:g} s of CPU training each: test accuracy "
            f"{accs}; chance 10%, most frequent class {results['majority_accuracy']:.1f}%"]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"h_transformer": "tab:blue", "transformer": "tab:orange"}
    for run in results["runs"]:
        xs = [p["seconds"] for p in run["curve"]]
        ax.plot(xs, [p["accuracy"] for p in run["curve"]], marker="o", color=colors[run["name"]],
                label=f"{run['name']} ({run['steps']} steps)")
        value, label = PAPER[run["name"]]
        ax.axhline(value, color=colors[run["name"]], linestyle=":", label=f"{label}: {value}")
    ax.axhline(CHANCE, color="gray", linestyle="--", label=f"chance ({CHANCE:.0f}%)")
    ax.axhline(results["majority_accuracy"], color="black", linestyle="-.", linewidth=0.8,
               label=f"most frequent class, on test ({results['majority_accuracy']:.1f}%)")
    ax.set_xlabel("training time (s), each model")
    ax.set_ylabel("valid accuracy (%)")
    ax.set_title(f"ListOps (reduced: < {results['settings']['max_length']} tokens), same wall-clock, CPU")
    ax.set_ylim(0, 60)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=420.0, help="training seconds per model")
    parser.add_argument("--slice", type=float, default=20.0, help="training seconds per turn")
    parser.add_argument("--evals", type=int, default=12, help="accuracy measurements along the way")
    parser.add_argument("--train-examples", type=int, default=16000)
    parser.add_argument("--eval-examples", type=int, default=1000, help="valid and test examples each")
    parser.add_argument("--val-examples", type=int, default=500, help="valid examples of the curve")
    parser.add_argument("--min-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, more threads "
                        "than free cores make every op wait)")
    parser.add_argument("--root", default=None, help="data cache root (default: $HIER_LM_DATA or data/)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = ListOpsDataModule(generate=True, root=args.root, seq_len=args.max_length,
                             num_examples=[args.train_examples, args.eval_examples, args.eval_examples],
                             min_length=args.min_length, max_length=args.max_length, batch_size=args.batch_size,
                             seed=args.seed)
    data.prepare_data()
    data.setup("fit")
    runs = [Run(name, args, data) for name in RECIPES]
    train_interleaved(runs, data, args)
    train_labels, test_labels = data._source("train").labels(), data._source("test").labels()
    majority = 100.0 * float(np.mean(test_labels == np.bincount(train_labels).argmax()))
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "root")},
               "majority_accuracy": majority, "runs": []}
    results["settings"]["eval_examples"] = args.eval_examples
    for run in runs:
        results["runs"].append({"name": run.name, "recipe": RECIPES[run.name], "parameters": run.parameters,
                                "steps": run.steps, "seconds": round(run.trained, 2), "curve": run.curve,
                                "valid_accuracy": accuracy(run.task, data, "valid"),
                                "test_accuracy": accuracy(run.task, data, "test")})
    return publish("lra_listops", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
