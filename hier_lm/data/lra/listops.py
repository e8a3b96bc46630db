"""ListOps (Nangia & Bowman 2018, as in Long Range Arena): nested MIN / MAX / MED / SM (sum mod 10) over
digits, classify the value (10 classes). The official release `listops-1000/basic_{train,val,test}.tsv`
(columns Source, Target), or the same grammar generated here (`generate_listops`), deterministic by seed.

The benchmark's grammar: a node at depth < max_depth is an operator with probability 0.25 (else a digit; at
max_depth always a digit); an operator takes 2 .. max_args arguments drawn uniformly, and is one of the four
uniformly. An expression is kept if its token count (operators, digits and closing brackets; the release's
round brackets are dropped, as the benchmark's input pipeline drops them) lies strictly between min_length
and max_length: 500 and 2,000 in the release (96,000 / 2,000 / 2,000 examples).
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import Example, LRACache, write_cache
from hier_lm.data.settings import SPLITS, check_sizes, plain_split_sizes

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VOCAB = ("<pad>", *map(str, range(10)), *OPERATORS, CLOSE)  # token id = index; 0 is padding
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)} | {"X": VOCAB.index(CLOSE)}  # the pipeline's "]" -> "X"
RELEASE_FILES = {"train": "basic_train.tsv", "valid": "basic_val.tsv", "test": "basic_test.tsv"}
VALUE_P = 0.25  # probability that a node above max_depth is an operator


def apply(op: str, args: Sequence[int]) -> int:
    """The value of `op` over the digit `args`: MIN, MAX, MED (the median rounded down, as the benchmark's
    `int(np.median(...))`), SM (sum mod 10)."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    return sum(args) % 10


class TooLong(Exception):
    """A random expression reached the length limit: it would be rejected, so it is not drawn further."""


def random_expression(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[int],
                      limit: int) -> int:
    """Append the token ids of one random expression at `depth` to `out` and return its value; `TooLong` once
    `out` holds `limit` tokens (the kept expressions are those that never reach it)."""
    if len(out) >= limit:
        raise TooLong
    if depth >= max_depth or rng.random() > VALUE_P:
        value = rng.randrange(10)
        out.append(TOKEN_IDS[str(value)])
        return value
    op = rng.choice(OPERATORS)
    out.append(TOKEN_IDS[op])
    args = [random_expression(rng, depth + 1, max_depth, max_args, out, limit)
            for _ in range(rng.randint(2, max_args))]
    out.append(TOKEN_IDS[CLOSE])
    return apply(op, args)


