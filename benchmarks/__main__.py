"""The benchmark suite's entry point.

    python -m benchmarks list                                  # every benchmark and what it measures
    python -m benchmarks run attention_scaling peers           # their main() with defaults -> benchmarks/results/
    python -m benchmarks run all --quick                       # tiny sizes, a smoke run (into a temp folder)
    python -m benchmarks run model_throughput --threads 1 --out /tmp/results
    python -m benchmarks results                               # docs/results.md from benchmarks/results/

A benchmark is a module `benchmarks/<name>.py` with `main(argv)` that accepts `--out DIR` and writes
`<DIR>/<name>.{json,md,png}`; `QUICK` (a list of arguments) makes `--quick` possible. Nothing is installed
here: the public peers come from `pip install -r benchmarks/requirements.txt`. CPU by default, CUDA when
present (each benchmark's `--device`).

`results` writes the whole results page (default docs/results.md), generated, never edited by hand: the
machines and dates, the headline ratios of every benchmark first (its module's `headlines(results)`), then
each benchmark's tables and its plot, linked relative to the page. `readme` is a deprecated alias of `results`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, load_average
from hier_lm.files import atomic_write_text

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "common"}
ORDER = ("attention_scaling", "peers", "model_throughput", "generation_speed", "data_throughput", "hourglass_speed",
         "same_compute")  # the results page's order; others follow alphabetically
RESULTS_PAGE = HERE.parent / "docs" / "results.md"
# --quick arguments of benchmarks that do not define QUICK themselves.
QUICK_FALLBACK = {"hourglass_speed": ["--parts", "baseline", "generation", "--lengths", "64", "--d-model", "32",
                                      "--gen-tokens", "12"]}


def discover() -> dict[str, str]:
    """{name: first line of its docstring} of every benchmark module, in page order (read without importing)."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem in NOT_BENCHMARKS:
            continue
        tree = ast.parse(path.read_text())
        if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            continue
        found[path.stem] = (ast.get_docstring(tree) or "").strip().split("\n")[0]
    return {name: found[name] for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))}


def quick_args(name: str, module) -> list[str]:
    args = getattr(module, "QUICK", None) or QUICK_FALLBACK.get(name)
    if args is None:
        raise SystemExit(f"benchmark {name!r} has no --quick settings; run it without --quick")
    return list(args)


