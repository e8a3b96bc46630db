"""Scaling study: the four families at matched parameters, bpc against training FLOPs (and wall-clock).

    python -m benchmarks run scaling_study                          # contexts 1024 and 2048, 5/10/20-minute budgets
    python -m benchmarks.scaling_study --contexts 1024              # the published results: this (~1.8 h on 2 cores),
    python -m benchmarks.scaling_study --contexts 2048 --budgets 2 4 8 --merge      # then this (~1.2 h),
    python -m benchmarks.scaling_study --contexts 1024 --models --merge --variant hourglass_k2 hourglass \\
        "model.hierarchy='1@1 4@2 1@1'"                                              # and this ablation (~30 min),
                                                # again as hourglass_k2_seed1 with seed=1 after the hierarchy
    python -m benchmarks.scaling_study --contexts 1024 --models --merge --variant transformer_seed1 transformer \\
        seed=1 --variant hourglass_seed1 hourglass seed=1 --variant flash_seed1 flash seed=1     # second seeds
    python -m benchmarks.scaling_study --contexts 1024 --budgets 2 4 8 --models transformer hourglass

The question is the papers' own: at the same training compute, does a hierarchical model reach a lower bpc than
a Transformer, and does its lead grow with the context? Every model is trained on the quickstart corpus (the
standard library's source) at each context, with the same tokens per step, learning rate and data order.

- **Matched parameters.** The presets below have ~1.6M non-embedding parameters each (the table prints the exact
  counts); FLASH gets twice the layers, as in the paper, because a GAU has about half a Transformer layer's
  weights. Matched parameters, not matched FLOPs per byte: the hierarchical models then spend fewer FLOPs per
  byte, and the budgets below let them turn that into more steps, which is the claim under test.
- **Budgets in FLOPs.** A budget is a number of training FLOPs (forward + backward of every matmul, counted on
  the meta device by `hier_lm.callbacks.model_flops_per_token`). `--budgets` gives them in minutes of the
  Transformer baseline on this machine at that context: its FLOP/s is measured over a few steps first, then every
  model gets the same FLOPs. The largest default budget is 20 minutes on 2 cores.
- **One run per model, a decay per budget** (warmup-stable-decay): linear warm-up, a constant learning rate, and
  for each budget a branch that decays the rate linearly to zero over the last 20% of that budget's steps, is
  evaluated, and is discarded (the main run goes on from where the branch started). Each budget's number is thus
  a fully annealed run of that length, at the cost of one run of the largest budget plus the short branches.
  A branch reads the batches that follow in the stream; the main run continues after them.
- **Evaluation**: bpc on the same first `--val-bytes` bytes of the valid split for every model, in
  non-overlapping windows of the context (every byte scored once, the first of each window without context).

**Seeds.** Arms that differ only in a `seed=` override (initialisation and data order) are one model: each is
compared with the Transformer of its own seed, and a table of seeds gives every such model's mean, spread and mean
paired difference from the Transformer.

`--merge` adds this invocation's arms to the results already written (replacing those of the same name and
context) and, at a context already measured, reuses its FLOP budgets instead of calibrating again, so an ablation
run later is compared at exactly the same FLOPs.

Writes `benchmarks/results/scaling_study.{json,md,png}`: the table, and bpc vs FLOPs and vs training seconds
(one panel per context; the seconds are measured on this machine, which others may share: the FLOPs axis is the
comparison).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm import tqdm

from benchmarks.common import RESULTS, markdown_table, optimizer_step, publish, pyplot, save_figure
from benchmarks.same_compute import bpc
from hier_lm.callbacks import model_flops_per_token
from hier_lm.config import compose_train_config
from hier_lm.models import build_model
from hier_lm.tasks.optim import param_groups

# name: (recipe whose data and model family it starts from, overrides): ~1.6M non-embedding parameters each.
PRESETS: dict[str, tuple[str, list[str]]] = {
    "transformer": ("quickstart_transformer", ["model.n_layers=8"]),
    "hourglass": ("quickstart", ["model.hierarchy='1@1 4@4 1@1'"]),  # + attention resampling
    "h_transformer": ("quickstart_h_transformer", ["model.n_layers=8"]),
    "flash": ("quickstart_flash", ["model.n_layers=16", "model.chunk_size=128"]),
}
COMMON = ["model.d_model=128", "model.dropout=0.0"]
DECAY_FRACTION = 0.2  # each budget's last 20% of steps decay the learning rate linearly to 0
QUICK = ["--contexts", "64", "--budgets", "0.05", "0.1", "--batch-tokens", "256", "--val-bytes", "4096",
         "--calibration-steps", "2", "--warmup-steps", "2", "--models", "transformer", "hourglass",
         "--set", "model.d_model=32", "model.d_ff=64", "model.n_heads=2"]


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the token embedding and the output head (what 'matched parameters' matches)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] not in ("embed", "head"))


class Arm:
    """One model at one context: its data stream, model, optimiser, FLOPs per step and elapsed training time."""

    def __init__(self, name: str, recipe: str, overrides: list[str], context: int, batch_tokens: int, lr: float):
        batch_size = max(1, batch_tokens // context)
        cfg = compose_train_config([f"recipe={recipe}", f"data.seq_len={context}", f"data.batch_size={batch_size}",
                                    *COMMON, *overrides])
        torch.manual_seed(cfg.seed)
        self.name, self.context, self.batch_size, self.lr, self.seed = name, context, batch_size, lr, cfg.seed
        self.data = instantiate(cfg.data)
        self.data.prepare_data()
        self.data.setup("fit")
        self.model_config = {**cfg.model, "vocab_size": self.data.vocab_size}
        self.model = build_model(self.model_config)
        self.clip = cfg.trainer.gradient_clip_val
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=lr,
                                           betas=tuple(cfg.optim.betas))
        self.flops_per_step = model_flops_per_token(self.model_config, context) * batch_size * context
        self.batches = iter(self.data.train_dataloader())
        self.step, self.seconds = 0, 0.0

    def train_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        self.model.train()
        optimizer_step(self.model, self.optimizer, next(self.batches), self.clip)
        self.seconds += time.perf_counter() - start
        self.step += 1

    def snapshot(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "step": self.step, "seconds": self.seconds})

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds = state["step"], state["seconds"]


def calibrate(arm: Arm, steps: int) -> float:
    """FLOP/s of `arm`'s training steps on this machine (best of `steps` timed steps after one warm-up step);
    the arm is rebuilt afterwards by the caller, so these steps do not count."""
    times = []
    for _ in range(steps + 1):
        before = arm.seconds
        arm.train_step(arm.lr)
        times.append(arm.seconds - before)
    return arm.flops_per_step / min(times[1:])


def run_arm(arm: Arm, budgets: list[float], warmup_steps: int, valid: torch.Tensor) -> list[dict]:
    """Train `arm` on the warmup-stable-decay schedule; one annealed branch per FLOP budget (ascending)."""
    steps = [max(warmup_steps + 2, int(budget // arm.flops_per_step)) for budget in budgets]
    points = []
    bar = tqdm(total=steps[-1], desc=f"{arm.name} @ {arm.context}", unit="step")
    for budget, total in zip(budgets, steps):
        decay_start = max(warmup_steps, int(total * (1 - DECAY_FRACTION)))
        while arm.step < decay_start:
            arm.train_step(arm.lr * min(1.0, (arm.step + 1) / warmup_steps))
            bar.update(max(0, arm.step - bar.n))  # a restored trunk re-counts nothing
        last = total == steps[-1]
        trunk = None if last else arm.snapshot()
        for i in range(total - decay_start):
            arm.train_step(arm.lr * (1 - (i + 1) / (total - decay_start + 1)))
            if last:
                bar.update(1)
        points.append({"budget_flops": budget, "steps": total, "flops": total * arm.flops_per_step,
                       "tokens": total * arm.batch_size * arm.context, "seconds": round(arm.seconds, 1),
                       "bpc": bpc(arm.model, valid, arm.context)})
        bar.write(f"[{arm.name} @ {arm.context}] {total} steps, {points[-1]['flops']:.3g} FLOPs, "
                  f"{arm.seconds:.0f} s: {points[-1]['bpc']:.4f} bpc")
        if trunk is not None:
            arm.restore(trunk)
    bar.close()
    return points


def settings(args) -> dict:
    """What every merged arm must share (`--merge` refuses results made with others)."""
    return {"batch_tokens": args.batch_tokens, "lr": args.lr, "warmup_steps": args.warmup_steps,
            "decay_fraction": DECAY_FRACTION, "val_bytes": args.val_bytes}


def study(args, previous: dict | None = None, save=None) -> dict:
    """Train every requested arm at every context; with `previous` (merged results), reuse its budgets.
    `save(results)` is called after every arm, so a long study interrupted keeps what it finished."""
    specs = {name: (PRESETS[name][0], [*PRESETS[name][1], *args.set]) for name in args.models}
    specs.update({name: (PRESETS[base][0], [*PRESETS[base][1], *args.set, *overrides])
                  for name, base, *overrides in args.variant})
    known = {r["context"]: r for r in previous["runs"]} if previous else {}
    runs = []
    for context in args.contexts:
        if context in known:
            budgets = [p["budget_flops"] for p in known[context]["points"]]
            flops_per_s, minutes = known[context]["baseline_gflops_per_s"] * 1e9, known[context]["budget_minutes"]
            print(f"context {context}: the budgets already measured, " + ", ".join(f"{b:.3g}" for b in budgets)
                  + " FLOPs", flush=True)
        else:
            recipe, overrides = PRESETS["transformer"]
            baseline = Arm("transformer", recipe, [*overrides, *args.set], context, args.batch_tokens, args.lr)
            flops_per_s = calibrate(baseline, args.calibration_steps)
            minutes = sorted(args.budgets)
            budgets = [m * 60 * flops_per_s for m in minutes]
            print(f"context {context}: the Transformer trains at {flops_per_s / 1e9:.2f} GFLOP/s here; budgets "
                  + ", ".join(f"{b:.3g}" for b in budgets) + " FLOPs", flush=True)
        for name, (recipe, overrides) in specs.items():
            arm = Arm(name, recipe, overrides, context, args.batch_tokens, args.lr)
            valid = torch.from_numpy(arm.data.corpus.split("valid")[: args.val_bytes].astype("int64"))
            runs.append({"name": name, "context": context, "recipe": recipe, "overrides": overrides, "seed": arm.seed,
                         "parameters": sum(p.numel() for p in arm.model.parameters()),
                         "non_embedding_parameters": non_embedding_parameters(arm.model),
                         "batch_size": arm.batch_size, "flops_per_token": arm.flops_per_step / (arm.batch_size * context),
                         "baseline_gflops_per_s": flops_per_s / 1e9, "budget_minutes": minutes,
                         "points": run_arm(arm, budgets, args.warmup_steps, valid)})
            if save is not None:
                save(combine(args, previous, runs))
    return combine(args, previous, runs)


def combine(args, previous: dict | None, runs: list[dict]) -> dict:
    """The results: `runs` added to `previous`'s (replacing any of the same name and context), by context."""
    new = {(r["name"], r["context"]) for r in runs}
    kept = [r for r in previous["runs"] if (r["name"], r["context"]) not in new] if previous else []
    return {**settings(args), "runs": sorted(kept + runs, key=lambda r: r["context"])}


