"""Attention scaling: time and peak memory of one causal forward+backward against the sequence length L.

    python -m benchmarks.attention_scaling                       # L = 1k .. 64k, CPU (CUDA when present)
    python -m benchmarks.attention_scaling --lengths 1024 4096 --repeats 3

Methods (batch 1; all causal):
- `sdpa`: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, q, k, v `[1, 8, L, 64]` (PyTorch's fused
  kernel; on CPU it is itself memory-efficient: it never materialises the L x L matrix).
- `softmax`: materialised `softmax(q k^T / 8 + mask) v` on the same shapes, while its estimated L x L buffers
  (scores, probabilities and their two gradients: 4 * 8 * L^2 floats) fit under `--softmax-mem-gib`.
- `h_attention`: `hier_lm.ops.h_attention(q, k, v, block_size=16)` on the same shapes (Nr = 16).
- `flash_chunk`: `hier_lm.ops.mixed_chunk_attention` at the shapes of one FLASH layer of d 512: q and k of
  both parts `[1, L, 128]`, v `[1, L, 1024]`, C = 256 (a single head of width e = 2d, so it moves 2x the
  value bytes of the 8 x 64 heads above).

At each L the methods' repeats are interleaved (A, B, C, A, B, C, ...; best of each), so every ratio comes
from back-to-back measurements. A point is skipped ("—") when its estimated cost (the method's last
measured time scaled by (L / L_prev)^order, order 2 for the quadratic methods and 1 for the others, times
the warm-up + repeats + memory calls; calls estimated over 5 s get no warm-up) exceeds `--budget`; skipped
points are never extrapolated into the table. Peak memory: the CUDA allocator's peak, or on CPU the peak
of live tensor bytes (profiler replay), inputs excluded, gradients included. Slopes of log(time) and log(memory) against log(L) are fitted by
least squares over the measured points (all of them, and those with L >= 4096).

Writes `benchmarks/results/attention_scaling.{json,md,png}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, peak_memory, publish, pyplot,
                               save_figure, timed_interleaved)
from hier_lm.ops import h_attention, mixed_chunk_attention

HEADS, HEAD_DIM, BLOCK = 8, 64, 16  # the attention of an H-Transformer-1D layer of d 512
FLASH_S, FLASH_E, FLASH_C = 128, 1024, 256  # one FLASH layer of d 512: s = 128, e = 2d, C = 256
METHODS = {  # name: (label, order of growth used only to decide whether the next point fits the budget)
    "sdpa": ("SDPA (fused, causal)", 2),
    "softmax": ("materialised softmax", 2),
    "h_attention": ("h_attention (Nr=16)", 1),
    "flash_chunk": ("FLASH mixed chunk (C=256)", 1),
}
QUICK = ["--lengths", "64", "128", "--repeats", "1"]
NO_WARMUP_S = 5.0  # a call estimated to take longer gets no warm-up call (its first run is no different)


def materialised_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(D) + causal mask) v` with the `[B, H, L, L]` matrix in memory."""
    L = q.shape[-2]
    mask = torch.full((L, L), float("-inf"), device=q.device).triu(1)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask, dim=-1) @ v


def softmax_bytes(length: int) -> int:
    """Estimated bytes of the materialised softmax' L x L buffers in one forward+backward (4 fp32 matrices)."""
    return 4 * HEADS * length * length * 4


def _fwd_bwd(fn, inputs: list[torch.Tensor], grad: torch.Tensor):
    """A closure that runs `fn(*inputs).backward(grad)` and then drops the inputs' gradients."""

    def step() -> None:
        fn(*inputs).backward(grad)
        for x in inputs:
            x.grad = None

    return step


