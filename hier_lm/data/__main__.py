"""`python -m hier_lm.data prepare <dataset> [options]`: download and cache a dataset ahead of training, then
print where the cache is, its split sizes, sha256 and each split's unigram entropy.

    python -m hier_lm.data prepare enwik8 [--root DIR] [--path FILE] [--url URL]
    python -m hier_lm.data prepare textfiles [--root DIR] [--paths GLOB ...]
"""

from __future__ import annotations

import argparse
import sys

from hier_lm.data.corpus import SPLITS, ByteCorpus, default_data_root, resolve_paths
from hier_lm.data.enwik8 import RAW_SHA256, SPLIT_SIZES, URL, ZIP_SHA256, prepare_enwik8


def _checksum(value: str) -> str | None:
    return None if value.lower() in ("null", "none", "") else value


def _prepare_enwik8(args: argparse.Namespace) -> ByteCorpus:
    return prepare_enwik8(args.root, args.url, args.sha256, args.path, args.raw_sha256, args.split_sizes)


def _prepare_textfiles(args: argparse.Namespace) -> ByteCorpus:
    return ByteCorpus.build(resolve_paths(args.paths), args.root)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m hier_lm.data", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True, metavar="command")
    prepare = commands.add_parser("prepare", help="download and cache a dataset ahead of training")
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="dataset",
                                      title="datasets", description="enwik8 | textfiles")
    root = {"default": None, "metavar": "DIR",
            "help": f"cache root (default: $HIER_LM_DATA or ./data, now {default_data_root()})"}

    enwik8 = datasets.add_parser("enwik8", help="enwik8 bytes, split 90M/5M/5M")
    enwik8.add_argument("--root", **root)
    enwik8.add_argument("--path", default=None, metavar="FILE",
                        help="a local enwik8.zip or the extracted enwik8 file, used instead of downloading")
    enwik8.add_argument("--url", default=URL, help=f"where to download enwik8.zip (default {URL})")
    enwik8.add_argument("--sha256", type=_checksum, default=ZIP_SHA256,
                        help="expected sha256 of enwik8.zip; 'null' skips the check")
    enwik8.add_argument("--raw-sha256", type=_checksum, default=RAW_SHA256,
                        help="expected sha256 of the extracted bytes; 'null' skips the check")
    enwik8.add_argument("--split-sizes", type=int, nargs=3, default=list(SPLIT_SIZES),
                        metavar=("TRAIN", "VALID", "TEST"), help="split sizes in bytes (default 90M 5M 5M)")
    enwik8.set_defaults(run=_prepare_enwik8)

    textfiles = datasets.add_parser("textfiles", help="any local files as one byte stream, split 90/5/5 %%")
    textfiles.add_argument("--root", **root)
    textfiles.add_argument("--paths", nargs="+", default=["stdlib"], metavar="GLOB",
                           help="globs, files or folders, or 'stdlib' (default)")
    textfiles.set_defaults(run=_prepare_textfiles)
    return main


def describe(name: str, corpus: ByteCorpus) -> str:
    meta = corpus.meta
    lines = [f"{name} cache: {corpus.path.resolve()}",
             f"  corpus.bin: {meta['bytes']:,} bytes, sha256 {meta['sha256']}"]
    for split in SPLITS:
        start, end = meta["splits"][split]
        lines.append(f"  {split:<5}  {end - start:>13,} bytes  [{start:,}, {end:,})  "
                     f"unigram entropy {corpus.unigram_entropy(split):.4f} bits/byte")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        corpus = args.run(args)
    except (FileNotFoundError, ValueError) as err:  # the errors a user can fix: one line, exit code 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(describe(args.dataset, corpus))


if __name__ == "__main__":
    main()