def run(names: list[str], quick: bool, out: str | None, threads: int | None) -> Path:
    available = discover()
    if names == ["all"]:
        names = [n for n in available if n != "gpu_check"]  # CUDA only: run it by name
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from: "
                         f"{', '.join(available)} (or all)")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out) if out else (Path(tempfile.mkdtemp(prefix="hier_lm_bench_")) if quick else RESULTS)
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        argv = (quick_args(name, module) if quick else []) + ["--out", str(out_dir)]
        print(f"== {name} (load average {load_average()}): {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        module.main(argv)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"results in {out_dir}")
    return out_dir


def _fallback_headlines(name: str, results: dict) -> list[str]:
    """Headline ratios of the benchmarks whose modules predate `headlines()`."""
    lines = []
    if name == "hourglass_speed":
        lines += [f"Hourglass vs hourglass-transformer-pytorch at L={r['length']}: {1 / r['time_ratio']:.2f}x the "
                  f"port's speed, {r['memory_ratio']:.2f}x its peak memory" for r in results.get("peer", [])]
        lines += [f"Hourglass 2@1 8@4 2@1 vs a 12-layer Transformer at L={r['length']}: {r['speedup']:.2f}x the "
                  f"training throughput (FLOP ratio {r['flop_ratio']:.2f})" for r in results.get("baseline", [])]
    elif name == "same_compute":
        runs = results.get("runs", [])
        lines.append(f"same {results.get('budget_s', 0):g} s training budget: "
                     + ", ".join(f"{r['name']} {r['final_valid_bpc']:.3f} bpc" for r in runs))
    return lines


def headlines(name: str, results: dict) -> list[str]:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        module = None
    fn = getattr(module, "headlines", None)
    try:
        return fn(results) if fn else _fallback_headlines(name, results)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # an older results file
        print(f"results: no headlines for {name} ({type(err).__name__}: {err})", file=sys.stderr)
        return []


def _machine_line(m: dict) -> str:
    where = m.get("gpu") or m.get("cpu", "?")
    return (f"{where}, {m.get('cpu_cores', '?')} cores, {m.get('torch_threads', '?')} torch threads, torch "
            f"{m.get('torch', '?')}, {m.get('date', '?')}")


def _tables(md: str) -> str:
    """A results .md without its `# name` title and machine line, every heading one level deeper (under the
    page's `## name`)."""
    lines = md.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = ["#" + line if line.startswith("#") else line for line in lines if not line.startswith("Machine: ")]
    return "\n".join(lines).strip()


def results_page(results_dir: Path, page_dir: Path) -> str:
    """The Markdown of the results page from `results_dir/*.json|md|png`; plots linked relative to `page_dir`."""
    names = [n for n in discover() if (results_dir / f"{n}.json").exists()]
    names += sorted(p.stem for p in results_dir.glob("*.json") if p.stem not in names)
    if not names:
        raise SystemExit(f"no results in {results_dir}: run `python -m benchmarks run <names>` first")
    payloads = {n: json.loads((results_dir / f"{n}.json").read_text()) for n in names}
    machines = sorted({_machine_line(p.get("machine", {})).rsplit(", ", 1)[0] for p in payloads.values()})
    dates = sorted({p.get("machine", {}).get("date", "?") for p in payloads.values()})
    rel = Path(os.path.relpath(results_dir, page_dir)).as_posix()
    out = ["# Results", "",
           "Generated by `python -m benchmarks results` from `benchmarks/results/`: do not edit this page by hand; "
           "rerun a benchmark with `python -m benchmarks run <name>`, then regenerate it "
           "([benchmarks.md](benchmarks.md) says what each benchmark measures). Every ratio comes from one run, "
           "its pair measured back to back.", "",
           "Machine" + ("s" if len(machines) > 1 else "") + ": " + "; ".join(machines) + ". Date"
           + ("s" if len(dates) > 1 else "") + ": " + ", ".join(dates) + ".", "", "## Ratios", ""]
    for name in names:
        for line in headlines(name, payloads[name]):
            out.append(f"- {line} (`{name}`)")
    for name in names:
        payload = payloads[name]
        out += ["", f"## {name}", "", f"_{_machine_line(payload.get('machine', {}))}"
                + (f"; 1-minute load average before: {payload['load_1min_before']}" if "load_1min_before" in payload
                   else "") + "._", ""]
        md = results_dir / f"{name}.md"
        if md.exists():
            out.append(_tables(md.read_text()))
        if (results_dir / f"{name}.png").exists():
            out += ["", f"![{name}]({rel}/{name}.png)"]
    return "\n".join(out).rstrip() + "\n"


def write_results_page(page: Path, results_dir: Path) -> str:
    """Write the whole results page `page` from `results_dir` (atomically); returns its text."""
    text = results_page(results_dir, page.resolve().parent)
    atomic_write_text(page, text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the benchmarks and what each measures")
    p_run = sub.add_parser("run", help="run benchmarks with their defaults (or tiny sizes with --quick)")
    p_run.add_argument("names", nargs="*", help="benchmark names, or all")
    p_run.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (default out: a temp folder)")
    p_run.add_argument("--out", help=f"results folder (default {RESULTS}, or a temp folder with --quick)")
    p_run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    for command, help_text in (("results", "regenerate the results page (docs/results.md) from the results"),
                               ("readme", "deprecated alias of `results`")):
        p_results = sub.add_parser(command, help=help_text)
        p_results.add_argument("--out", default=str(RESULTS_PAGE), help=f"the page to write (default {RESULTS_PAGE})")
        p_results.add_argument("--results", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, doc in discover().items():
            print(f"{name:20s} {doc}")
    elif args.command == "run":
        run(args.names, args.quick, args.out, args.threads)
    else:
        if args.command == "readme":
            print("`python -m benchmarks readme` is deprecated: use `python -m benchmarks results` (the results now "
                  "live in docs/results.md, not in README.md)", file=sys.stderr)
        write_results_page(Path(args.out), Path(args.results))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
