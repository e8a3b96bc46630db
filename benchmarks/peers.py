"""hier_lm vs the public PyTorch ports of H-Transformer-1D and FLASH, at the ports' configs, in one run.

    python -m benchmarks.peers                                  # both pairs at L = 4096 and 8192
    python -m benchmarks.peers --pairs flash --lengths 4096

Needs the ports, for measurement only: `pip install -r benchmarks/requirements.txt` (never a dependency of
hier_lm). Pairs (forward+backward of one batch of 1 byte-level sequence, repeats interleaved: ours, port,
ours, port, ...; best of each; then peak memory of one call each):
- `h_transformer`: `hier_lm.models.HTransformer1D` vs `h_transformer_1d.HTransformer1D`, dim 512, depth 2,
  8 heads of 64, block 16 (Nr), causal, d_ff 2048 (the port's ff_mult 4). Ours uses RoPE (`pos="rope"`)
  like the port's rotary embedding (which it applies to q, k and v).
- `flash`: `hier_lm.models.FLASH` (`mode="chunk"`) vs `flash_pytorch.FLASHTransformer`, dim 512, depth 4,
  group/chunk 256, query_key_dim / s 128, expansion 2, scalenorm, causal (the port's defaults otherwise:
  token shift, partial rotary, T5 relative bias, absolute sinusoidal embedding).

Defect probes (small and cheap; each names what it measures):
- `h_weights`: one causal attention layer of each with q = k = 0 and v = the identity (L = 1024, Nr = 16),
  so its output row i IS query i's weights over the keys; exact causal softmax gives 1 / (i + 1) on every
  key j <= i. Reported: the fraction of the causal (i, j <= i) pairs with non-zero weight, the largest weight
  on a future key (leakage), the largest |row sum - 1| and the largest |weight - exact|.
- `prefix`: the largest |logit difference| on the first 512 positions between a 512-token input and the
  same input extended to 1024 tokens (causal models must give 0 up to float rounding), for both models of
  each pair and for the FLASH port's `GAU(causal=True)`, which divides its logits by the runtime length.

Writes `benchmarks/results/peers.{json,md,png}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, peak_memory, publish, pyplot,
                               save_figure, timed_interleaved, train_step)
from hier_lm.models import FLASH, HTransformer1D
from hier_lm.ops import h_attention

PAIRS = ("h_transformer", "flash")
PORTS = {"h_transformer": ("h-transformer-1d", "h_transformer_1d"), "flash": ("FLASH-pytorch", "flash_pytorch")}
QUICK = ["--lengths", "128", "--d-model", "32", "--repeats", "1", "--probe-length", "64"]


def _port(pair: str):
    """The port's module, or None (with a message) when it is not installed."""
    package, module = PORTS[pair]
    try:
        return __import__(module)
    except ImportError:
        print(f"peers: {package} is not installed (pip install -r benchmarks/requirements.txt); skipping {pair}")
        return None