def generate_listops(count: int, seed: int, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
                     max_args: int = 10, progress: bool = False) -> Iterator[Example]:
    """`count` distinct random expressions `((token ids,), value)` of `min_length < len(tokens) < max_length`
    (the benchmark's grammar, expressions rooted at depth 1), a function of the arguments only."""
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"data.min_length={min_length} and data.max_length={max_length} leave no length "
                         "strictly between them")
    rng, seen = random.Random(seed), set()
    with tqdm(total=count, desc="generating ListOps", unit="expr", disable=not progress) as bar:
        while len(seen) < count:
            tokens: list[int] = []
            try:
                value = random_expression(rng, 1, max_depth, max_args, tokens, max_length)
            except TooLong:
                continue
            if not min_length < len(tokens) < max_length:
                continue
            ids = np.array(tokens, dtype=np.uint8)
            key = hashlib.blake2b(ids.tobytes(), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                bar.update()
                yield (ids,), value


def encode(tokens: Sequence[str], where: str) -> np.ndarray:
    """Token ids (`uint8`) of ListOps tokens; round brackets are dropped, an unknown token is an error."""
    try:
        return np.array([TOKEN_IDS[t] for t in tokens if t not in ("(", ")")], dtype=np.uint8)
    except KeyError as err:
        raise ValueError(f"{where}: unknown ListOps token {err.args[0]!r}; the tokens are "
                         f"{' '.join(VOCAB[1:])} and round brackets") from None


def read_tsv(path: Path) -> Iterator[Example]:
    """The examples of a release TSV (a header row, then `Source<TAB>Target` rows)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"{path} is not a ListOps TSV: its first row should be Source<TAB>Target, got {header}")
        for line, row in enumerate(rows, start=2):
            if len(row) != 2 or not row[1].strip().isdigit():
                raise ValueError(f"{path}:{line}: expected Source<TAB>Target with a digit target, got {row[:2]}")
            yield (encode(row[0].split(), f"{path}:{line}"),), int(row[1])


def find_release(path: Path) -> Path:
    """The folder that holds the three release TSVs: `path` itself or its `listops-1000/` (the release's
    layout, `lra_release/listops-1000/`)."""
    for folder in (path, path / "listops-1000", path / "lra_release" / "listops-1000"):
        if all((folder / name).is_file() for name in RELEASE_FILES.values()):
            return folder
    raise FileNotFoundError(f"no {', '.join(RELEASE_FILES.values())} in {path} (or its listops-1000/): pass "
                            "data.path=<the release's listops-1000 folder>, or data.generate=true to generate ListOps")


class ListOpsDataModule(LRADataModule):
    """ListOps: 10 classes, tokens `VOCAB` (16 ids, 0 padding), sequences up to `seq_len` (2,000 in the
    benchmark). From the release TSVs in `path`, or, with `generate=True`, generated from `generator_seed`
    (`num_examples` per split, the grammar's `min_length`, `max_length`, `max_depth`, `max_args`); cached
    under `<root>/lra_listops/`. Batches as in `LRADataModule`."""

    name = "lra_listops"
    vocab_size = len(VOCAB)
    num_classes = 10

    def __init__(self, path: str | None = None, generate: bool = False, root: str | None = None,
                 seq_len: int = 2000, num_examples: Sequence[int] = (96000, 2000, 2000), min_length: int = 500,
                 max_length: int = 2000, max_depth: int = 10, max_args: int = 10, generator_seed: int = 0,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_sizes(seq_len=seq_len, max_length=max_length, max_depth=max_depth, batch_size=batch_size,
                    eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if max_args < 2:
            raise ValueError(f"data.max_args must be at least 2 (an operator takes 2 .. max_args arguments), got "
                             f"{max_args}")
        if generator_seed < 0:
            raise ValueError(f"data.generator_seed must be at least 0, got {generator_seed}")
        if not generate and path is None:
            raise ValueError("lra_listops needs data.path=<the release's listops-1000 folder>, or data.generate=true "
                             "to generate the data set")
        num_examples = plain_split_sizes(num_examples, "example", (96000, 2000, 2000))
        path = None if path is None else str(path)
        root = None if root is None else str(root)
        self.save_hyperparameters()

    def cache_folder(self) -> Path:
        h = self.hparams
        if h.generate:
            variant = (f"generated-seed{h.generator_seed}-n{'_'.join(map(str, h.num_examples))}-len{h.min_length}_"
                       f"{h.max_length}-depth{h.max_depth}-args{h.max_args}")
        else:
            variant = "release"
        return self.root / self.name / f"{variant}-seq{h.seq_len}"

    def build_cache(self, folder: Path) -> LRACache:
        h = self.hparams
        if h.generate:
            source = f"generated (seed {h.generator_seed}, {h.min_length} < length < {h.max_length}, depth <= " \
                     f"{h.max_depth}, 2 .. {h.max_args} arguments)"
            examples = list(generate_listops(sum(h.num_examples), h.generator_seed, h.min_length, h.max_length,
                                             h.max_depth, h.max_args, progress=True))
            bounds = np.cumsum([0, *h.num_examples])
            splits = {split: examples[bounds[i]:bounds[i + 1]] for i, split in enumerate(SPLITS)}
        else:
            release = find_release(Path(h.path).expanduser())
            source = str(release.resolve())
            splits = {split: read_tsv(release / RELEASE_FILES[split]) for split in SPLITS}
        return write_cache(folder, splits, self.base_meta(source), progress=True)
