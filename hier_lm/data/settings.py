"""The split names and the checks every DataModule applies to its arguments: one clear `ValueError` per bad
value, and plain Python values (not Hydra's ListConfig / DictConfig, not Path) for the hyperparameters, so
that checkpoints load with `weights_only=True`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")


def check_sizes(**values: int | None) -> None:
    """A `ValueError` naming the setting `data.<name>` whose value is below its least value: 0 for
    `num_workers`, `seed` and `eval_context`, 1 for anything else (None is not checked); `eval_context` must
    also be smaller than `seq_len`."""
    least = {"num_workers": 0, "seed": 0, "eval_context": 0}
    for name, value in values.items():
        if value is not None and value < least.get(name, 1):
            raise ValueError(f"data.{name} must be at least {least.get(name, 1)}, got {value}")
    if values.get("eval_context", 0) >= values.get("seq_len", math.inf):
        raise ValueError(f"data.eval_context must be smaller than data.seq_len = {values['seq_len']} (the window "
                         f"scores its last seq_len - eval_context tokens), got {values['eval_context']}")


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    """`splits` as three floats (train, valid, test), or a clear `ValueError`."""
    try:
        values = tuple(float(x) for x in splits)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"data.splits must be three non-negative fractions (train, valid, test) summing to 1, "
                         f"e.g. [0.9, 0.05, 0.05]; got {splits!r}")
    return values


def plain_split_sizes(split_sizes: Sequence[int], unit: str, example: Sequence[int]) -> list[int]:
    """`split_sizes` (train, valid, test) as three positive plain ints, or a clear `ValueError` naming the
    `unit` counted (byte, image) and an `example`."""
    try:
        sizes = [int(s) for s in split_sizes]
        ok = len(sizes) == 3 and all(s >= 1 and s == x for s, x in zip(sizes, split_sizes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"data.split_sizes must be three positive {unit} counts (train, valid, test), e.g. "
                         f"{list(example)}; got {split_sizes!r}")
    return sizes


def plain(value):
    """`value` with mappings as plain dicts, sequences (ListConfig, tuples) as plain lists and paths as
    strings, recursively."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value