def build_pair(pair: str, length: int, d_model: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(hier_lm model, port model) of `pair` at the port's config, for sequences of `length` tokens."""
    torch.manual_seed(0)
    port = _port(pair)
    if pair == "h_transformer":
        ours = HTransformer1D(vocab_size=256, d_model=d_model, n_layers=2, n_heads=8, d_ff=4 * d_model, dropout=0.0,
                              block_size=16, max_len=length, pos="rope", causal=True)
        peer = port.HTransformer1D(num_tokens=256, dim=d_model, depth=2, max_seq_len=length, causal=True, heads=8,
                                   dim_head=d_model // 8, ff_mult=4, block_size=16)
    else:
        ours = FLASH(vocab_size=256, d_model=d_model, n_layers=4, expansion=2, s=128, mode="chunk", chunk_size=256,
                     causal=True, dropout=0.0, max_len=length, norm="scalenorm")
        peer = port.FLASHTransformer(num_tokens=256, dim=d_model, depth=4, group_size=256, query_key_dim=128,
                                     expansion_factor=2.0, causal=True)
    return ours.to(device), peer.to(device)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def speed_rows(pair: str, lengths: list[int], d_model: int, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for length in lengths:
        ours, peer = build_pair(pair, length, d_model, device)
        tokens = torch.randint(0, 256, (1, length + 1), device=device)
        row = {"pair": pair, "length": length, "load_1min": load_average(), "hier_lm_params": n_params(ours),
               "peer_params": n_params(peer)}
        steps = {"hier_lm": lambda: train_step(ours, tokens), "peer": lambda: train_step(peer, tokens)}
        times = timed_interleaved(steps, device, repeats=repeats)
        for name, step in steps.items():
            row[f"{name}_s"] = times[name]
            row[f"{name}_peak_mb"] = peak_memory(step, device) / 2**20
        row["speedup"] = row["peer_s"] / row["hier_lm_s"]
        row["memory_ratio"] = row["hier_lm_peak_mb"] / row["peer_peak_mb"]
        print(f"peers {pair} L={length}: {row}", flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def h_weights_probe(length: int, block: int = 16) -> dict:
    """Attention weights of one causal layer of each implementation under q = k = 0, v = I (see the module
    docstring): coverage of the causal triangle, leakage, row sums and distance from exact softmax."""
    exact = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None]
    eye = torch.eye(length)
    results = {"length": length, "block_size": block}
    ours = h_attention(torch.zeros(1, 1, length, 1), torch.zeros(1, 1, length, 1), eye[None, None], block)[0, 0]
    candidates = {"hier_lm": ours}
    port = _port("h_transformer")
    if port is not None:
        from h_transformer_1d.h_transformer_1d import CausalHAttention1D

        layer = CausalHAttention1D(length, max_seq_len=length, heads=1, dim_head=length, block_size=block)
        layer.to_qkv.weight.copy_(torch.cat([torch.zeros(2 * length, length), eye]))  # q = k = 0, v = x
        layer.to_out.weight.copy_(eye)
        layer.to_out.bias.zero_()
        candidates["peer"] = layer(eye[None])[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for name, weights in candidates.items():
        results[name] = {
            "causal_coverage": (weights[causal] > 1e-9).float().mean().item(),
            "max_future_weight": weights[~causal].abs().max().item(),
            "max_row_sum_error": (weights.sum(-1) - 1).abs().max().item(),
            "max_abs_error_vs_exact": (weights - exact).abs().max().item(),
        }
    return results


@torch.no_grad()
def prefix_probe(length: int, d_model: int) -> dict:
    """max |output[:, :length] of a `length`-token input - the same positions of its 2*length extension|."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (1, 2 * length))
    results = {"length": length, "extended_to": 2 * length}
    for pair in PAIRS:
        if _port(pair) is None:
            continue
        for name, model in zip(("hier_lm", "peer"), build_pair(pair, 2 * length, d_model, torch.device("cpu"))):
            model.eval()
            delta = (model(tokens[:, :length]) - model(tokens)[:, :length]).abs().max().item()
            results[f"{pair}_{name}"] = delta
    if _port("flash") is not None:
        from flash_pytorch import GAU

        gau = GAU(dim=d_model, query_key_dim=128, causal=True).eval()
        x = torch.randn(1, 2 * length, d_model)
        results["flash_peer_gau"] = (gau(x[:, :length]) - gau(x)[:, :length]).abs().max().item()
    return results


LABELS = {"h_transformer": "H-Transformer-1D vs h-transformer-1d", "flash": "FLASH vs FLASH-pytorch"}


def markdown(results: dict) -> str:
    parts = [f"Device: {results['device']}. Forward+backward of one sequence (batch 1), best of "
             f"{results['repeats']} interleaved repeats; peak memory of one call each. speed-up = port time / "
             f"hier_lm time; memory ratio = hier_lm / port."]
    for pair in PAIRS:
        rows = [r for r in results["speed"] if r["pair"] == pair]
        if not rows:
            continue
        config = ("dim 512, depth 2, 8 heads, block 16, causal; ours with RoPE" if pair == "h_transformer" else
                  "dim 512, depth 4, group 256, query_key_dim 128, causal, mode=chunk")
        parts.append(f"## {LABELS[pair]} ({config})\n\n" + markdown_table(
            ["L", "hier_lm params", "port params", "hier_lm s", "port s", "speed-up", "hier_lm peak MiB",
             "port peak MiB", "memory ratio"],
            [[r["length"], f"{r['hier_lm_params'] / 1e6:.2f}M", f"{r['peer_params'] / 1e6:.2f}M", r["hier_lm_s"],
              r["peer_s"], r["speedup"], r["hier_lm_peak_mb"], r["peer_peak_mb"], r["memory_ratio"]] for r in rows]))
    probe = results.get("h_weights")
    if probe:
        names = [n for n in ("hier_lm", "peer") if n in probe]
        parts.append(f"## Defect probe: causal attention weights with q = k = 0, v = I (L={probe['length']}, "
                     f"Nr={probe['block_size']}); exact softmax gives 1/(i+1) on every key j <= i\n\n" + markdown_table(
                         ["implementation", "causal pairs covered", "max weight on a future key", "max row-sum error",
                          "max error vs exact"],
                         [[{"hier_lm": "hier_lm h_attention", "peer": "h-transformer-1d CausalHAttention1D"}[n],
                           f"{100 * probe[n]['causal_coverage']:.1f}%", probe[n]["max_future_weight"],
                           probe[n]["max_row_sum_error"], probe[n]["max_abs_error_vs_exact"]] for n in names]))
    prefix = results.get("prefix")
    if prefix:
        labels = {"h_transformer_hier_lm": "hier_lm HTransformer1D", "h_transformer_peer": "h-transformer-1d HTransformer1D",
                  "flash_hier_lm": "hier_lm FLASH", "flash_peer": "FLASH-pytorch FLASHTransformer",
                  "flash_peer_gau": "FLASH-pytorch GAU(causal=True)"}
        parts.append(f"## Defect probe: does appending tokens change earlier outputs? max |output[:{prefix['length']}] "
                     f"with {prefix['length']} vs {prefix['extended_to']} tokens| (0 up to float rounding is causal)"
                     "\n\n" + markdown_table(["model", "max change of earlier outputs"],
                                             [[labels[k], prefix[k]] for k in labels if k in prefix]))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    pairs = [p for p in PAIRS if any(r["pair"] == p for r in results["speed"])]
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(5.5 * max(1, len(pairs)), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        rows = [r for r in results["speed"] if r["pair"] == pair]
        xs = [r["length"] for r in rows]
        ax.plot(xs, [r["hier_lm_s"] for r in rows], marker="o", label="hier_lm")
        ax.plot(xs, [r["peer_s"] for r in rows], marker="o", label=PORTS[pair][0])
        ax.set(xlabel="sequence length", ylabel="forward+backward (s)", title=LABELS[pair])
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    lines = [f"{LABELS[r['pair']]} at L={r['length']}: {r['speedup']:.2f}x the port's speed, "
             f"{r['memory_ratio']:.2f}x its peak memory" for r in results["speed"]]
    probe = results.get("h_weights", {})
    if "peer" in probe:
        lines.append(f"h-transformer-1d causal layer covers {100 * probe['peer']['causal_coverage']:.0f}% of the causal "
                     f"(query, key) pairs (hier_lm: {100 * probe['hier_lm']['causal_coverage']:.0f}%)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model (after one warm-up)")
    parser.add_argument("--probe-length", type=int, default=1024, help="L of the h_weights probe (prefix: half)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": device_name(device), "load_1min_before": load_average(), "repeats": args.repeats,
               "d_model": args.d_model, "speed": []}
    for pair in args.pairs:
        if _port(pair) is not None:
            results["speed"] += speed_rows(pair, args.lengths, args.d_model, device, args.repeats)
    results["h_weights"] = h_weights_probe(args.probe_length)
    results["prefix"] = prefix_probe(args.probe_length // 2, args.d_model)
    print(f"peers probes: {results['h_weights']} {results['prefix']}", flush=True)
    return publish("peers", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
