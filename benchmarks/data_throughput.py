"""Data loader throughput vs what the quickstart model consumes in training, on the same machine, in one run.

    python -m benchmarks.data_throughput                         # the quickstart recipe as shipped
    python -m benchmarks.data_throughput --workers 0 1 2 --batches 500
    python -m benchmarks.data_throughput data.batch_size=64      # any Hydra override of the recipe

The recipe (`--recipe`, default `quickstart`: byte-level windows of the standard library, seq_len 256, batch
32) is composed as `python -m hier_lm.train` would; its byte cache is built first if absent (about a minute,
under `$HIER_LM_DATA` or `data/`). Measured, interleaved (model, loader with each worker count, model, ...;
best of each):
- the loader: `train_dataloader()` batches/s and tokens/s over `--batches` consecutive batches of a running
  iterator, for each `--workers` count (the first batch, which starts the workers, is timed apart);
- the model: training steps of the recipe's model (forward, cross-entropy, backward, gradient clipping,
  AdamW step) on batches already in memory: tokens/s = batch_size * seq_len / step time.
The ratio loader tokens/s / model tokens/s says how much faster the data arrives than it is consumed
(target: at least 20x).

Writes `benchmarks/results/data_throughput.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks.common import RESULTS, load_average, markdown_table, optimizer_step, publish, pyplot, save_figure, timed
from hier_lm.config import compose_train_config
from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer

QUICK = ["--batches", "20", "--repeats", "1", "--steps", "1"]
TARGET = 20.0


def _datamodule(cfg, num_workers: int):
    data = instantiate(cfg.data, num_workers=num_workers)
    data.prepare_data()
    data.setup("fit")
    return data


def measure(cfg, workers: list[int], batches: int, repeats: int, steps: int) -> dict:
    device = torch.device("cpu")
    start = time.perf_counter()
    first = _datamodule(cfg, workers[0])  # builds the byte cache if absent
    cache_s = time.perf_counter() - start
    tokens_per_batch = cfg.data.batch_size * cfg.data.seq_len

    iterators, startup = {}, {}
    for w in workers:
        data = first if w == workers[0] else _datamodule(cfg, w)
        t0 = time.perf_counter()
        iterators[w] = iter(data.train_dataloader())
        next(iterators[w])
        startup[w] = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = build_model({**cfg.model, "vocab_size": first.vocab_size}).train()
    optimizer, _ = build_optimizer(model, cfg.trainer.max_steps, **cfg.optim)
    clip = cfg.trainer.gradient_clip_val
    train_batches = [next(iterators[workers[0]]) for _ in range(max(2, steps))]

    def model_steps() -> None:
        for batch in train_batches[:steps]:
            optimizer_step(model, optimizer, batch, clip)

    def loader_run(w: int):
        return lambda: [next(iterators[w]) for _ in range(batches)]

    best_model, best_loader = float("inf"), dict.fromkeys(workers, float("inf"))
    optimizer_step(model, optimizer, train_batches[-1], clip)  # warm-up
    for _ in range(repeats):
        best_model = min(best_model, timed(model_steps, device, repeats=1, warmup=0) / steps)
        for w in workers:
            best_loader[w] = min(best_loader[w], timed(loader_run(w), device, repeats=1, warmup=0) / batches)
    iterators.clear()  # stops the loaders' worker processes
    model_tokens_per_s = tokens_per_batch / best_model
    rows = []
    for w in workers:
        rows.append({"num_workers": w, "first_batch_s": startup[w], "batch_s": best_loader[w],
                     "batches_per_s": 1 / best_loader[w], "tokens_per_s": tokens_per_batch / best_loader[w],
                     "ratio_vs_model": tokens_per_batch / best_loader[w] / model_tokens_per_s})
    return {"cache_open_s": cache_s, "tokens_per_batch": tokens_per_batch,
            "model": {"name": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters()),
                      "step_s": best_model, "tokens_per_s": model_tokens_per_s},
            "loader": rows}


def markdown(results: dict) -> str:
    m = results["model"]
    head = (f"Recipe `{results['recipe']}` ({' '.join(results['overrides']) or 'as shipped'}): batch "
            f"{results['batch_size']} x seq_len {results['seq_len']} = {results['tokens_per_batch']} tokens per batch. "
            f"Model: {m['name']} ({m['parameters'] / 1e6:.2f}M parameters), one training step (forward, backward, "
            f"clipping, AdamW) {m['step_s']:.3f} s = {round(m['tokens_per_s']):,} tokens/s consumed. Loader: best of "
            f"{results['repeats']} runs of {results['batches']} consecutive batches, interleaved with the model "
            f"steps. Target ratio >= {TARGET:g}x.")
    table = markdown_table(
        ["num_workers", "first batch s", "batches/s", "loader tokens/s", "model tokens/s", "loader / model", "target met"],
        [[r["num_workers"], r["first_batch_s"], round(r["batches_per_s"]), f"{round(r['tokens_per_s']):,}",
          f"{round(m['tokens_per_s']):,}", f"{r['ratio_vs_model']:.0f}x", r["ratio_vs_model"] >= TARGET]
         for r in results["loader"]])
    return head + "\n\n" + table


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"loader, {r['num_workers']} workers" for r in results["loader"]] + ["model consumes"]
    values = [r["tokens_per_s"] for r in results["loader"]] + [results["model"]["tokens_per_s"]]
    ax.bar(names, values, color=["C0"] * len(results["loader"]) + ["C1"])
    ax.set(yscale="log", ylabel="tokens/s (log)", title=f"Recipe {results['recipe']}: data vs training speed")
    ax.grid(alpha=0.3, axis="y", which="both")
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    return [f"{results['recipe']} loader ({r['num_workers']} workers): {r['ratio_vs_model']:.0f}x the tokens/s its "
            f"model consumes in training" for r in results["loader"]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (key=value)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--batches", type=int, default=300, help="consecutive batches per loader timing")
    parser.add_argument("--steps", type=int, default=2, help="training steps per model timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    load = load_average()
    cfg = compose_train_config([f"recipe={args.recipe}", *args.overrides])
    results = {"device": "cpu", "load_1min_before": load, "recipe": args.recipe, "overrides": args.overrides,
               "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "batches": args.batches,
               "repeats": args.repeats}
    results.update(measure(cfg, args.workers, args.batches, args.repeats, args.steps))
    return publish("data_throughput", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
