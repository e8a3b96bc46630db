"""The cost of checking a dataset cache when it is opened, against opening it unchecked and one training step.

    python -m benchmarks.cache_verify                            # the quickstart corpus and a 100 MB cache
    python -m benchmarks.cache_verify --synthetic-mb 1000 --repeats 3
    python -m benchmarks.cache_verify data.paths=[src/**/*.py]   # any Hydra override of the recipe

Measured on this machine, interleaved, best of `--repeats`, the files in the page cache (as they are after the
first epoch or the build; a file read from disk adds its read time, which the training's first pass over it
pays anyway):
- the checksum candidates (hashlib sha256 and blake2b, zlib crc32, xxhash xxh3-64) over the 100 MB file read
  through a memmap in 16 MiB chunks: MB/s. The caches use the fastest;
- opening the recipe's byte cache (`--recipe`, default `quickstart`; built first if absent, under
  `$HIER_LM_DATA` or `data/`) and a synthetic `--synthetic-mb` cache split like enwik8 (90 / 5 / 5 %): without
  the check (`verify=False`: the meta and the file sizes, the old path) and with it (every chunk checksum);
  also the one-time check of a cache written before the chunk checksums (sha256 plus the checksums);
- one training step of the recipe's model (forward, cross-entropy, backward, clipping, AdamW) on a batch in
  memory, interleaved with the opens. A training run opens its cache twice (prepare_data and setup).

Writes `benchmarks/results/cache_verify.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import xxhash
from hydra.utils import instantiate

from benchmarks.common import (RESULTS, load_average, markdown_table, optimizer_step, publish, pyplot, save_figure,
                               timed, timed_interleaved)
from hier_lm.config import compose_train_config
from hier_lm.data import ByteCorpus
from hier_lm.data.cache import CHECKSUMS, CHUNK_BYTES, META, chunk_ranges
from hier_lm.data.text.corpus import CORPUS
from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer

QUICK = ["--synthetic-mb", "2", "--repeats", "1"]
CPU = torch.device("cpu")


def hash_speeds(path: Path, repeats: int) -> dict[str, float]:
    """MB/s of each checksum candidate over the file `path`, read through a memmap in `CHUNK_BYTES` chunks."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    chunks = [data[start:end] for start, end in chunk_ranges(len(data))]
    candidates = {"sha256": lambda b: hashlib.sha256(b).digest(), "blake2b": lambda b: hashlib.blake2b(b).digest(),
                  "crc32": zlib.crc32, "xxh3_64": xxhash.xxh3_64_intdigest}
    times = timed_interleaved({name: (lambda h=h: [h(chunk) for chunk in chunks]) for name, h in candidates.items()},
                              CPU, repeats)
    return {name: len(data) / 1e6 / t for name, t in times.items()}


def synthetic_cache(folder: Path, megabytes: float) -> ByteCorpus:
    """A byte cache of `megabytes` MB of random bytes split 90 / 5 / 5 % (enwik8's split at 100 MB)."""
    total = int(megabytes * 1e6)
    ends = [total * 90 // 100, total * 95 // 100, total]
    bounds = dict(zip(("train", "valid", "test"), ([s, e] for s, e in zip([0, *ends[:2]], ends))))
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, 256, min(CHUNK_BYTES, total - start), dtype=np.uint8).tobytes()
              for start in range(0, total, CHUNK_BYTES))
    return ByteCorpus.write(folder, chunks, bounds, {"dataset": "synthetic"})


def upgrade_s(folder: Path, repeats: int) -> float:
    """Seconds of the first open of the cache `folder` as a cache written before the chunk checksums (sha256 and
    the checksums computed, meta.json rewritten); its meta.json is restored after."""
    meta_text = (folder / META).read_text()
    old_meta = json.dumps({k: v for k, v in json.loads(meta_text).items() if k != CHECKSUMS}, indent=2) + "\n"

    def upgrade() -> None:
        (folder / META).write_text(old_meta)
        ByteCorpus(folder)

    seconds = timed(upgrade, CPU, repeats)
    (folder / META).write_text(meta_text)
    return seconds


def training_step(cfg, data):
    """One training step of the recipe's model on a batch in memory (a function), and the model's size."""
    torch.manual_seed(cfg.seed)
    model = build_model({**cfg.model, "vocab_size": data.vocab_size}).train()
    optimizer, _ = build_optimizer(model, cfg.trainer.max_steps, **cfg.optim)
    batch = next(iter(data.train_dataloader()))
    return (lambda: optimizer_step(model, optimizer, batch, cfg.trainer.gradient_clip_val),
            sum(p.numel() for p in model.parameters()))


