"""Hourglass speed: against the public port, against the Transformer baseline, cached vs uncached generation.

    python -m benchmarks.hourglass_speed                      # all three parts, CPU (CUDA when present)
    python -m benchmarks.hourglass_speed --parts generation --gen-tokens 512

Parts (ratios are measured in one run, each pair back to back):
- `peer`: hier_lm `Hourglass` vs `hourglass-transformer-pytorch` (if installed; `benchmarks/requirements.txt`)
  at the port's config: dim 512, depth (1, 2, 1), shorten factor 4, 8 heads, attention resampling over naive
  pooling/repeat; one forward+backward of a batch of 1 at each length in `--peer-lengths`: time and peak memory.
- `baseline`: Hourglass `2@1 8@4 2@1` vs a Transformer with the same 12 layers (d 256, 4 heads): training
  throughput (forward+backward) at `--lengths`, and the FLOP ratio counted by `torch.utils.flop_counter`.
- `generation`: `hier_lm.generate` of `--gen-tokens` bytes from a one-byte prompt with and without the cache,
  for the quickstart's Hourglass and Transformer (context = the generated length), measured by
  `benchmarks.generation_speed.measure_generation` (which covers all four model families).

Writes `benchmarks/results/hourglass_speed.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS, device_name, markdown_table, peak_memory, timed, write_results
from benchmarks.common import train_step as _train_step
from benchmarks.generation_speed import measure_generation
from hier_lm.models import Hourglass, Transformer

PARTS = ("peer", "baseline", "generation")


def _flops(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """FLOPs of one forward+backward, counted on a copy on the meta device: there attention runs as plain
    matmuls that the counter sees (the fused CPU attention kernels are not counted), causal masks included."""
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        _train_step(meta, tokens.to("meta"))
    return counter.get_total_flops()


def peer_part(lengths: list[int], device: torch.device, d_model: int) -> list[dict]:
    try:
        from hourglass_transformer_pytorch import HourglassTransformerLM
    except ImportError:
        print("peer: hourglass-transformer-pytorch is not installed (pip install -r benchmarks/requirements.txt)")
        return []
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        ours = Hourglass(vocab_size=256, d_model=d_model, n_heads=8, d_ff=4 * d_model, dropout=0.0,
                         hierarchy="1@1 2@4 1@1", shortening="attention", upsampling="attention",
                         max_len=length).to(device)
        peer = HourglassTransformerLM(num_tokens=256, dim=d_model, max_seq_len=length, depth=(1, 2, 1),
                                      shorten_factor=4, heads=8, dim_head=d_model // 8).to(device)
        tokens = torch.randint(0, 256, (1, length + 1), device=device)
        row = {"length": length}
        for name, model in (("hier_lm", ours), ("peer", peer)):
            row[f"{name}_s"] = timed(lambda: _train_step(model, tokens), device, repeats=2)
            row[f"{name}_peak_mb"] = peak_memory(lambda: _train_step(model, tokens), device) / 2**20
        row["time_ratio"] = row["hier_lm_s"] / row["peer_s"]
        row["memory_ratio"] = row["hier_lm_peak_mb"] / row["peer_peak_mb"]
        print(f"peer L={length}: {row}", flush=True)
        rows.append(row)
    return rows


def baseline_part(lengths: list[int], device: torch.device, d_model: int) -> list[dict]:
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        common = dict(vocab_size=256, d_model=d_model, n_heads=4, d_ff=4 * d_model, dropout=0.0, max_len=length)
        hourglass = Hourglass(**common, hierarchy="2@1 8@4 2@1").to(device)
        transformer = Transformer(**common, n_layers=12).to(device)
        tokens = torch.randint(0, 256, (1, length + 1), device=device)
        row = {"length": length}
        for name, model in (("hourglass", hourglass), ("transformer", transformer)):
            row[f"{name}_tokens_per_s"] = length / timed(lambda: _train_step(model, tokens), device, repeats=2)
            row[f"{name}_gflops"] = _flops(model, tokens) / 1e9
        row["speedup"] = row["hourglass_tokens_per_s"] / row["transformer_tokens_per_s"]
        row["flop_ratio"] = row["transformer_gflops"] / row["hourglass_gflops"]
        print(f"baseline L={length}: {row}", flush=True)
        rows.append(row)
    return rows


def generation_part(n_tokens: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    small = dict(vocab_size=256, d_model=128, n_heads=4, d_ff=512, dropout=0.0, max_len=n_tokens + 1)
    models = {
        "hourglass (quickstart size, 1@1 4@4 1@1)": Hourglass(**small, hierarchy="1@1 4@4 1@1"),
        "transformer (quickstart size, 4 layers)": Transformer(**small, n_layers=4),
    }
    return measure_generation(models, n_tokens, device, repeats=1)  # all four families: benchmarks.generation_speed


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in PARTS if results.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = results[key]
        if key == "peer":
            xs = [r["length"] for r in rows]
            ax.plot(xs, [r["hier_lm_s"] for r in rows], marker="o", label="hier_lm")
            ax.plot(xs, [r["peer_s"] for r in rows], marker="o", label="hourglass-transformer-pytorch")
            ax.set(xlabel="sequence length", ylabel="forward+backward (s)", title="vs the public port")
        elif key == "baseline":
            xs = [r["length"] for r in rows]
            ax.plot(xs, [r["speedup"] for r in rows], marker="o", label="measured speed-up")
            ax.plot(xs, [r["flop_ratio"] for r in rows], marker="o", linestyle="--", label="FLOP ratio")
            ax.set(xlabel="sequence length", ylabel="Transformer / Hourglass", title="vs Transformer, 12 layers")
        else:
            names = [r["model"].split(" (")[0] for r in rows]
            ax.bar([f"{n}\ncached" for n in names], [r["cached_s"] for r in rows])
            ax.bar([f"{n}\nuncached" for n in names], [r["uncached_s"] for r in rows])
            ax.set(ylabel="seconds", title=f"generating {rows[0]['tokens']} bytes")
        ax.grid(alpha=0.3)
        if key != "generation":
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict, device: torch.device) -> str:
    parts = [f"Device: {device_name(device)}."]
    if results.get("peer"):
        parts.append("## vs hourglass-transformer-pytorch (dim 512, depth (1,2,1), shorten 4, 8 heads, batch 1, "
                     "forward+backward)\n\n" + markdown_table(
                         ["L", "hier_lm s", "peer s", "time ratio", "hier_lm peak MiB", "peer peak MiB", "memory ratio"],
                         [[r["length"], r["hier_lm_s"], r["peer_s"], r["time_ratio"], r["hier_lm_peak_mb"],
                           r["peer_peak_mb"], r["memory_ratio"]] for r in results["peer"]]))
    if results.get("baseline"):
        parts.append("## vs the Transformer baseline with the same 12 layers (Hourglass 2@1 8@4 2@1, batch 1, "
                     "forward+backward)\n\n" + markdown_table(
                         ["L", "Hourglass tokens/s", "Transformer tokens/s", "speed-up", "FLOP ratio"],
                         [[r["length"], round(r["hourglass_tokens_per_s"]), round(r["transformer_tokens_per_s"]),
                           r["speedup"], r["flop_ratio"]] for r in results["baseline"]]))
    if results.get("generation"):
        parts.append("## Generation, cached vs uncached (one-byte prompt)\n\n" + markdown_table(
            ["model", "bytes", "cached s", "uncached s", "speed-up", "same tokens"],
            [[r["model"], r["tokens"], r["cached_s"], r["uncached_s"], r["speedup"], r["same_tokens"]]
             for r in results["generation"]]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--peer-lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--peer-d-model", type=int, default=512)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    if "peer" in args.parts:
        results["peer"] = peer_part(args.peer_lengths, device, args.peer_d_model)
    if "baseline" in args.parts:
        results["baseline"] = baseline_part(args.lengths, device, args.d_model)
    if "generation" in args.parts:
        results["generation"] = generation_part(args.gen_tokens, device)
    out = Path(args.out)
    text = markdown(results, device)
    write_results("hourglass_speed", {"device": device_name(device), **results}, text, out)
    plot(results, out / "hourglass_speed.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