def make_steps(length: int, device: torch.device, methods: list[str]) -> dict:
    """One forward+backward closure per method at sequence length `length` (inputs drawn once, seed 0)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    steps = {}
    if {"sdpa", "softmax", "h_attention"} & set(methods):
        q, k, v = (rand(1, HEADS, length, HEAD_DIM) for _ in range(3))
        grad = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen).to(device)
        fns = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "softmax": materialised_softmax,
               "h_attention": lambda q, k, v: h_attention(q, k, v, BLOCK, causal=True)}
        steps.update({m: _fwd_bwd(fns[m], [q, k, v], grad) for m in methods if m in fns})
    if "flash_chunk" in methods:
        inputs = [rand(1, length, FLASH_S) for _ in range(4)] + [rand(1, length, FLASH_E)]
        grad = torch.randn(1, length, FLASH_E, generator=gen).to(device)
        steps["flash_chunk"] = _fwd_bwd(
            lambda qq, kq, ql, kl, v: mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=FLASH_C, causal=True),
            inputs, grad)
    return steps


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x); None for fewer than two points."""
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def measure(lengths: list[int], device: torch.device, methods: list[str], repeats: int, budget: float,
            softmax_mem_gib: float) -> list[dict]:
    rows, last = [], {}  # last[method] = (length, seconds) of its latest measured point
    for length in lengths:
        row = {"length": length, "load_1min": load_average(), "skipped": {}}
        run, warm = [], []
        for method in methods:
            if method == "softmax" and softmax_bytes(length) > softmax_mem_gib * 2**30:
                row["skipped"][method] = (f"its L x L buffers need ~{softmax_bytes(length) / 2**30:.1f} GiB "
                                          f"> {softmax_mem_gib:g} GiB")
                continue
            call = 0.0
            if method in last:
                prev_len, prev_s = last[method]
                call = prev_s * (length / prev_len) ** METHODS[method][1]
                estimate = call * ((call <= NO_WARMUP_S) + repeats + 1)  # warm-up, repeats, the memory run
                if estimate > budget:
                    row["skipped"][method] = f"estimated {estimate:.0f} s > budget {budget:g} s"
                    continue
            run.append(method)
            if call <= NO_WARMUP_S:
                warm.append(method)
        steps = make_steps(length, device, run)
        for method in warm:
            steps[method]()
        times = timed_interleaved(steps, device, repeats=repeats, warmup=0)
        for method in run:
            row[f"{method}_s"] = times[method]
            row[f"{method}_peak_mb"] = peak_memory(steps[method], device) / 2**20
            last[method] = (length, times[method])
        for num, den in (("sdpa", "h_attention"), ("sdpa", "flash_chunk"), ("softmax", "h_attention")):
            if f"{num}_s" in row and f"{den}_s" in row:
                row[f"{num}_over_{den}_time"] = row[f"{num}_s"] / row[f"{den}_s"]
                row[f"{num}_over_{den}_memory"] = row[f"{num}_peak_mb"] / row[f"{den}_peak_mb"]
        print(f"attention_scaling L={length}: {row}", flush=True)
        rows.append(row)
        del steps
    return rows


def slopes(rows: list[dict], methods: list[str]) -> dict:
    out = {}
    for method in methods:
        pts = [r for r in rows if f"{method}_s" in r]
        big = [r for r in pts if r["length"] >= 4096]
        out[method] = {
            "points": len(pts),
            "time": fit_slope([r["length"] for r in pts], [r[f"{method}_s"] for r in pts]),
            "memory": fit_slope([r["length"] for r in pts], [r[f"{method}_peak_mb"] for r in pts]),
            "time_L_ge_4096": fit_slope([r["length"] for r in big], [r[f"{method}_s"] for r in big]),
            "memory_L_ge_4096": fit_slope([r["length"] for r in big], [r[f"{method}_peak_mb"] for r in big]),
        }
    return out


def _cell(row: dict, key: str) -> object:
    value = row.get(key)
    return "—" if value is None else value


