"""What every benchmark shares: the machine it ran on, peak memory and timing helpers, the results files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hier_lm.files import atomic_write, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The device, CPU, thread count and library versions, as recorded beside every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()['cpu']})"


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeats` wall time of `fn()` in seconds, after `warmup` calls, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def timed_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device, repeats: int = 3,
                      warmup: int = 1) -> dict[str, float]:
    """Best-of-`repeats` wall time in seconds of each `fns[name]()`, the calls interleaved (A, B, A, B, ...)
    after `warmup` calls of each, so that a change of machine load hits every one alike: the ratios of a
    shared machine come out of one run, measured back to back."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, device, repeats=1, warmup=0))
    return best


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """One next-token forward+backward of a language model on `tokens: LongTensor[B, L + 1]` (no optimiser)."""
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                   clip: float | None = None) -> float:
    """One training step on `batch: LongTensor[B, L + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`); the loss."""
    loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()


def load_average() -> float:
    """The 1-minute load average (`os.getloadavg()[0]`), recorded before each benchmark: the machine is shared."""
    return round(os.getloadavg()[0], 2)


def cpu_allocation_profile(fn: Callable[[], object]) -> tuple[int, int]:
    """(largest single allocation by one op, peak of live tensor bytes) on CPU while `fn()` runs, from the
    profiler's raw allocation / free records (kineto "[memory]" events) replayed in time order. Unlike the
    process RSS, this excludes the interpreter, the libraries and memory held before `fn` started."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.name != "[memory]"), default=0)
    return largest, peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `fn()` runs: the CUDA allocator's peak, or on CPU the peak of live tensor
    bytes (`cpu_allocation_profile`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_allocation_profile(fn)[1]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(x) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> Path:
    """Write `<out_dir>/<name>.json` (payload + machine) and `<name>.md`; returns the json path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path = out_dir / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = (f"# {name}\n\nMachine: {m.get('gpu', m['cpu'])}, {m['cpu_cores']} cores, torch threads: "
              f"{m['torch_threads']}, torch {m['torch']}, "
              f"{m['date']}.\n\n")
    atomic_write_text(out_dir / f"{name}.md", header + markdown.rstrip() + "\n")
    return path


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as a PNG (atomically: never a half-written file), and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def publish(name: str, results: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None],
            out_dir: str | Path = RESULTS) -> dict:
    """Write a benchmark's `<name>.json` and `.md` (`write_results`) and its plot `<name>.png` into `out_dir`,
    print the table and return `results`."""
    out_dir = Path(out_dir)
    text = markdown(results)
    write_results(name, results, text, out_dir)
    plot(results, out_dir / f"{name}.png")
    print(text)
    return results
