"""Image sampling speed: one 32x32 image (3,072 sub-pixel tokens), cached vs uncached, tiny and paper-size Hourglass.

    python -m benchmarks.image_sampling                      # tiny + paper, 32x32, CPU (CUDA when present)
    python -m benchmarks run image_sampling --threads 1      # through the suite's runner

Models, untrained (speed does not depend on the weights), seed 0: `tiny` = the `quickstart_images` recipe's
Hourglass (d 128, `1@1 4@3 1@1`, 1.7M parameters), `paper` = the `imagenet32_hourglass` recipe's (d 512,
`3@1 24@3 3@1`, relative attention, attention resampling, 111M), both with `max_len` = 3 * size**2.

- cached: `hier_lm.image_sampling.sample_images` of one image with the incremental-decoding cache, measured
  whole (every one of the 3HW steps).
- uncached: without the cache every step re-runs the model on the whole context, so step `t` (t = 1..3HW) costs
  one forward of `t` tokens. A model in `--full-uncached` is measured whole (and its tokens compared with the
  cached ones); for the others the time is ESTIMATED: one forward is timed at `--points` context lengths spread
  over 1..3HW, a quadratic `a + bL + cL^2` (attention is quadratic, the rest linear) is fitted to them by least
  squares in relative error, and its sum over L = 1..3HW is the estimate (the per-step sampling itself,
  a softmax over 256 values, is left out: microseconds). The uncached run of the first `--prefix-tokens`
  steps is also measured and its tokens compared with the cached image's.
- the estimator is checked where the whole uncached run is affordable: the tiny model at `--check-size`
  (16x16, 768 tokens) is measured whole AND estimated the same way; the table gives the estimate's error.

Writes `benchmarks/results/image_sampling.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, device_name, load_average, markdown_table, publish, pyplot, save_figure, timed
from hier_lm import generate
from hier_lm.config import compose_train_config
from hier_lm.data.pixels import encode_images
from hier_lm.image_sampling import sample_images
from hier_lm.models import build_model
from hier_lm.tasks import START_TOKEN, image_length, image_model_config

RECIPES = {"tiny": "quickstart_images", "paper": "imagenet32_hourglass"}
QUICK = ["--image-size", "4", "--check-size", "3", "--points", "3", "--prefix-tokens", "6", "--models", "tiny"]


def image_model(name: str, image_size: int, overrides: list[str] = ()) -> torch.nn.Module:
    """The untrained model of recipe `RECIPES[name]` for `image_size` images, in eval mode."""
    cfg = compose_train_config([f"recipe={RECIPES[name]}", *overrides])
    torch.manual_seed(cfg.seed)
    return build_model({**image_model_config(cfg.model, image_size), "vocab_size": 256}).eval()


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def forward_times(model: torch.nn.Module, n_tokens: int, points: int, device: torch.device) -> list[list[float]]:
    """`[[L, seconds of one forward of L tokens], ...]` at `points` lengths spread evenly over 1..n_tokens."""
    lengths = sorted({int(round(x)) for x in np.linspace(1, n_tokens, points)})
    rows = []
    with torch.inference_mode():
        for length in lengths:
            tokens = torch.randint(0, 256, (1, length), device=device)
            rows.append([length, timed(lambda: model(tokens), device, repeats=1, warmup=1 if length < 512 else 0)])
    return rows


def fitted_total(times: list[list[float]], n_tokens: int) -> tuple[float, list[float], float]:
    """Sum over L = 1..n_tokens of the quadratic fitted to `times` (least squares in relative error); the
    coefficients `[c, b, a]` and the largest relative residual at the measured points."""
    lengths, seconds = np.array(times, dtype=float).T
    degree = min(2, len(lengths) - 1)
    coefficients = np.polyfit(lengths, seconds, degree, w=1 / seconds)
    every = np.arange(1, n_tokens + 1, dtype=float)
    residual = float(np.max(np.abs(np.polyval(coefficients, lengths) / seconds - 1)))
    return float(np.polyval(coefficients, every).clip(min=0).sum()), coefficients.tolist(), residual


def measure(name: str, model: torch.nn.Module, image_size: int, full_uncached: bool, points: int,
            prefix_tokens: int, device: torch.device) -> dict:
    model = model.to(device)
    n_tokens = image_length(image_size)
    row = {"model": name, "recipe": RECIPES[name], "image_size": image_size, "tokens": n_tokens,
           "parameters": sum(p.numel() for p in model.parameters()), "load_1min": load_average()}
    row["cached_s"], cached = _seconds(lambda: sample_images(model, image_size, 1, seed=0, use_cache=True))
    print(f"{name} {image_size}x{image_size}: cached {row['cached_s']:.1f} s", flush=True)
    row["forward_times"] = forward_times(model, n_tokens, points, device)
    row["estimated_uncached_s"], row["fit"], row["fit_max_residual"] = fitted_total(row["forward_times"], n_tokens)
    print(f"{name}: forward times {row['forward_times']}, uncached estimate {row['estimated_uncached_s']:.1f} s",
          flush=True)
    prefix = min(prefix_tokens, n_tokens)
    start = torch.tensor([START_TOKEN], device=device)
    row["prefix_tokens"] = prefix
    row["prefix_uncached_s"], tokens = _seconds(lambda: generate(model, start, prefix, use_cache=False, seed=0))
    row["prefix_same_tokens"] = bool(torch.equal(tokens[1:].cpu(), encode_images(cached)[0, :prefix]))
    row["prefix_estimated_s"] = fitted_total(row["forward_times"], prefix)[0]
    if full_uncached:
        row["uncached_s"], uncached = _seconds(lambda: sample_images(model, image_size, 1, seed=0, use_cache=False))
        row["same_tokens"] = bool(torch.equal(uncached, cached))
        row["estimate_error"] = row["estimated_uncached_s"] / row["uncached_s"] - 1
        row["uncached"] = "measured"
    else:
        row["uncached_s"], row["same_tokens"], row["uncached"] = row["estimated_uncached_s"], None, "estimated"
    row["speedup"] = row["uncached_s"] / row["cached_s"]
    print(f"{name}: {row}", flush=True)
    return row


def markdown(results: dict) -> str:
    rows = results["rows"]
    main = markdown_table(
        ["model", "params", "image", "tokens", "cached s", "uncached s", "uncached is", "speed-up", "same tokens"],
        [[r["model"], f"{r['parameters'] / 1e6:.1f}M", f"{r['image_size']}x{r['image_size']}", r["tokens"],
          r["cached_s"], r["uncached_s"], r["uncached"], r["speedup"],
          r["same_tokens"] if r["same_tokens"] is not None
          else f"first {r['prefix_tokens']}: {r['prefix_same_tokens']}"]
         for r in rows])
    check = markdown_table(
        ["model", "image", "uncached measured s", "uncached estimated s", "estimate error", "fit max residual"],
        [[r["model"], f"{r['image_size']}x{r['image_size']}", r["uncached_s"], r["estimated_uncached_s"],
          f"{100 * r['estimate_error']:+.1f}%", f"{100 * r['fit_max_residual']:.1f}%"]
         for r in rows if r["uncached"] == "measured"])
    forwards = markdown_table(
        ["model", "context lengths L", "one forward s"],
        [[r["model"], " / ".join(str(int(L)) for L, _ in r["forward_times"]),
          " / ".join(f"{s:.3g}" for _, s in r["forward_times"])] for r in rows])
    checked = [r for r in rows if r["uncached"] == "measured"]
    verdict = "".join(
        f" At {r['image_size']}x{r['image_size']} the estimate is {100 * r['estimate_error']:+.0f}% off the whole "
        f"measured run" + (" (an undercount: the whole run also pays per-step costs that timing one forward per "
                           "length misses), so the estimated uncached times and speed-ups are likely lower bounds."
                           if r["estimate_error"] < 0 else ".") for r in checked[:1])
    return (f"Device: {results['device']}. One image sampled from START with seed 0, untrained models "
            f"(tiny = `quickstart_images`, paper = `imagenet32_hourglass`). Cached: measured whole. Uncached "
            f"\"estimated\": a quadratic fitted to one forward's time at {results['points']} context lengths, "
            f"summed over the 3HW steps (each step re-runs the whole context); \"measured\": run whole. "
            f"Speed-up = uncached / cached.{verdict}\n\n{main}\n\n"
            f"### Check of the estimate (runs measured whole and estimated the same way)\n\n{check}\n\n"
            f"### One uncached forward by context length\n\n{forwards}")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    rows = results["rows"]
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\n{r['image_size']}x{r['image_size']}" for r in rows]
    xs = np.arange(len(rows))
    bars.bar(xs - 0.2, [r["cached_s"] for r in rows], 0.4, label="cached (measured)")
    uncached = bars.bar(xs + 0.2, [r["uncached_s"] for r in rows], 0.4, label="uncached")
    for bar, r in zip(uncached, rows):
        if r["uncached"] == "estimated":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    bars.set_xticks(xs, labels)
    bars.set_yscale("log")
    bars.set(ylabel="seconds per image (log)", title="Sampling one image (hatched: estimated)")
    bars.legend()
    for r in rows:
        lengths, seconds = np.array(r["forward_times"]).T
        every = np.linspace(1, r["tokens"], 200)
        line = curve.plot(every, np.polyval(r["fit"], every), alpha=0.6)[0]
        curve.plot(lengths, seconds, "o", color=line.get_color(),
                   label=f"{r['model']} {r['image_size']}x{r['image_size']}")
    curve.set(xlabel="context length L", ylabel="one forward (s)", title="Uncached step cost (points: measured)")
    curve.legend()
    for ax in (bars, curve):
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    return [f"cached image sampling, {r['model']} Hourglass ({r['parameters'] / 1e6:.0f}M): "
            f"{r['speedup']:.0f}x faster than uncached for one {r['image_size']}x{r['image_size']} image "
            f"({r['cached_s']:.0f} s vs {r['uncached_s']:.0f} s {r['uncached']})"
            for r in results["rows"] if r["image_size"] == results["image_size"]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--full-uncached", nargs="*", choices=list(RECIPES), default=[],
                        help="models whose uncached run at --image-size is measured whole (default: estimated)")
    parser.add_argument("--check-size", type=int, default=16,
                        help="image size of the tiny model's whole uncached run that checks the estimate (0: none)")
    parser.add_argument("--points", type=int, default=5, help="context lengths at which one forward is timed")
    parser.add_argument("--prefix-tokens", type=int, default=24, help="uncached steps run for the token check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": device_name(device), "load_1min_before": load_average(), "image_size": args.image_size,
               "points": args.points, "recipes": {m: RECIPES[m] for m in args.models}}
    rows = []
    if args.check_size:
        rows.append(measure("tiny", image_model("tiny", args.check_size), args.check_size, True, args.points,
                            args.prefix_tokens, device))
    for name in args.models:
        rows.append(measure(name, image_model(name, args.image_size), args.image_size, name in args.full_uncached,
                            args.points, args.prefix_tokens, device))
    results["rows"] = rows
    return publish("image_sampling", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