def measure(cfg, megabytes: float, repeats: int) -> dict:
    data = instantiate(cfg.data, num_workers=0)
    data.prepare_data()  # builds the recipe's cache if absent
    data.setup("fit")
    step, parameters = training_step(cfg, data)
    with tempfile.TemporaryDirectory(prefix="cache_verify_") as tmp:
        copy = Path(tmp) / "recipe"  # timed on a copy: the recipe's own meta.json is never rewritten
        copy.mkdir()
        for name in (CORPUS, META):
            shutil.copy(data.corpus.path / name, copy / name)
        folders = {"recipe": copy, "synthetic": synthetic_cache(Path(tmp) / "synthetic", megabytes).path}
        fns = {"step": step}
        for key, folder in folders.items():
            fns[f"{key} open"] = lambda folder=folder: ByteCorpus(folder, verify=False)
            fns[f"{key} check"] = lambda folder=folder: ByteCorpus(folder)
        times = timed_interleaved(fns, CPU, repeats)
        caches = {}
        for key, folder in folders.items():
            meta = ByteCorpus(folder).meta
            caches[key] = {"bytes": meta["bytes"], "chunks": len(meta[CHECKSUMS]["files"][CORPUS]),
                           "open_s": times[f"{key} open"], "open_verify_s": times[f"{key} check"],
                           "upgrade_s": upgrade_s(folder, repeats)}
        speeds = hash_speeds(folders["synthetic"] / CORPUS, repeats)
    return {"model": {"name": cfg.model.name, "parameters": parameters, "step_s": times["step"],
                      "batch": [cfg.data.batch_size, cfg.data.seq_len]},
            "caches": caches, "hash_mb_per_s": speeds, "chunk_bytes": CHUNK_BYTES}


def _label(results: dict, key: str) -> str:
    return (f"{results['recipe']} corpus" if key == "recipe" else "synthetic (enwik8 split)") + \
        f", {results['caches'][key]['bytes'] / 1e6:.1f} MB"


def markdown(results: dict) -> str:
    m = results["model"]
    head = (f"Recipe `{results['recipe']}` ({' '.join(results['overrides']) or 'as shipped'}). Best of "
            f"{results['repeats']}, interleaved, files in the page cache. Checksums: xxh3-64 of chunks of at most "
            f"{results['chunk_bytes'] >> 20} MiB (never across a split). One training step of {m['name']} "
            f"({m['parameters'] / 1e6:.2f}M parameters, batch {m['batch'][0]} x {m['batch'][1]}): "
            f"{m['step_s'] * 1e3:.1f} ms.")
    rows = [[_label(results, key), c["chunks"], f"{c['open_s'] * 1e3:.2f}", f"{c['open_verify_s'] * 1e3:.2f}",
             f"{(c['open_verify_s'] - c['open_s']) / m['step_s']:.1%}", f"{c['upgrade_s'] * 1e3:.1f}"]
            for key, c in results["caches"].items()]
    table = markdown_table(["cache", "chunks", "open, unchecked (ms)", "open + check (ms)",
                            "check / training step", "first open of an old cache (ms)"], rows)
    speeds = markdown_table(["checksum", "MB/s"], [[name, f"{v:,.0f}"] for name, v in
                                                   sorted(results["hash_mb_per_s"].items(), key=lambda kv: -kv[1])])
    return f"{head}\n\n{table}\n\nChecksum speed over the synthetic file (memmap, chunked):\n\n{speeds}"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names, values, colors = [], [], []
    for key, c in results["caches"].items():
        names += [f"{key}\nunchecked", f"{key}\nchecked"]
        values += [c["open_s"] * 1e3, c["open_verify_s"] * 1e3]
        colors += ["C0", "C2"]
    names.append("training\nstep")
    values.append(results["model"]["step_s"] * 1e3)
    colors.append("C1")
    left.bar(names, values, color=colors)
    left.set(yscale="log", ylabel="ms (log)", title="Opening a cache vs one training step")
    left.grid(alpha=0.3, axis="y", which="both")
    speeds = results["hash_mb_per_s"]
    right.bar(list(speeds), list(speeds.values()), color="C4")
    right.set(ylabel="MB/s", title="Checksum speed (memmap, 16 MiB chunks)")
    right.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def headlines(results: dict) -> list[str]:
    step = results["model"]["step_s"]
    return [f"opening and checking the {_label(results, key)} cache: {c['open_verify_s'] * 1e3:.1f} ms "
            f"({(c['open_verify_s'] - c['open_s']) / step:.1%} of one {results['recipe']} training step)"
            for key, c in results["caches"].items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe (key=value)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--synthetic-mb", type=float, default=100.0, help="size of the synthetic cache in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    load = load_average()
    cfg = compose_train_config([f"recipe={args.recipe}", *args.overrides])
    results = {"device": "cpu", "load_1min_before": load, "recipe": args.recipe, "overrides": args.overrides,
               "repeats": args.repeats}
    results.update(measure(cfg, args.synthetic_mb, args.repeats))
    return publish("cache_verify", results, markdown, plot, args.out)


if __name__ == "__main__":
    main()
