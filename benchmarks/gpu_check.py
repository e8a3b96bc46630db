"""The GPU check: the kernel tests on the GPU, the kernels against the references and SDPA, a bf16-mixed step per model.

    python -m benchmarks run gpu_check            # or: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --parts tests kernels --lengths 4096 16384

One command for a machine with a CUDA GPU, sized to finish in about 8 minutes on an H100:

1. `tests`: the kernel tests on CUDA tensors (`HIER_LM_TEST_DEVICE=cuda pytest` on the H-attention, FLASH and
   precision test files, compiled kernels instead of the interpreter), pass / fail counts and the failures;
2. `kernels`: forward+backward time and peak memory at L = 4k .. 64k, in bf16 and fp32 (TF32 allowed, "high"), of
   `h_attention` (Triton and the PyTorch reference; B 1, H 8, D 64, Nr 16, causal) and `mixed_chunk_attention`
   (Triton and reference; B 1, S 128, E 1024, C 256, causal) against causal `scaled_dot_product_attention` at the
   same shapes (FlashAttention in bf16; for FLASH: 8 heads of 128, the same value width), the repeats interleaved;
   the references stop where they would exceed `--reference-max-len`;
3. `models`: one bf16-mixed (autocast) training step of each model family at its defaults (attn_impl "auto": the
   Triton kernels), its loss and time.

Writes `benchmarks/results/gpu_check.{json,md}` with the device named. Without a CUDA GPU it exits with status 2
and one line saying so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (RESULTS, device_name, load_average, markdown_table, optimizer_step, peak_memory,
                               timed_interleaved, write_results)

PARTS = ("tests", "kernels", "models")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TEST_FILES = ("tests/test_h_attention_triton.py", "tests/test_chunk_attention_triton.py",
              "tests/test_kernel_precision.py")
ROOT = Path(__file__).resolve().parents[1]


def run_tests(timeout: int) -> dict:
    """The kernel tests on the GPU, in a subprocess (Triton compiled, not interpreted)."""
    env = {**os.environ, "HIER_LM_TEST_DEVICE": "cuda", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider", "-rf"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"{expired.stdout or ''}\ntimed out after {timeout} s", None
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", output.splitlines()[-1]
                                                        if output.strip() else "")}
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(command[1:]), "returncode": code, "seconds": round(time.perf_counter() - start, 1),
            "counts": counts, "failures": failures[:40]}


def _attention_calls(op: str, length: int, dtype: torch.dtype, device: torch.device) -> dict:
    """{method: fwd+bwd closure} of one op at one length: Triton, the reference, and SDPA at the same shape."""
    from hier_lm.ops import h_attention, mixed_chunk_attention

    g = torch.Generator(device).manual_seed(length)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

    if op == "h_attention":
        q, k, v = (leaf(1, 8, length, 64) for _ in range(3))
        sdpa = (q, k, v)

        def call(impl):
            return lambda: h_attention(q, k, v, 16, causal=True, attn_impl=impl)
    else:
        qk = [leaf(1, length, 128) for _ in range(4)]
        v = leaf(1, length, 1024)
        sdpa = tuple(leaf(1, 8, length, 128) for _ in range(3))

        def call(impl):
            return lambda: mixed_chunk_attention(*qk, v, chunk_size=256, causal=True, attn_impl=impl)
    calls = {"triton": call("triton"), "reference": call("torch"),
             "sdpa": lambda: F.scaled_dot_product_attention(*sdpa, is_causal=True)}

    def fwd_bwd(fn):
        def run():
            fn().float().sum().backward()
        return run

    return {name: fwd_bwd(fn) for name, fn in calls.items()}


def measure_kernels(lengths: list[int], dtypes: list[str], repeats: int, reference_max_len: int,
                    device: torch.device) -> list[dict]:
    rows = []
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 on tensor cores (TF32), for the kernels and SDPA alike
    try:
        for dtype_name in dtypes:
            for op in ("h_attention", "mixed_chunk_attention"):
                for length in lengths:
                    calls = _attention_calls(op, length, DTYPES[dtype_name], device)
                    if length > reference_max_len:
                        del calls["reference"]
                    row = {"op": op, "dtype": dtype_name, "length": length}
                    try:
                        times = timed_interleaved(calls, device, repeats=repeats)
                        for name, fn in calls.items():
                            row[f"{name}_ms"] = times[name] * 1e3
                            row[f"{name}_peak_mb"] = peak_memory(fn, device) / 2**20
                        row["triton_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
                    except torch.OutOfMemoryError as error:
                        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
                    print(f"gpu_check kernels: {row}", flush=True)
                    rows.append(row)
                    del calls
                    torch.cuda.empty_cache()
    finally:
        torch.set_float32_matmul_precision(previous)
    return rows


def model_steps(length: int, device: torch.device) -> list[dict]:
    """One bf16-mixed training step (AdamW) of each family at its defaults, batch 2 at `length` tokens."""
    from hier_lm.models import MODELS

    rows = []
    for name, model_class in MODELS.items():
        torch.manual_seed(0)
        model = model_class(max_len=length).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = torch.randint(0, model.vocab_size, (2, length + 1), device=device)
        row = {"family": name, "length": length, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                optimizer_step(model, optimizer, batch)  # compiles the kernels: not timed
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                row["loss"] = optimizer_step(model, optimizer, batch)
                torch.cuda.synchronize(device)
            row["step_ms"] = (time.perf_counter() - start) * 1e3
            row["finite"] = bool(torch.isfinite(torch.tensor(row["loss"])))
        except (RuntimeError, ValueError) as error:  # recorded, so that one family does not hide the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        print(f"gpu_check models: {row}", flush=True)
        rows.append(row)
        del model, optimizer
        torch.cuda.empty_cache()
    return rows


def _fmt(value, digits=2):
    return "—" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else value)


def markdown(results: dict) -> str:
    parts = [f"Device: {results['device']}. Parts run: {', '.join(results['parts'])}; "
             f"{results['seconds']:.0f} s in all."]
    if "tests" in results:
        t = results["tests"]
        counts = ", ".join(f"{n} {kind}" for kind, n in t["counts"].items()) or "no summary"
        parts.append(f"## Kernel tests on the GPU\n\n`{t['command']}`: {counts} ({t['seconds']:.0f} s)."
                     + "".join(f"\n- {line}" for line in t["failures"]))
    if "kernels" in results:
        rows = results["kernels"]
        parts.append("## Kernels vs the references and SDPA (forward+backward, causal)\n\n"
                     "h_attention: B 1, H 8, D 64, Nr 16; mixed_chunk_attention: B 1, S 128, E 1024, C 256 (SDPA at "
                     "8 heads of 128). fp32 with TF32 allowed. Times in ms, best of the interleaved repeats; "
                     "SDPA / Triton > 1: the kernel is faster.\n\n" + markdown_table(
                         ["op", "dtype", "L", "Triton ms", "reference ms", "SDPA ms", "SDPA / Triton", "Triton MiB",
                          "reference MiB", "SDPA MiB"],
                         [[r["op"], r["dtype"], r["length"], *(_fmt(r.get(k)) for k in (
                             "triton_ms", "reference_ms", "sdpa_ms", "triton_vs_sdpa", "triton_peak_mb",
                             "reference_peak_mb", "sdpa_peak_mb"))] for r in rows]))
        errors = [f"- {r['op']} {r['dtype']} L={r['length']}: {r['error']}" for r in rows if "error" in r]
        if errors:
            parts.append("\n".join(errors))
    if "models" in results:
        parts.append("## One bf16-mixed training step per model family (defaults, batch 2)\n\n" + markdown_table(
            ["family", "L", "params (M)", "loss", "step ms", "error"],
            [[r["family"], r["length"], _fmt(r["params_m"], 1), _fmt(r.get("loss"), 3), _fmt(r.get("step_ms"), 1),
              r.get("error", "")] for r in results["models"]]))
    return "\n\n".join(parts)


def headlines(results: dict) -> list[str]:
    """The causal bf16 kernel ratios against SDPA at the longest length measured (docs/results.md)."""
    lines = []
    for op in ("h_attention", "mixed_chunk_attention"):
        rows = [r for r in results.get("kernels", []) if r["op"] == op and r["dtype"] == "bfloat16"
                and "triton_vs_sdpa" in r]
        if rows:
            r = max(rows, key=lambda r: r["length"])
            lines.append(f"{op} Triton vs SDPA (FlashAttention) on {results['device']} at L={r['length']} (bf16, "
                         f"causal fwd+bwd): {r['triton_vs_sdpa']:.2f}x SDPA's speed")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max-len", type=int, default=16384,
                        help="the PyTorch references run up to this length (their time grows fastest)")
    parser.add_argument("--model-len", type=int, default=2048, help="tokens per row of the model steps")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds for the kernel tests")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda")
    start = time.perf_counter()
    results = {"device": device_name(device), "load_1min_before": load_average(), "parts": args.parts}
    if "tests" in args.parts:
        results["tests"] = run_tests(args.tests_timeout)
    if "kernels" in args.parts:
        results["kernels"] = measure_kernels(sorted(args.lengths), args.dtypes, args.repeats, args.reference_max_len,
                                             device)
    if "models" in args.parts:
        results["models"] = model_steps(args.model_len, device)
    results["seconds"] = time.perf_counter() - start
    text = markdown(results)
    write_results("gpu_check", results, text, Path(args.out))
    print(text)
    return results


if __name__ == "__main__":
    main()
