"""The level structure of H-Transformer-1D attention as dense L x L maps: which level covers each (query,
key) pair. For tests (the dense ``softmax(S_hat)`` oracle) and for plotting; O(M * L^2) memory, so small L.

Written from the closed form of the level coverage, independently of the block windows of ``h_attention``
(which it checks): with ``Nr = block_size``, ``h = Nr / 2`` and, at level ``l``, the coarse query ``a = i >> l``
and coarse key ``c = j >> l`` (``blk(x) = x // Nr``),
    level 0:    ``blk(c) - blk(a)`` in {-1, 0, +1} (causal: {-1, 0} and ``j <= i``): the exact logits;
    level >= 1: ``blk(c) - blk(a)`` in {-1, +1} (causal: {-1}) and ``|a // h - c // h| >= 2`` (the half-block
                correction): one coarse logit for the whole ``2**l x 2**l`` group of pairs.
The levels are ``l = 0 .. M-1`` with ``M >= 1`` the smallest such that ``Nr * 2**M >= L``. Every allowed
pair (causal: ``j <= i``; bidirectional: all) is covered by exactly one level, no other pair by any.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hier_lm.ops.h_attention.checks import check_block_size

__all__ = ["h_attention_num_levels", "h_attention_level_masks", "h_attention_levels"]


def h_attention_num_levels(length: int, block_size: int) -> int:
    """M >= 1, the number of levels: the smallest M with ``block_size * 2**M >= length``."""
    block_size = check_block_size(block_size)
    levels = 1
    while block_size * 2**levels < length:
        levels += 1
    return levels


def h_attention_level_masks(length: int, block_size: int, causal: bool = True) -> Tensor:
    """``BoolTensor[M, L, L]``: entry ``[l, i, j]`` says whether level ``l`` covers query ``i``, key ``j``."""
    levels = h_attention_num_levels(length, block_size)
    nr, half = block_size, block_size // 2
    i = torch.arange(length)[:, None]  # query (rows)
    j = torch.arange(length)[None, :]  # key (columns)
    masks = []
    for level in range(levels):
        a, c = i >> level, j >> level  # coarse query and key at this level
        block_offset = c // nr - a // nr
        if level == 0:
            near = (block_offset >= -1) & (block_offset <= (0 if causal else 1))
            masks.append(near & (j <= i) if causal else near)
        else:
            neighbour = block_offset == -1 if causal else block_offset.abs() == 1
            masks.append(neighbour & ((a // half - c // half).abs() >= 2))
    return torch.stack(masks)


def h_attention_levels(length: int, block_size: int, causal: bool = True) -> Tensor:
    """``LongTensor[L, L]``: the level covering each (query, key) pair, -1 for the pairs no level covers
    (causal: the future). Level 0 pairs get their exact logit, level ``l >= 1`` pairs a coarse one."""
    masks = h_attention_level_masks(length, block_size, causal)
    count = masks.sum(0)
    if (count > 1).any():  # the structure would not be a partition: a bug here, not a user error
        raise RuntimeError(f"{int((count > 1).sum())} pairs are covered by more than one level")
    levels = torch.arange(masks.shape[0])[:, None, None]
    return torch.where(count > 0, (masks.long() * levels).sum(0), -1)
