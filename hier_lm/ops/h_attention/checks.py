"""Argument checks shared by `h_attention`, `h_attention_decode` and the level maps of `structure.py`."""

from __future__ import annotations

import numbers

__all__ = ["VALUE_COARSENINGS", "check_block_size", "check_value_coarsening"]

VALUE_COARSENINGS = ("sum", "mean")


def check_block_size(block_size) -> int:
    """block_size (Nr): an even integer >= 2, returned as an int."""
    ok = isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool)
    if not ok or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size (Nr) must be an even integer >= 2, got {block_size!r}")
    return int(block_size)


def check_value_coarsening(value_coarsening: str) -> None:
    if value_coarsening not in VALUE_COARSENINGS:
        raise ValueError(f"value_coarsening must be one of {VALUE_COARSENINGS}, got {value_coarsening!r}")
