"""Same compute: Hourglass vs the Transformer baseline trained for the same wall-clock budget, one run.

    python -m benchmarks.same_compute --budget 300
    python -m benchmarks.same_compute --budget 600 --run hourglass quickstart --run transformer quickstart_transformer

Each `--run NAME RECIPE [OVERRIDE ...]` builds the recipe's model, data and optimiser exactly as
`python -m hier_lm.train` would, then trains it on the recipe's training batches for `--budget` seconds of
training time (evaluation time excluded), one run after the other so that they never share the CPU. The
learning-rate schedule is the recipe's warm-up followed by a cosine that ends when the budget does (the step
count is estimated from the speed of the first steps). Every `budget / evals` seconds the bpc is measured on
the same first `--val-bytes` bytes of the valid split (contiguous windows of each model's own length); at the
end on the whole valid split. Writes `benchmarks/results/same_compute.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from benchmarks.common import RESULTS, markdown_table, optimizer_step, write_results
from hier_lm.config import compose_train_config
from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer, lr_factor

DEFAULT_RUNS = [["hourglass", "quickstart"], ["transformer", "quickstart_transformer"]]


@torch.no_grad()
def bpc(model: torch.nn.Module, data: torch.Tensor, seq_len: int, batch_size: int = 32) -> float:
    """Bits per byte of `model` on the bytes `data: LongTensor[N]`, in contiguous windows of `seq_len`
    (each window's first byte is context only)."""
    model.eval()
    n = (data.numel() - 1) // seq_len
    windows = data[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [n, seq_len + 1]
    total = 0.0
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len) / math.log(2)


def train_for(name: str, recipe: str, overrides: list[str], budget: float, evals: int, val_bytes: int) -> dict:
    """Train one recipe for `budget` seconds of training time; return its curve and final numbers."""
    cfg = compose_train_config([f"recipe={recipe}", *overrides])
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    valid = torch.from_numpy(data.corpus.split("valid").astype("int64"))
    model = build_model({**cfg.model, "vocab_size": data.vocab_size})
    seq_len = cfg.data.seq_len
    optim_cfg = dict(cfg.optim)
    optimizer, _ = build_optimizer(model, cfg.trainer.max_steps, **optim_cfg)  # the LR is set below, per step
    total_steps = cfg.trainer.max_steps  # re-estimated from the speed of the first steps
    clip = cfg.trainer.gradient_clip_val
    curve, step, trained, next_eval = [], 0, 0.0, 0.0
    print(f"[{name}] recipe={recipe} {' '.join(overrides)}: {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, seq_len {seq_len}, batch {cfg.data.batch_size}", flush=True)
    batches = iter(data.train_dataloader())
    model.train()
    while True:
        if trained >= next_eval or trained >= budget:
            value = bpc(model, valid[:val_bytes], seq_len)
            curve.append({"seconds": round(trained, 2), "step": step, "tokens": step * cfg.data.batch_size * seq_len,
                          "bpc": value})
            print(f"[{name}] {trained:7.1f} s  step {step:6d}  bpc {value:.4f}", flush=True)
            next_eval += budget / evals
            if trained >= budget:
                break
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = optim_cfg["lr"] * lr_factor(step, optim_cfg["warmup_steps"], total_steps,
                                                      optim_cfg["schedule"], optim_cfg["min_lr_ratio"])
        optimizer_step(model, optimizer, next(batches), clip)
        step += 1
        trained += time.perf_counter() - start
        if step == 10:  # the cosine ends when the budget does
            total_steps = max(step + 1, int(budget / (trained / step)))
    final = bpc(model, valid, seq_len)
    print(f"[{name}] whole valid split: {final:.4f} bpc after {step} steps", flush=True)
    return {"name": name, "recipe": recipe, "overrides": overrides, "model": dict(cfg.model),
            "parameters": sum(p.numel() for p in model.parameters()), "seq_len": seq_len,
            "batch_size": cfg.data.batch_size, "steps": step, "tokens_per_sec": step * cfg.data.batch_size * seq_len / trained,
            "curve": curve, "final_valid_bpc": final}


def plot(runs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = [p["seconds"] for p in run["curve"]]
        ax.plot(xs, [p["bpc"] for p in run["curve"]], marker="o", label=f"{run['name']} ({run['parameters'] / 1e6:.2f}M)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("valid bpc (first bytes of the split)")
    ax.set_title("Same wall-clock budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    parser.add_argument("--evals", type=int, default=10, help="evaluations along the way")
    parser.add_argument("--val-bytes", type=int, default=1 << 18, help="bytes of valid used for the curve")
    parser.add_argument("--run", nargs="+", action="append", metavar="NAME RECIPE [OVERRIDE]",
                        help="a run to compare (repeat); default: hourglass=quickstart, transformer=quickstart_transformer")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    specs = args.run or DEFAULT_RUNS
    if any(len(spec) < 2 for spec in specs):
        parser.error("each --run needs a NAME and a RECIPE, then optional key=value overrides")
    runs = [train_for(spec[0], spec[1], spec[2:], args.budget, args.evals, args.val_bytes) for spec in specs]

    columns = ["model", "params", "seq_len", "steps in budget", "tokens/s", "curve bpc (end)", "valid bpc"]
    rows = [[r["name"], f"{r['parameters'] / 1e6:.2f}M", r["seq_len"], r["steps"], round(r["tokens_per_sec"]),
             round(r["curve"][-1]["bpc"], 4), round(r["final_valid_bpc"], 4)] for r in runs]
    text = markdown_table(columns, rows)
    text += f"\n\nBudget: {args.budget:g} s of training per model (evaluation excluded), one after the other.\n"
    out = Path(args.out)
    write_results("same_compute", {"budget_s": args.budget, "runs": runs}, text, out)
    plot(runs, out / "same_compute.png")
    print(text)
    return runs


if __name__ == "__main__":
    main()