def merge_base(args) -> dict | None:
    """The results `--merge` adds to (None without it); an error if they were made with other settings."""
    path = Path(args.out) / "scaling_study.json"
    if not args.merge or not path.exists():
        return None
    previous = json.loads(path.read_text())
    differ = [k for k, v in settings(args).items() if previous.get(k) != v]
    if differ:
        raise SystemExit(f"--merge: {path} was made with other {', '.join(differ)}; use the same or drop --merge")
    return previous


def family(run: dict) -> tuple:
    """What makes arms the same model up to the seed: context, recipe and the overrides other than `seed=`."""
    return run["context"], run["recipe"], tuple(o for o in run["overrides"] if not o.startswith("seed="))


def seed_families(runs: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{family: {seed: run}}, families in the order of their first arm, seeds ascending."""
    families: dict[tuple, dict[int, dict]] = {}
    for run in runs:
        families.setdefault(family(run), {})[run["seed"]] = run
    return {key: dict(sorted(seeds.items())) for key, seeds in families.items()}


def transformer_runs(families: dict[tuple, dict[int, dict]]) -> dict[tuple[int, int], dict]:
    """{(context, seed): run} of the Transformer baseline (the arm named "transformer" and its other seeds), from
    `seed_families`."""
    return {(key[0], seed): run for key, runs in families.items()
            if any(r["name"] == "transformer" for r in runs.values()) for seed, run in runs.items()}


def markdown(results: dict) -> str:
    columns = ["context", "model", "seed", "params (non-emb.)", "FLOPs/byte", "budget", "steps", "tokens", "train s",
               "bpc", "vs Transformer"]
    families = seed_families(results["runs"])
    baselines = transformer_runs(families)
    rows = []
    for r in (run for runs in families.values() for run in runs.values()):  # a model's seeds together
        ref = baselines.get((r["context"], r["seed"]))
        for i, p in enumerate(r["points"]):
            rows.append([r["context"], r["name"], r["seed"], f"{r['non_embedding_parameters'] / 1e6:.2f}M",
                         f"{r['flops_per_token'] / 1e6:.1f}M", f"{r['budget_minutes'][i]:g} min",
                         p["steps"], f"{p['tokens'] / 1e6:.2f}M", p["seconds"], round(p["bpc"], 4),
                         f"{p['bpc'] - ref['points'][i]['bpc']:+.4f}" if ref is not None else ""])
    text = (markdown_table(columns, rows) + "\n\nBudgets are training FLOPs, the same for every model at a context: "
            "minutes of the Transformer baseline on this machine. bpc on the first "
            f"{results['val_bytes']:,} bytes of the valid split. 'vs Transformer': bpc difference from the "
            "Transformer trained with the same seed (initialisation and data order) at the same budget (negative: "
            "better than the Transformer).\n")
    seeds = seed_table(families, baselines)
    return text + (f"\n## Seeds\n\n{seeds}" if seeds else "")


def seed_table(families: dict[tuple, dict[int, dict]], baselines: dict[tuple[int, int], dict]) -> str:
    """Every model trained with several seeds: bpc per seed, mean and spread, and the mean of its same-seed
    differences from the Transformer ("" when no model has more than one seed)."""
    columns = ["context", "model", "seeds", "budget", "bpc per seed", "mean", "spread", "vs Transformer (mean)"]
    rows = []
    for runs in families.values():
        if len(runs) < 2:
            continue
        first = next(iter(runs.values()))
        refs = [baselines.get((first["context"], seed)) for seed in runs]
        for i, minutes in enumerate(first["budget_minutes"]):
            bpcs = [run["points"][i]["bpc"] for run in runs.values()]
            leads = [b - ref["points"][i]["bpc"] for b, ref in zip(bpcs, refs) if ref is not None]
            rows.append([first["context"], first["name"], ", ".join(map(str, runs)), f"{minutes:g} min",
                         " / ".join(f"{b:.3f}" for b in bpcs), f"{sum(bpcs) / len(bpcs):.3f}",
                         f"{max(bpcs) - min(bpcs):.3f}",
                         f"{sum(leads) / len(leads):+.3f}" if len(leads) == len(bpcs) else ""])
    if not rows:
        return ""
    return (markdown_table(columns, rows) + "\n\n'spread': the largest bpc minus the smallest. 'vs Transformer "
            "(mean)': the mean over the seeds of each seed's difference from the Transformer of the same seed.\n")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    contexts = sorted({r["context"] for r in results["runs"]})
    fig, axes = plt.subplots(2, len(contexts), figsize=(5.5 * len(contexts), 8), squeeze=False)
    families = seed_families(results["runs"])
    for col, context in enumerate(contexts):
        for color, runs in enumerate(runs for key, runs in families.items() if key[0] == context):
            name = next(iter(runs.values()))["name"]  # the first seed's arm names the model
            for n, (seed, run) in enumerate(runs.items()):  # a model's other seeds: dashed, in its colour
                style = {"marker": "o", "color": f"C{color % 10}", "linestyle": "--" if n else "-",
                         "label": f"{name}, seed {seed}" if len(runs) > 1 else name}
                bpcs = [p["bpc"] for p in run["points"]]
                axes[0][col].plot([p["flops"] for p in run["points"]], bpcs, **style)
                axes[1][col].plot([p["seconds"] for p in run["points"]], bpcs, **style)
        for row, xlabel in enumerate(("training FLOPs", "training seconds (this machine)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("valid bpc")
            ax.set_title(f"context {context}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="x-small", framealpha=0.7)
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    """The largest budget's bpc of each model against the Transformer, per context."""
    lines = []
    for context in sorted({r["context"] for r in results["runs"]}):
        runs = {r["name"]: r["points"][-1]["bpc"] for r in results["runs"] if r["context"] == context}
        if "transformer" in runs:
            others = ", ".join(f"{name} {value:.3f}" for name, value in runs.items() if name != "transformer")
            lines.append(f"scaling study, context {context}, largest budget: transformer {runs['transformer']:.3f} "
                         f"bpc; {others}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5, 10, 20],
                        help="FLOP budgets, in minutes of the Transformer baseline on this machine")
    parser.add_argument("--models", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME PRESET [OVERRIDE]",
                        help="an extra arm: a preset with overrides (an ablation); repeat")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every arm (after the presets'), e.g. data.paths=[...] to change the corpus")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step (batch = this / context)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--calibration-steps", type=int, default=3)
    parser.add_argument("--val-bytes", type=int, default=1 << 18)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--merge", action="store_true",
                        help="add to the results in --out (same settings), at their budgets where the context is known")
    args = parser.parse_args(argv)
    if any(len(v) < 2 or v[1] not in PRESETS for v in args.variant):
        parser.error(f"each --variant needs a NAME and a PRESET ({', '.join(PRESETS)}), then key=value overrides")
    if any(not math.isfinite(b) or b <= 0 for b in args.budgets):
        parser.error("--budgets must be positive minutes")
    def save(results: dict) -> dict:
        return publish("scaling_study", results, markdown, plot, args.out)

    return study(args, merge_base(args), save)  # written after every arm


if __name__ == "__main__":
    main()
