"""Training throughput of every model family at about equal parameter count, in one run.

    python -m benchmarks.model_throughput                        # ~10M parameters, L = 1024 and 4096
    python -m benchmarks.model_throughput --lengths 2048 --tokens-per-step 8192

Models (byte-level, vocab 256, d 320; about 10.0M parameters each, counts in the table):
- `transformer`: 8 pre-LN layers, 5 heads of 64, d_ff 1280, RoPE.
- `hourglass`: `1@1 4@4 1@1`, attention shortening and upsampling (the quickstart's shape), 5 heads, d_ff 1280.
- `h_transformer`: 8 layers, 5 heads, d_ff 1280, Nr = 16, h-RPB.
- `flash`: 15 GAU layers, e = 2d, s = 128, mixed chunk attention with C = 256 (two GAU layers have about
  the parameters of one Transformer block).

One training step = forward, next-token cross-entropy, backward, AdamW step (`hier_lm.tasks.optim`), on a
batch of `tokens_per_step / L` sequences of length L, so every L moves the same number of tokens per step.
At each L the models' steps are interleaved (T, HG, H, F, T, HG, ...; best of each); the ratio is tokens/s
over the Transformer's at the same L.

Writes `benchmarks/results/model_throughput.{json,md,png}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, optimizer_step, publish, pyplot,
                               save_figure, timed_interleaved)
from hier_lm.models import FLASH, Hourglass, HTransformer1D, Transformer
from hier_lm.tasks.optim import build_optimizer

FAMILIES = ("transformer", "hourglass", "h_transformer", "flash")
QUICK = ["--lengths", "64", "--tokens-per-step", "128", "--d-model", "64", "--repeats", "1"]


def build(family: str, d_model: int, max_len: int) -> torch.nn.Module:
    """The ~10M-parameter model of `family` (at d_model 320; other widths scale it)."""
    heads = max(1, d_model // 64)
    common = dict(vocab_size=256, d_model=d_model, dropout=0.0, max_len=max_len)
    if family == "transformer":
        return Transformer(**common, n_layers=8, n_heads=heads, d_ff=4 * d_model)
    if family == "hourglass":
        return Hourglass(**common, n_heads=heads, d_ff=4 * d_model, hierarchy="1@1 4@4 1@1",
                         shortening="attention", upsampling="attention")
    if family == "h_transformer":
        return HTransformer1D(**common, n_layers=8, n_heads=heads, d_ff=4 * d_model, block_size=16, pos="hrpb")
    if family == "flash":
        return FLASH(**common, n_layers=15, expansion=2, s=128, mode="chunk", chunk_size=256)
    raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")


def measure(families: list[str], lengths: list[int], tokens_per_step: int, d_model: int, device: torch.device,
            repeats: int) -> list[dict]:
    rows = []
    for length in lengths:
        if tokens_per_step % length:
            raise ValueError(f"--tokens-per-step {tokens_per_step} is not a multiple of L={length}")
        batch = torch.randint(0, 256, (tokens_per_step // length, length + 1),
                              generator=torch.Generator().manual_seed(0)).to(device)
        steps, params = {}, {}
        for family in families:
            torch.manual_seed(0)
            model = build(family, d_model, length).to(device).train()
            optimizer, _ = build_optimizer(model, 1000, lr=1e-4)
            params[family] = sum(p.numel() for p in model.parameters())
            steps[family] = lambda model=model, optimizer=optimizer: optimizer_step(model, optimizer, batch)
        load = load_average()
        times = timed_interleaved(steps, device, repeats=repeats)
        for family in families:
            row = {"family": family, "length": length, "batch_size": batch.shape[0], "tokens_per_step": tokens_per_step,
                   "parameters": params[family], "step_s": times[family], "tokens_per_s": tokens_per_step / times[family],
                   "load_1min": load}
            if "transformer" in times:
                row["vs_transformer"] = times["transformer"] / times[family]
            print(f"model_throughput: {row}", flush=True)
            rows.append(row)
        del steps
    return rows


LABELS = {"transformer": "Transformer (8 layers)", "hourglass": "Hourglass (1@1 4@4 1@1)",
          "h_transformer": "H-Transformer-1D (8 layers, Nr 16)", "flash": "FLASH (15 GAU, C 256)"}


def markdown(results: dict) -> str:
    parts = [f"Device: {results['device']}. One training step = forward + backward + AdamW step, "
             f"{results['tokens_per_step']} tokens per step at every L (batch = tokens / L), d {results['d_model']}, "
             f"best of {results['repeats']} interleaved repeats. Ratio = tokens/s over the Transformer's at the same L."]
    parts.append(markdown_table(
        ["model", "params", "L", "batch", "step s", "tokens/s", "vs Transformer"],
        [[LABELS[r["family"]], f"{r['parameters'] / 1e6:.2f}M", r["length"], r["batch_size"], r["step_s"],
          round(r["tokens_per_s"]), r.get("vs_transformer", "—")] for r in results["rows"]]))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    lengths = sorted({r["length"] for r in results["rows"]})
    families = list(dict.fromkeys(r["family"] for r in results["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(families)
    for i, family in enumerate(families):
        values = [next(r["tokens_per_s"] for r in results["rows"] if r["family"] == family and r["length"] == L)
                  for L in lengths]
        ax.bar([j + i * width for j in range(len(lengths))], values, width, label=LABELS[family])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"L={L}" for L in lengths])
    ax.set(ylabel="training tokens/s", title=f"Training throughput, ~equal parameters ({results['tokens_per_step']} "
                                             "tokens/step)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    return [f"{LABELS[r['family']]} training tokens/s at L={r['length']}: {r['vs_transformer']:.2f}x the Transformer's"
            for r in results["rows"] if r["family"] != "transformer" and "vs_transformer" in r]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": device_name(device), "load_1min_before": load_average(), "d_model": args.d_model,
               "tokens_per_step": args.tokens_per_step, "repeats": args.repeats}
    results["rows"] = measure(args.families, args.lengths, args.tokens_per_step, args.d_model, device, args.repeats)
    return publish("model_throughput", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
