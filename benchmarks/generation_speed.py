"""Generation speed: cached vs uncached `hier_lm.generate` for every model family, in one run.

    python -m benchmarks.generation_speed                        # 512 bytes per model
    python -m benchmarks.generation_speed --tokens 1024 --families hourglass flash

Models: the quickstart recipes' models (`quickstart` Hourglass, `quickstart_transformer`,
`quickstart_h_transformer`, `quickstart_flash`), untrained (speed does not depend on the weights), with
`max_len` = the generated length + 1 so that the context is never cut. Each generates `--tokens` bytes from
a one-byte prompt with seed 0, with the incremental-decoding cache and without it (the whole context re-run
for every byte); the calls are interleaved (cached, uncached, cached, ...; best of each), and the two token
sequences are compared (`hier_lm.generate` promises identical tokens).

Writes `benchmarks/results/generation_speed.{json,md,png}`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, publish, pyplot, save_figure,
                               timed_interleaved)
from hier_lm import generate
from hier_lm.config import compose_train_config
from hier_lm.models import build_model

RECIPES = {"hourglass": "quickstart", "transformer": "quickstart_transformer",
           "h_transformer": "quickstart_h_transformer", "flash": "quickstart_flash"}
QUICK = ["--tokens", "12", "--repeats", "1"]


def quickstart_model(family: str, max_len: int, overrides: list[str] = ()) -> torch.nn.Module:
    """The model of `family`'s quickstart recipe (vocab 256), with `max_len` tokens of context."""
    cfg = compose_train_config([f"recipe={RECIPES[family]}", f"model.max_len={max_len}", *overrides])
    torch.manual_seed(cfg.seed)
    return build_model({**cfg.model, "vocab_size": 256})


def measure_generation(models: Mapping[str, torch.nn.Module], n_tokens: int, device: torch.device,
                       repeats: int = 2) -> list[dict]:
    """Per model: the best of `repeats` interleaved cached / uncached generations of `n_tokens` bytes from a
    one-byte prompt (seed 0), the speed-up and whether both produced the same tokens."""
    rows = []
    prompt = torch.tensor([10], device=device)
    for name, model in models.items():
        model = model.to(device).eval()
        outputs = {}

        def run(use_cache: bool, model=model) -> None:
            outputs[use_cache] = generate(model, prompt, n_tokens, use_cache=use_cache, seed=0)

        row = {"model": name, "tokens": n_tokens, "parameters": sum(p.numel() for p in model.parameters()),
               "load_1min": load_average()}
        times = timed_interleaved({"cached": lambda: run(True), "uncached": lambda: run(False)}, device,
                                  repeats=repeats, warmup=0)
        row["cached_s"], row["uncached_s"] = times["cached"], times["uncached"]
        row["cached_tokens_per_s"] = n_tokens / times["cached"]
        row["same_tokens"] = bool(torch.equal(outputs[True], outputs[False]))
        row["speedup"] = row["uncached_s"] / row["cached_s"]
        print(f"generation: {row}", flush=True)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    return (f"Device: {results['device']}. The quickstart recipes' models, {results['tokens']} bytes from a one-byte "
            f"prompt (seed 0), best of {results['repeats']} interleaved runs; speed-up = uncached / cached time.\n\n"
            + markdown_table(["model", "params", "bytes", "cached s", "uncached s", "cached bytes/s", "speed-up",
                              "same tokens"],
                             [[r["model"], f"{r['parameters'] / 1e6:.2f}M", r["tokens"], r["cached_s"], r["uncached_s"],
                               round(r["cached_tokens_per_s"]), r["speedup"], r["same_tokens"]]
                              for r in results["rows"]]))


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["cached_s"] for r in rows], 0.4, label="cached")
    ax.bar([x + 0.2 for x in xs], [r["uncached_s"] for r in rows], 0.4, label="uncached")
    ax.set_xticks(list(xs), [r["model"] for r in rows])
    ax.set(ylabel="seconds", title=f"Generating {results['tokens']} bytes (quickstart models)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    return [f"cached generation, {r['model']}: {r['speedup']:.1f}x faster than uncached over {r['tokens']} bytes "
            f"({'identical' if r['same_tokens'] else 'DIFFERENT'} tokens)" for r in results["rows"]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--tokens", type=int, default=512, help="bytes to generate per model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": device_name(device), "load_1min_before": load_average(), "tokens": args.tokens,
               "repeats": args.repeats, "recipes": {f: RECIPES[f] for f in args.families}}
    models = {family: quickstart_model(family, args.tokens + 1) for family in args.families}
    results["rows"] = measure_generation(models, args.tokens, device, args.repeats)
    return publish("generation_speed", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
