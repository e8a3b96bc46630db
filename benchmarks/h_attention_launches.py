"""H-attention device launches and bytes written per call (forward + backward) against L: the Triton path and the
PyTorch reference.

    python -m benchmarks.h_attention_launches                  # L = 1k .. 64k, B=1, H=8, D=64, Nr=16, causal + h-RPB
    python -m benchmarks.h_attention_launches --reference-up-to 0   # the Triton path only

A launch is an ATen op that runs a kernel (views, bare allocations and ops returning no tensor run none) or a
Triton kernel launch; bytes written are the bytes of every ATen op's output, which include every buffer the
kernels fill (`benchmarks/launch_count.py`). The Triton kernels are counted without being run (their launchers
never read device data, so the counts are those of a real run), so this runs on any machine, in the kernels'
production dtype (bf16; the interpreter could not run it). The reference runs for real (float32, on the CPU or
the GPU), up to `--reference-up-to`. Writes `benchmarks/results/h_attention_launches.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # set before anything imports triton: launches are counted, not run
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import RESULTS, markdown_table, publish, pyplot, save_figure  # noqa: E402
from benchmarks.launch_count import count_launches  # noqa: E402
from hier_lm.ops import h_attention  # noqa: E402

NAME = "h_attention_launches"
QUICK = ["--lengths", "1024", "4096", "--reference-up-to", "1024", "--heads", "1", "--dim", "16"]


def count(length: int, impl: str, heads: int, dim: int, block_size: int, device: torch.device) -> dict:
    """Launches and bytes of one causal forward + backward with h-RPB, on fresh leaves (no gradient accumulation),
    after one uncounted call (the tile tables are cached on the first)."""
    dtype = torch.bfloat16 if impl == "triton" else torch.float32
    make = torch.empty if impl == "triton" else torch.randn  # values are never read when nothing runs
    q, k, v = (make(1, heads, length, dim, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    rpb = torch.zeros(heads, 4 * block_size - 1, device=device, requires_grad=True)
    grad = make(1, heads, length, dim, device=device, dtype=dtype)

    def step():
        for x in (q, k, v, rpb):
            x.grad = None
        h_attention(q, k, v, block_size, causal=True, rpb=rpb, attn_impl=impl).backward(grad)

    count_launches(step, execute=False)
    c = count_launches(step, execute=False)
    return {"aten_kernels": c.aten_kernels, "triton_launches": sum(c.triton.values()),
            "device_launches": c.device_launches, "mb_written": c.bytes_written / 2**20,
            "triton_kernels": dict(c.triton)}


def markdown(results: dict) -> str:
    columns = ["L", "path", "ATen kernels", "Triton launches", "device launches", "MiB written"]
    rows = [[r["length"], r["impl"], r["aten_kernels"], r["triton_launches"], r["device_launches"], r["mb_written"]]
            for r in results["rows"]]
    return (f"One causal h-attention call with h-RPB, forward + backward (B=1, H={results['heads']}, "
            f"D={results['dim']}, Nr={results['block_size']}): `triton` in bf16 (counted, not run), the PyTorch "
            f"reference (`torch`) in float32. Budget: {results['budget']} device launches per call.\n\n"
            + markdown_table(columns, rows) + "\n")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for impl, label in (("triton", "Triton (bf16)"), ("torch", "PyTorch reference (fp32)")):
        rows = [r for r in results["rows"] if r["impl"] == impl]
        if rows:
            xs = [r["length"] for r in rows]
            axes[0].plot(xs, [r["device_launches"] for r in rows], marker="o", label=label)
            axes[1].plot(xs, [r["mb_written"] for r in rows], marker="o", label=label)
    axes[0].axhline(results["budget"], color="grey", linestyle="--", label="budget")
    axes[0].set(xlabel="sequence length", ylabel="device launches per call", xscale="log", yscale="log")
    axes[1].set(xlabel="sequence length", ylabel="MiB written per call", xscale="log", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    """One-line summary for the results page."""
    triton = [r for r in results["rows"] if r["impl"] == "triton"]
    if not triton:
        return []
    worst = max(r["device_launches"] for r in triton)
    lengths = f"L = {triton[0]['length']} .. {triton[-1]['length']}"
    return [f"h_attention (Triton), one causal fwd+bwd call: at most {worst} device launches at {lengths} "
            f"(budget {results['budget']})"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--reference-up-to", type=int, default=16384,
                        help="largest L at which the PyTorch reference is run and counted (0: never)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for length in args.lengths:
        for impl in ("triton", "torch"):
            if impl == "torch" and length > args.reference_up_to:
                continue
            row = {"length": length, "impl": impl,
                   **count(length, impl, args.heads, args.dim, args.block_size, device)}
            print(row, flush=True)
            rows.append(row)
    results = {"heads": args.heads, "dim": args.dim, "block_size": args.block_size, "budget": 40, "rows": rows}
    return publish(NAME, results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
