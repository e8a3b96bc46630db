"""`python -m hier_lm.data prepare <dataset> [options]`: download and cache a dataset ahead of training, then
print where the cache is, its split sizes, sha256 and each split's unigram entropy.

    python -m hier_lm.data prepare enwik8 [--root DIR] [--path FILE] [--url URL]
    python -m hier_lm.data prepare textfiles [--root DIR] [--paths GLOB ...]
    python -m hier_lm.data prepare lm1b [--root DIR] [--path FILE|DIR] [--url URL] [--vocab-size N] ...
    python -m hier_lm.data prepare imagenet32|imagenet64 --format oord|npz|parquet --path DIR [--root DIR]
"""

from __future__ import annotations

import argparse
import sys

from hier_lm.data.corpus import SPLITS, ByteCorpus, default_data_root, resolve_paths
from hier_lm.data.enwik8 import RAW_SHA256, SPLIT_SIZES, URL, ZIP_SHA256, prepare_enwik8
from hier_lm.data.imagenet import FORMATS, ImageNetCache, prepare_imagenet
from hier_lm.data import lm1b as _lm1b


def _checksum(value: str) -> str | None:
    return None if value.lower() in ("null", "none", "") else value


def _prepare_enwik8(args: argparse.Namespace) -> ByteCorpus:
    return prepare_enwik8(args.root, args.url, args.sha256, args.path, args.raw_sha256, args.split_sizes)


def _prepare_textfiles(args: argparse.Namespace) -> ByteCorpus:
    return ByteCorpus.build(resolve_paths(args.paths), args.root)


def _prepare_lm1b(args: argparse.Namespace) -> _lm1b.TokenCorpus:
    return _lm1b.prepare_lm1b(args.root, source=args.source, path=args.path, url=args.url, sha256=args.sha256,
                              tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                              tokenizer_sample=args.tokenizer_sample, valid_shard=args.valid_shard,
                              test_shard=args.test_shard, hf_name=args.hf_name, hf_revision=args.hf_revision,
                              hf_data_files=dict(args.hf_data_files) if args.hf_data_files else None,
                              hf_text_column=args.hf_text_column)


def _split_files(value: str) -> tuple[str, str]:
    split, sep, files = value.partition("=")
    if not sep or not split or not files:
        raise argparse.ArgumentTypeError(f"expected SPLIT=GLOB, got {value!r}")
    return split, files


def _file_checksum(value: str) -> tuple[str, str]:
    name, sep, digest = value.partition("=")
    if not sep or not name or not digest:
        raise argparse.ArgumentTypeError(f"expected FILE=SHA256, got {value!r}")
    return name, digest


def _prepare_imagenet(args: argparse.Namespace) -> ImageNetCache:
    return prepare_imagenet(args.size, args.format, args.root, args.path, args.url,
                            dict(args.sha256) if args.sha256 else None)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m hier_lm.data", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True, metavar="command")
    prepare = commands.add_parser("prepare", help="download and cache a dataset ahead of training")
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="dataset",
                                      title="datasets",
                                      description="enwik8 | textfiles | lm1b | imagenet32 | imagenet64")
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

    lm1b = datasets.add_parser("lm1b", help="One Billion Word subwords (byte-level BPE) as a token memmap")
    lm1b.add_argument("--root", **root)
    lm1b.add_argument("--source", choices=("tar", "hf"), default="tar",
                      help="tar: the official tarball (default); hf: a Hugging Face copy (only valid/test are cached)")
    lm1b.add_argument("--path", default=None, metavar="FILE|DIR",
                      help=f"a local {_lm1b.TAR_NAME} or the folder extracted from it, used instead of downloading")
    lm1b.add_argument("--url", default=_lm1b.URL, help=f"where to download the tarball (default {_lm1b.URL})")
    lm1b.add_argument("--sha256", type=_checksum, default=_lm1b.SHA256,
                      help="expected sha256 of the tarball; 'null' skips the check")
    lm1b.add_argument("--tokenizer", default=None, metavar="FILE", help="a tokenizers JSON file to use instead of "
                      "training one")
    lm1b.add_argument("--vocab-size", type=int, default=32_000, help="subwords, </s> included (default 32000)")
    lm1b.add_argument("--tokenizer-sample", type=int, default=1_000_000, metavar="N",
                      help="train the tokenizer on the first N training sentences (default 1000000)")
    lm1b.add_argument("--valid-shard", type=int, default=1, help="held-out shard for validation (default 1)")
    lm1b.add_argument("--test-shard", type=int, default=0, help="held-out shard for testing (default 0, the standard)")
    lm1b.add_argument("--hf-name", default=_lm1b.HF_NAME, help=f"--source hf: dataset id (default {_lm1b.HF_NAME})")
    lm1b.add_argument("--hf-revision", type=_checksum, default=_lm1b.HF_REVISION,
                      help=f"--source hf: revision (default {_lm1b.HF_REVISION}; 'null' for the default branch)")
    lm1b.add_argument("--hf-data-files", type=_split_files, nargs="+", default=list(_lm1b.HF_DATA_FILES.items()),
                      metavar="SPLIT=GLOB", help="--source hf: data files per split")
    lm1b.add_argument("--hf-text-column", default="text", help="--source hf: the text column (default text)")
    lm1b.set_defaults(run=_prepare_lm1b)

    for size in (32, 64):
        imagenet = datasets.add_parser(f"imagenet{size}", help=f"downsampled ImageNet {size}x{size} as a uint8 memmap")
        imagenet.add_argument("--root", **root)
        imagenet.add_argument("--format", choices=FORMATS, default="oord",
                              help="oord: train/valid_SxS.tar of PNGs (van den Oord et al., what Hourglass used); "
                                   "npz: the Chrabaszcz et al. Imagenet*_npz.zip files; parquet: a Hugging Face copy")
        imagenet.add_argument("--path", default=None, metavar="DIR",
                              help="a local folder of the format's files (parquet: or a Hugging Face hub id)")
        imagenet.add_argument("--url", default=None, help="a base URL serving the format's files, to download them")
        imagenet.add_argument("--sha256", type=_file_checksum, nargs="+", default=None, metavar="FILE=SHA256",
                              help="expected sha256 of source files, checked when given")
        imagenet.set_defaults(run=_prepare_imagenet, size=size)
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
    own_summary = isinstance(corpus, (ImageNetCache, _lm1b.TokenCorpus))
    print(corpus.describe() if own_summary else describe(args.dataset, corpus))


if __name__ == "__main__":
    main()
