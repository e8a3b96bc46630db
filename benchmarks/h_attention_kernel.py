"""H-Transformer-1D attention kernels: Triton `h_attention` vs the PyTorch reference vs dense causal
`F.scaled_dot_product_attention`, one forward+backward each: time, peak memory and their ratios.

    python -m benchmarks.h_attention_kernel          # CUDA: bf16, L = 4k..64k, B=1, H=8, D=64, Nr=16
    python -m benchmarks.h_attention_kernel --device cpu --out /tmp/x   # CPU: a tiny float32 run only

On CUDA it writes `benchmarks/results/h_attention_kernel.{json,md,png}`. On the CPU the Triton kernels run
in Triton's interpreter (TRITON_INTERPRET=1 is set when no GPU is present; numpy, sequential: the timings
mean nothing), so it runs a tiny size (default L = 64, H = 1, D = 16, Nr = 8) to check that everything runs,
and writes nothing unless `--out` is given. `--methods` picks a subset of triton / torch / sdpa.
Each row also records the largest |Triton - reference| output difference. Causal h-attention with an h-RPB
table (the LM configuration); a method that runs out of memory gets `null` entries.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the kernels then run in the interpreter: set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import (  # noqa: E402
    RESULTS,
    device_name,
    markdown_table,
    peak_memory,
    save_figure,
    timed,
    write_results,
)
from hier_lm.ops import h_attention  # noqa: E402

METHODS = ("triton", "torch", "sdpa")
NAME = "h_attention_kernel"


def _inputs(length: int, heads: int, dim: int, block_size: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    rpb = (0.02 * torch.randn(heads, 4 * block_size - 1, generator=gen, device=device)).requires_grad_()
    return q, k, v, rpb


def _forward(method: str, q, k, v, rpb, block_size: int) -> torch.Tensor:
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return h_attention(q, k, v, block_size, causal=True, rpb=rpb, attn_impl=method)


def _step(method: str, tensors, block_size: int, grad: torch.Tensor) -> None:
    q, k, v, rpb = tensors
    _forward(method, q, k, v, rpb, block_size).backward(grad)
    for x in tensors:
        x.grad = None


def measure(length: int, heads: int, dim: int, block_size: int, dtype: torch.dtype, device: torch.device,
            repeats: int, warmup: int, methods=METHODS) -> dict:
    tensors = _inputs(length, heads, dim, block_size, dtype, device)
    grad = torch.randn_like(tensors[0])
    row = {"length": length}
    for method in METHODS:
        if method not in methods:
            row[f"{method}_ms"] = row[f"{method}_peak_mb"] = None
            continue
        try:
            row[f"{method}_ms"] = 1e3 * timed(lambda: _step(method, tensors, block_size, grad), device,
                                              repeats=repeats, warmup=warmup)
            row[f"{method}_peak_mb"] = peak_memory(lambda: _step(method, tensors, block_size, grad), device) / 2**20
        except torch.OutOfMemoryError:
            row[f"{method}_ms"] = row[f"{method}_peak_mb"] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["max_abs_diff"] = None
    if "triton" in methods and "torch" in methods:
        with torch.no_grad():
            outs = {m: _forward(m, *tensors, block_size) for m in ("triton", "torch")}
            row["max_abs_diff"] = (outs["triton"].float() - outs["torch"].float()).abs().max().item()
    for other in ("torch", "sdpa"):
        for unit, key in (("ms", "time"), ("peak_mb", "memory")):
            a, b = row["triton_" + unit], row[f"{other}_{unit}"]
            row[f"{key}_ratio_vs_{other}"] = a / b if a is not None and b else None
    print(f"L={length}: {row}", flush=True)
    return row


def markdown(rows: list[dict], config: dict) -> str:
    columns = ["L", "Triton ms", "reference ms", "SDPA ms", "Triton MB", "reference MB", "SDPA MB",
               "time Triton/ref", "time Triton/SDPA", "memory Triton/SDPA", "max |diff|"]
    table = [[r["length"], r["triton_ms"], r["torch_ms"], r["sdpa_ms"], r["triton_peak_mb"], r["torch_peak_mb"],
              r["sdpa_peak_mb"], r["time_ratio_vs_torch"], r["time_ratio_vs_sdpa"], r["memory_ratio_vs_sdpa"],
              r["max_abs_diff"]] for r in rows]
    table = [["-" if x is None else x for x in row] for row in table]
    return (f"Device: {config['device']}. Causal h-attention with h-RPB (B=1, H={config['heads']}, "
            f"D={config['dim']}, Nr={config['block_size']}, {config['dtype']}), forward+backward, best of "
            f"{config['repeats']}; SDPA = dense causal `scaled_dot_product_attention`.\n\n"
            + markdown_table(columns, table) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["length"] for r in rows]
    labels = {"triton": "h_attention (Triton)", "torch": "h_attention (PyTorch)", "sdpa": "SDPA causal"}
    for method, label in labels.items():
        if all(r[f"{method}_ms"] is None for r in rows):
            continue
        axes[0].plot(xs, [r[f"{method}_ms"] for r in rows], marker="o", label=label)
        axes[1].plot(xs, [r[f"{method}_peak_mb"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="sequence length", ylabel="forward+backward (ms)", xscale="log", yscale="log")
    axes[1].set(xlabel="sequence length", ylabel="peak memory (MiB)", xscale="log", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="default: 4096 .. 65536 on CUDA, 64 on the CPU")
    parser.add_argument("--heads", type=int, default=None, help="default: 8 on CUDA, 1 on the CPU")
    parser.add_argument("--dim", type=int, default=None, help="default: 64 on CUDA, 16 on the CPU")
    parser.add_argument("--block-size", type=int, default=None, help="Nr; default: 16 on CUDA, 8 on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 1 on the CPU")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", default=None, help=f"results folder (default on CUDA: {RESULTS}; on the CPU "
                                                    "nothing is written without it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = {
        "device": device_name(device),
        "heads": args.heads or (8 if cuda else 1),
        "dim": args.dim or (64 if cuda else 16),
        "block_size": args.block_size or (16 if cuda else 8),
        "dtype": "bfloat16" if cuda else "float32",  # the interpreter cannot multiply bf16 (raw bits)
        "repeats": args.repeats or (5 if cuda else 1),
    }
    lengths = args.lengths or ([4096, 8192, 16384, 32768, 65536] if cuda else [64])
    dtype = getattr(torch, config["dtype"])
    rows = [measure(length, config["heads"], config["dim"], config["block_size"], dtype, device,
                    config["repeats"], warmup=2 if cuda else 0, methods=args.methods) for length in lengths]
    results = {**config, "rows": rows}
    out = args.out or (str(RESULTS) if cuda else None)
    if out is not None:
        out = Path(out)
        write_results(NAME, results, markdown(rows, config), out)
        plot(rows, out / f"{NAME}.png")
    else:
        print(markdown(rows, config))
    return results


if __name__ == "__main__":
    main()