def _slope_cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    rows, methods = results["rows"], results["methods"]
    ratio_keys = [k for k in ("sdpa_over_h_attention", "sdpa_over_flash_chunk", "softmax_over_h_attention")
                  if any(f"{k}_time" in r for r in rows)]
    ratio_names = {"sdpa_over_h_attention": "SDPA / h_attention", "sdpa_over_flash_chunk": "SDPA / FLASH chunk",
                   "softmax_over_h_attention": "softmax / h_attention"}
    parts = [f"Device: {results['device']}. Causal forward+backward, batch 1; q, k, v `[1, {HEADS}, L, {HEAD_DIM}]` "
             f"for SDPA, the materialised softmax and h_attention (Nr={BLOCK}); FLASH chunk at one d-512 FLASH "
             f"layer's shapes (q, k `[1, L, {FLASH_S}]`, v `[1, L, {FLASH_E}]`, C={FLASH_C}). Best of "
             f"{results['repeats']} interleaved repeats. \"—\": not measured (reason below), never estimated."]
    parts.append("## Time (s)\n\n" + markdown_table(
        ["L", *(METHODS[m][0] for m in methods), *(f"{ratio_names[k]} (time)" for k in ratio_keys)],
        [[r["length"], *(_cell(r, f"{m}_s") for m in methods), *(_cell(r, f"{k}_time") for k in ratio_keys)]
         for r in rows]))
    parts.append("## Peak memory (MiB)\n\n" + markdown_table(
        ["L", *(METHODS[m][0] for m in methods), *(f"{ratio_names[k]} (memory)" for k in ratio_keys)],
        [[r["length"], *(_cell(r, f"{m}_peak_mb") for m in methods), *(_cell(r, f"{k}_memory") for k in ratio_keys)]
         for r in rows]))
    parts.append("## Fitted slopes of log(time) and log(memory) against log(L)\n\n" + markdown_table(
        ["method", "points", "time slope", "memory slope", "time slope (L >= 4096)", "memory slope (L >= 4096)"],
        [[METHODS[m][0], s["points"], _slope_cell(s["time"]), _slope_cell(s["memory"]),
          _slope_cell(s["time_L_ge_4096"]), _slope_cell(s["memory_L_ge_4096"])] for m, s in results["slopes"].items()]))
    skipped = [f"- L={r['length']}, {METHODS[m][0]}: {why}" for r in rows for m, why in r["skipped"].items()]
    if skipped:
        parts.append("Not measured:\n\n" + "\n".join(skipped))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (suffix, ylabel) in zip(axes, (("_s", "forward+backward time (s)"), ("_peak_mb", "peak memory (MiB)"))):
        for method in results["methods"]:
            pts = [r for r in results["rows"] if f"{method}{suffix}" in r]
            if pts:
                ax.plot([r["length"] for r in pts], [r[f"{method}{suffix}"] for r in pts], marker="o",
                        label=METHODS[method][0])
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Causal attention, batch 1: time and memory vs L (log-log)")
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    """One-line ratios for the summary of the results page (docs/results.md)."""
    lines = []
    for row in results["rows"]:
        if row["length"] == 16384 and "sdpa_over_h_attention_time" in row:
            lines.append(f"h_attention at L=16384 (causal fwd+bwd): {row['sdpa_over_h_attention_time']:.1f}x faster than "
                         f"SDPA, {1 / row['sdpa_over_h_attention_memory']:.1f}x SDPA's peak memory (both linear in L)")
    for method in ("h_attention", "flash_chunk"):
        s = results["slopes"].get(method, {})
        if s.get("time_L_ge_4096") is not None:
            lines.append(f"{METHODS[method][0]}: log-log slope (L >= 4096) time {s['time_L_ge_4096']:.2f}, "
                         f"memory {s['memory_L_ge_4096']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024 * 2**i for i in range(7)])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (after one warm-up)")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds one point of one method may take (all its calls); beyond it is skipped")
    parser.add_argument("--softmax-mem-gib", type=float, default=4.0,
                        help="largest estimated L x L buffers of the materialised softmax")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    load = load_average()
    rows = measure(sorted(args.lengths), device, args.methods, args.repeats, args.budget, args.softmax_mem_gib)
    results = {"device": device_name(device), "load_1min_before": load, "methods": args.methods,
               "repeats": args.repeats, "budget_s": args.budget, "softmax_mem_gib": args.softmax_mem_gib,
               "config": {"heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "flash_s": FLASH_S,
                          "flash_e": FLASH_E, "flash_chunk": FLASH_C, "batch": 1, "causal": True},
               "rows": rows, "slopes": slopes(rows, args.methods)}
    return publish("attention_scaling", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
