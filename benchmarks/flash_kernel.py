"""FLASH attention kernels: the Triton kernels against the PyTorch reference, forward+backward, time and peak memory.

    python -m benchmarks.flash_kernel                          # CUDA: bf16, L = 4k .. 64k, B=1, S=128, E=1024, C=256
    python -m benchmarks.flash_kernel --ops mixed quad --modes causal bidir

Ops: `mixed` = `hier_lm.ops.mixed_chunk_attention` (q, k of both parts `[1, L, S]`, v `[1, L, E]`, chunk C),
`quad` = `relu2_attention` (FLASH-Quad, norm = L_max; up to `--quad-max-len`, its reference is O(L^2) in
memory). Each point runs `attn_impl="triton"` and `attn_impl="torch"` on the same inputs, their repeats interleaved
(best of each), then one call of each for the peak memory (CUDA allocator peak above the inputs, gradients
included) and the RMS error of the Triton output relative to the reference.

On CPU the Triton kernels run only in Triton's interpreter (`TRITON_INTERPRET=1`, set here if triton is not
imported yet; otherwise only the reference is measured): tiny float32 sizes that check the script runs end to
end. Their times mean nothing, so a CPU run writes no files into `benchmarks/results/` (pass `--out` to another
folder to keep them).

Writes `benchmarks/results/flash_kernel.{json,md,png}` (CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, peak_memory, pyplot, save_figure,
                               timed_interleaved, write_results)

OPS = ("mixed", "quad")
MODES = ("causal", "bidir")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CUDA_DEFAULTS = dict(lengths=[4096, 8192, 16384, 32768, 65536], s=128, e=1024, chunk=256, dtype="bfloat16")
CPU_DEFAULTS = dict(lengths=[64, 96], s=32, e=64, chunk=32, dtype="float32")
QUICK = ["--lengths", "48", "--repeats", "1"]


def _inputs(op: str, length: int, s: int, e: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device).manual_seed(length)
    n_qk = 4 if op == "mixed" else 2
    shapes = [(1, length, s)] * n_qk + [(1, length, e)]
    return [torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_() for shape in shapes]


def _call(op: str, inputs: list[torch.Tensor], impl: str, causal: bool, chunk: int, norm: int) -> torch.Tensor:
    from hier_lm.ops import mixed_chunk_attention, relu2_attention  # imported after main() set TRITON_INTERPRET

    if op == "mixed":
        return mixed_chunk_attention(*inputs, chunk_size=chunk, causal=causal, attn_impl=impl)
    q, k, v = inputs
    return relu2_attention(q, k, v, causal=causal, norm=norm, attn_impl=impl)


def measure_point(op: str, mode: str, length: int, args, device: torch.device, with_triton: bool) -> dict:
    dtype = DTYPES[args.dtype]
    inputs = _inputs(op, length, args.s, args.e, dtype, device)
    grad = torch.randn(inputs[-1].shape, generator=torch.Generator(device).manual_seed(0), device=device, dtype=dtype)
    causal = mode == "causal"

    def step(impl: str):
        def run():
            _call(op, inputs, impl, causal, args.chunk, args.quad_norm).backward(grad)
            for x in inputs:
                x.grad = None
        return run

    impls = ("triton", "torch") if with_triton else ("torch",)
    times = timed_interleaved({impl: step(impl) for impl in impls}, device, repeats=args.repeats)
    row = {"op": op, "mode": mode, "length": length, "triton_s": None, "triton_peak_mb": None, "rms_error": None,
           "speedup": None, "memory_ratio": None}
    for impl in impls:
        row[f"{impl}_s"] = times[impl]
        row[f"{impl}_peak_mb"] = peak_memory(step(impl), device) / 2**20
    if with_triton:
        with torch.no_grad():
            got = _call(op, inputs, "triton", causal, args.chunk, args.quad_norm).double()
            ref = _call(op, inputs, "torch", causal, args.chunk, args.quad_norm).double()
        row["rms_error"] = ((got - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp(min=1e-30)).item()
        row["speedup"] = row["torch_s"] / row["triton_s"]
        row["memory_ratio"] = row["torch_peak_mb"] / row["triton_peak_mb"]
    print(f"{op} {mode} L={length}: {row}", flush=True)
    del inputs, grad
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _cell(value):
    return "—" if value is None else value


def markdown(results: dict) -> str:
    c = results["config"]
    parts = [f"Device: {results['device']}. Forward+backward in {c['dtype']}, batch 1, S={c['s']}, E={c['e']}, "
             f"C={c['chunk']} (FLASH-Quad: norm={c['quad_norm']}); Triton kernels (`attn_impl=\"triton\"`) vs the "
             f"PyTorch reference (`attn_impl=\"torch\"`, computed in float32 inside), best of {c['repeats']} interleaved "
             "repeats. Speed-up = reference time / Triton time; memory ratio = reference peak / Triton peak; RMS "
             "error of the Triton output relative to the reference's."]
    if results.get("interpreted"):
        parts.append("**Smoke run under Triton's CPU interpreter: the times are not performance.**")
    if results.get("triton_skipped"):
        parts.append(f"Triton not run: {results['triton_skipped']}.")
    for op in results["ops"]:
        rows = [r for r in results["rows"] if r["op"] == op]
        if not rows:
            continue
        title = "mixed chunk attention (FLASH)" if op == "mixed" else "relu^2 attention (FLASH-Quad)"
        parts.append(f"## {title}\n\n" + markdown_table(
            ["mode", "L", "Triton s", "reference s", "speed-up", "Triton peak MiB", "reference peak MiB",
             "memory ratio", "RMS error"],
            [[r["mode"], r["length"], *(_cell(r[k]) for k in ("triton_s", "torch_s", "speedup", "triton_peak_mb",
                                                                "torch_peak_mb", "memory_ratio")),
              "—" if r["rms_error"] is None else f"{r['rms_error']:.1e}"] for r in rows]))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, ylabel) in zip(axes, (("_s", "forward+backward time (s)"), ("_peak_mb", "peak memory (MiB)"))):
        for op in results["ops"]:
            for mode in results["modes"]:
                for impl, style in (("triton", "-"), ("torch", "--")):
                    rows = [r for r in results["rows"] if r["op"] == op and r["mode"] == mode
                            and r[f"{impl}{key}"] is not None]
                    if not rows:
                        continue
                    ax.plot([r["length"] for r in rows], [r[f"{impl}{key}"] for r in rows], style, marker="o",
                            label=f"{op} {mode} {'Triton' if impl == 'triton' else 'reference'}")
        ax.set(yscale="log", xlabel="sequence length L", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"FLASH kernels vs the PyTorch reference ({results['config']['dtype']}, fwd+bwd, batch 1)")
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    """One-line ratios for the summary of the results page, docs/results.md (CUDA results only)."""
    if results.get("interpreted"):
        return []
    lines = []
    for op in results["ops"]:
        rows = [r for r in results["rows"] if r["op"] == op and r["mode"] == "causal" and r["speedup"]]
        if rows:
            r = max(rows, key=lambda r: r["length"])
            lines.append(f"FLASH {'mixed chunk' if op == 'mixed' else 'relu^2 (Quad)'} Triton kernel vs the PyTorch "
                         f"reference at L={r['length']} ({results['config']['dtype']}, causal fwd+bwd): "
                         f"{r['speedup']:.2f}x faster, {r['memory_ratio']:.2f}x less peak memory")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=["mixed"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["causal"])
    parser.add_argument("--lengths", nargs="+", type=int, help="default: 4k..64k on CUDA, 64 96 on CPU")
    parser.add_argument("--s", type=int, help="q/k width S (default 128 on CUDA)")
    parser.add_argument("--e", type=int, help="value width E (default 1024 on CUDA)")
    parser.add_argument("--chunk", type=int, help="chunk size C (default 256 on CUDA)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quad-max-len", type=int, default=16384, help="longest L for the quadratic op")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (after one warm-up)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    interpreted, skipped = device.type != "cuda", None
    if interpreted:
        if args.dtype == "bfloat16":
            raise SystemExit("bfloat16 Triton kernels do not run in the CPU interpreter; use --dtype float32 on CPU")
        if "triton" not in sys.modules:  # the interpreter must be switched on before triton is imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from hier_lm.ops.common import triton_installed, triton_interpreted  # (hier_lm imports triton)

        if not triton_interpreted() or not triton_installed():
            skipped = ("on CPU the kernels need Triton's interpreter: set TRITON_INTERPRET=1 before Python starts "
                       "(triton was imported without it)" if triton_installed() else "triton is not installed")
            print(f"flash_kernel: {skipped}; measuring the reference only", flush=True)
    args.quad_norm = max(min(max(args.lengths), args.quad_max_len), 1)
    load = load_average()
    rows = []
    for op in args.ops:
        lengths = [n for n in sorted(args.lengths) if op == "mixed" or n <= args.quad_max_len]
        for mode in args.modes:
            rows += [measure_point(op, mode, n, args, device, skipped is None) for n in lengths]
    results = {"device": device_name(device), "load_1min_before": load, "interpreted": interpreted,
               "triton_skipped": skipped,
               "ops": args.ops, "modes": args.modes,
               "config": {"dtype": args.dtype, "s": args.s, "e": args.e, "chunk": args.chunk, "batch": 1,
                          "quad_norm": args.quad_norm, "repeats": args.repeats},
               "rows": rows}
    text = markdown(results)
    out = Path(args.out)
    if interpreted and out.resolve() == RESULTS.resolve():
        print(f"CPU (interpreter) smoke run: nothing written to {RESULTS}; pass --out elsewhere to keep the files")
    else:
        write_results("flash_kernel", results, text, out)
        plot(results, out / "flash_kernel.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
