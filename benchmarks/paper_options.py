"""Paper options A/B: H-Transformer-1D attention dropout, FLASH relu^2 scaling and relative position bias.

    python -m benchmarks run paper_options --threads 1         # the five arms below, 500 steps, 2 seeds
    python -m benchmarks.paper_options --steps 400 --arms flash flash_paper_scaling

Each arm is a quickstart recipe (`quickstart_h_transformer`, `quickstart_flash`: the quickstart corpus, the
standard library's source) with one option changed; by default at a size that fits about 20 minutes of a shared
2-core CPU for all five arms: d 64 (FLASH s = 32), 128-byte windows, batch 8 (`--set`, `--seq-len`, `--batch-size`
take the recipes' own sizes back: d 128, 256, 32):

    h_transformer                  attn_dropout 0 (hier_lm's default)
    h_transformer_attn_dropout     attn_dropout 0.1 (the official code: its dropout rate, on the attention weights)
    flash                          relu2_scaling "sqrt_s", no relative bias (hier_lm's defaults)
    flash_paper_scaling            relu2_scaling "paper": relu(qk / C + b)^2 (the appendix)
    flash_rel_pos_bias             rel_pos_bias: the learned relative bias inside the relu, beside RoPE

Every arm is trained once per `--seeds` seed (`torch.manual_seed(seed)` before the model is built: an arm and
its baseline start from the same weights, except that an arm with extra parameters draws them in between, so its
other weights differ), reads the same batches in the same order (one stream, each batch fed to every arm and
seed), and has the recipe's optimiser with a linear warm-up and a cosine over `--steps`. The spread between seeds
is the noise floor of the differences. The arms train interleaved, one step each in turn, so that the shared
machine's load hits them alike: the seconds per step are comparable ratios. Every `--steps / --evals` steps each
arm is scored on the same first `--val-bytes` of the valid split (non-overlapping windows of `--seq-len`, the
first byte of each window without context; dropout off). Writes `benchmarks/results/paper_options.{json,md,png}`.
Short runs on a small corpus: a regulariser such as dropout is not expected to pay off within them. On a shared
machine run it with `--threads 1`: several busy processes each spinning two OpenMP threads slowed it tenfold.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm import tqdm

from benchmarks.common import RESULTS, markdown_table, optimizer_step, publish, pyplot, save_figure
from benchmarks.same_compute import bpc
from hier_lm.config import compose_train_config
from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer

# name: (recipe, overrides, the arm it is compared with)
ARMS: dict[str, tuple[str, list[str], str | None]] = {
    "h_transformer": ("quickstart_h_transformer", ["model.attn_dropout=0.0"], None),
    "h_transformer_attn_dropout": ("quickstart_h_transformer", ["model.attn_dropout=0.1"], "h_transformer"),
    "flash": ("quickstart_flash", ["model.relu2_scaling=sqrt_s", "model.rel_pos_bias=false"], None),
    "flash_paper_scaling": ("quickstart_flash", ["model.relu2_scaling=paper", "model.rel_pos_bias=false"], "flash"),
    "flash_rel_pos_bias": ("quickstart_flash", ["model.relu2_scaling=sqrt_s", "model.rel_pos_bias=true"], "flash"),
}
SMALL = ["model.d_model=64", "model.d_ff=256", "model.s=32"]  # default: ~20 minutes of a busy 2-core CPU
QUICK = ["--steps", "4", "--evals", "2", "--seeds", "0", "--batch-size", "2", "--seq-len", "32", "--val-bytes", "2048",
         "--set", "model.d_model=32", "model.n_layers=1", "model.s=16", "model.chunk_size=8", "model.block_size=4"]
FAMILY_KEYS = {  # the model options of `--set` that each family takes (the other family's are dropped for it)
    "quickstart_h_transformer": {"d_model", "n_layers", "n_heads", "d_ff", "block_size", "dropout"},
    "quickstart_flash": {"d_model", "n_layers", "s", "chunk_size", "expansion", "dropout"},
}


class Arm:
    """One model under training: its config, model (built from `seed`), optimiser and schedule, curve and
    training seconds."""

    def __init__(self, name: str, seed: int, args):
        recipe, overrides, self.baseline = ARMS[name]
        extra = [x for x in args.set if not x.startswith("model.") or x.split("=")[0][6:] in FAMILY_KEYS[recipe]]
        self.name, self.seed, self.options = name, seed, overrides
        self.cfg = compose_train_config([f"recipe={recipe}", f"data.seq_len={args.seq_len}",
                                         f"data.batch_size={args.batch_size}", *overrides, *extra])
        self.curve: list[dict] = []
        self.seconds = 0.0

    def build(self, vocab_size: int, steps: int) -> None:
        """The model (seeded), the recipe's AdamW and its warm-up + cosine over `steps`."""
        torch.manual_seed(self.seed)
        self.model = build_model({**self.cfg.model, "vocab_size": vocab_size}).train()
        optim = dict(self.cfg.optim)
        optim["warmup_steps"] = min(optim["warmup_steps"], max(1, steps // 5))
        self.optimizer, self.scheduler = build_optimizer(self.model, steps, **optim)

    def step(self, batch: torch.Tensor) -> None:
        start = time.perf_counter()
        optimizer_step(self.model, self.optimizer, batch, self.cfg.trainer.gradient_clip_val)
        self.scheduler.step()
        self.seconds += time.perf_counter() - start


def study(args) -> dict:
    arms = [Arm(name, seed, args) for seed in args.seeds for name in args.arms]
    data = instantiate(arms[0].cfg.data)  # the arms' recipes share their data: one stream of batches for all
    data.prepare_data()
    data.setup("fit")
    valid = torch.from_numpy(data.corpus.split("valid").astype("int64"))[: args.val_bytes]
    for arm in arms:
        arm.build(data.vocab_size, args.steps)
        print(f"[{arm.name}, seed {arm.seed}] {' '.join(arm.options)}: "
              f"{sum(p.numel() for p in arm.model.parameters()):,} parameters", flush=True)
    every = max(1, args.steps // args.evals)
    batches = iter(data.train_dataloader())
    for step in tqdm(range(args.steps + 1), desc="paper_options", unit="step"):
        if step % every == 0 or step == args.steps:
            for arm in arms:
                arm.curve.append({"step": step, "bpc": bpc(arm.model, valid, args.seq_len)})
        if step == args.steps:
            break
        batch = next(batches)
        for arm in arms:  # interleaved: one step of each in turn
            arm.step(batch)
    runs = [{"name": arm.name, "seed": arm.seed, "options": arm.options, "baseline": arm.baseline,
             "parameters": sum(p.numel() for p in arm.model.parameters()), "seconds_per_step": arm.seconds / args.steps,
             "curve": arm.curve, "valid_bpc": arm.curve[-1]["bpc"]} for arm in arms]
    return {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "val_bytes": valid.numel(),
            "set": args.set, "seeds": args.seeds, "runs": runs, "arms": summary(runs, args.arms, args.seeds)}


def summary(runs: list[dict], names: list[str], seeds: list[int]) -> list[dict]:
    """Per arm: the mean valid bpc over the seeds, each seed's, and the mean of the per-seed differences from its
    baseline (the same seed: the same initial weights where the arm adds no parameters)."""
    by = {(run["name"], run["seed"]): run for run in runs}
    arms = []
    for name in names:
        mine = [by[name, seed] for seed in seeds]
        baseline = mine[0]["baseline"] if mine[0]["baseline"] in names else None
        arm = {key: mine[0][key] for key in ("name", "options", "parameters")}
        arm.update(baseline=baseline, seeds_bpc=[run["valid_bpc"] for run in mine],
                   valid_bpc=sum(run["valid_bpc"] for run in mine) / len(mine),
                   seconds_per_step=sum(run["seconds_per_step"] for run in mine) / len(mine),
                   curve=[{"step": point["step"], "bpc": sum(run["curve"][i]["bpc"] for run in mine) / len(mine)}
                          for i, point in enumerate(mine[0]["curve"])])
        if baseline:
            differences = [by[name, seed]["valid_bpc"] - by[baseline, seed]["valid_bpc"] for seed in seeds]
            arm.update(delta_bpc=sum(differences) / len(differences), seeds_delta_bpc=differences)
        arms.append(arm)
    return arms


def markdown(results: dict) -> str:
    arms = {arm["name"]: arm for arm in results["arms"]}
    rows = []
    for arm in results["arms"]:
        base = arms.get(arm["baseline"])
        rows.append([arm["name"], " ".join(arm["options"]), f"{arm['parameters']:,}", round(arm["valid_bpc"], 4),
                     ", ".join(f"{x:.4f}" for x in arm["seeds_bpc"]),
                     (f"{arm['delta_bpc']:+.4f} ({', '.join(f'{x:+.4f}' for x in arm['seeds_delta_bpc'])})"
                      if base else "(baseline)"),
                     round(arm["seconds_per_step"], 3),
                     f"{arm['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "1x"])
    columns = ["arm", "options", "params", "valid bpc (mean)", "per seed", "vs its baseline (per seed)", "s / step",
               "time vs baseline"]
    return (markdown_table(columns, rows)
            + f"\n\n{results['steps']} steps of {results['batch_size']} x {results['seq_len']} bytes per arm and seed "
              f"(seeds {', '.join(map(str, results['seeds']))}: the initial weights and dropout draws; the batches are "
              f"the same for all); valid bpc on the first {results['val_bytes']:,} bytes of the valid split. Arms "
              f"trained interleaved (seconds per step: ratios within this run only)."
            + (f" Overrides of every arm: {' '.join(results['set'])}." if results["set"] else "") + "\n")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    families = {prefix: title for prefix, title in (("h_transformer", "H-Transformer-1D"), ("flash", "FLASH"))
                if any(arm["name"].startswith(prefix) for arm in results["arms"])}
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], families.items()):
        for arm in results["arms"]:
            if arm["name"].startswith(prefix):  # from the first evaluation after step 0 (~8 bpc at the start)
                points = [p for p in arm["curve"] if p["step"] > 0]
                ax.plot([p["step"] for p in points], [p["bpc"] for p in points], marker="o", label=arm["name"])
        ax.set_title(f"{title} (mean of {len(results['seeds'])} seeds)")
        ax.set_xlabel("training step")
        ax.set_ylabel("valid bpc")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    return [f"{arm['name']}: {arm['delta_bpc']:+.3f} bpc vs {arm['baseline']} ({arm['valid_bpc']:.3f}, mean of "
            f"{len(results['seeds'])} seeds, {results['steps']} steps)" for arm in results["arms"] if arm["baseline"]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which arms to train")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="every arm is trained once per seed")
    parser.add_argument("--steps", type=int, default=500, help="training steps per arm")
    parser.add_argument("--evals", type=int, default=5, help="evaluations along the way (plus the start)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-bytes", type=int, default=1 << 15, help="bytes of the valid split scored")
    parser.add_argument("--set", nargs="+", default=SMALL, metavar="KEY=VALUE",
                        help="overrides of every arm, e.g. data.paths=[...] (each family takes its own model.* keys); "
                             f"default: {' '.join(SMALL)}")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.evals < 1:
        parser.error("--steps and --evals must be >= 1")
    return publish("paper_options", study(args), markdown, plot, args.out)


if __name__ == "__main__":
    main()
