"""Incremental (cached) decoding of causal H-Transformer-1D attention: the new tokens' rows of
`h_attention` without recomputing the sequence (the official code has no decoding cache).

With causal, first-token ("sampled") coarse queries, the far field of a level-`l` group `a` (fine tokens
`[a*2**l, (a+1)*2**l)`) is the partial softmax of its first token's query against the coarse keys of level-`l`
block `a // Nr - 1` (minus the half-block correction): every one of those keys is a complete group that
precedes group `a`, so the partial is final once group `a`'s first token exists. Each layer's `HAttentionCache` keeps
    level 0:      the fine keys / values from block `t // Nr - 1` on (the near field of the next token);
    level l >= 1: the sums of keys / values of the complete level-`l` groups from block `a // Nr - 1` on
                  (a = the next new group), built pairwise from level `l-1` as groups complete,
                  and the far-field partial (numerator, denominator, row max) of the current level-`l` group.
Every buffer holds fewer than `2 * Nr` rows, so a token costs `O(Nr * D)` per level: its level-0 partial
(<= 2Nr keys), a new partial at each level whose group it starts (Nr keys), and an exact log-sum-exp merge of
its level-0 part with the cached partials of its groups, in the order the uncached operator merges them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hier_lm.ops.common import no_autocast, promoted_dtypes
from hier_lm.ops.h_attention.checks import check_block_size, check_value_coarsening
from hier_lm.ops.h_attention.reference import (
    Partial,
    block_pattern,
    lse_merge,
    pairwise_sum,
    partial_softmax,
    relative_position_bias,
)

__all__ = ["HAttentionCache", "h_attention_decode"]


@dataclass
class HAttentionCache:
    """Decoding state of one h-attention layer (see the module docstring). Entry `i` of level `l`'s buffers
    is the complete level-`l` group `starts[l] + i`; level 0 holds single tokens."""

    n: int = 0  # tokens seen
    keys: list[Tensor] = field(default_factory=list)  # level l: key sums per group, [B, H, < 2Nr, D]
    values: list[Tensor] = field(default_factory=list)  # level l: value sums per group, [B, H, < 2Nr, E]
    starts: list[int] = field(default_factory=list)
    partials: dict[int, Partial] = field(default_factory=dict)  # level >= 1: current group's far field, 1 row

    def extend(self, k: Tensor, v: Tensor) -> None:
        """Append fine `k: [B, H, m, D]`, `v: [B, H, m, E]` and build the level-l groups they complete."""
        if not self.keys:
            self.keys, self.values, self.starts = [k[:, :, :0]], [v[:, :, :0]], [0]
        self.keys[0], self.values[0] = torch.cat((self.keys[0], k), 2), torch.cat((self.values[0], v), 2)
        total, level = self.n + k.shape[2], 1
        while total >> level:  # level l has at least one complete group
            if level == len(self.keys):
                self.keys.append(k[:, :, :0]), self.values.append(v[:, :, :0]), self.starts.append(0)
            done, now = self.starts[level] + self.keys[level].shape[2], total >> level
            if now > done:  # groups done..now-1 are the pairs 2*done..2*now-1 of the level below
                lo, hi = 2 * done - self.starts[level - 1], 2 * now - self.starts[level - 1]
                for store in (self.keys, self.values):
                    store[level] = torch.cat((store[level], pairwise_sum(store[level - 1][:, :, lo:hi])), 2)
            level += 1

    def trim(self, total: int, block_size: int) -> None:
        """Drop the groups no later token needs: the next new level-l group `a = ceil(total / 2**l)` reads
        block `a // Nr - 1`, and building level `l+1` needs only groups from `2 * (total >> (l+1))` on."""
        for level, start in enumerate(self.starts):
            keep = max(0, (-(-total >> level) // block_size - 1) * block_size)
            if keep > start:  # copies (< 2Nr rows), so that a long chunk's tensors are not kept alive
                self.keys[level] = self.keys[level][:, :, keep - start :].clone()
                self.values[level] = self.values[level][:, :, keep - start :].clone()
                self.starts[level] = keep


def _empty_partial(query: Tensor, value_dim: int) -> Partial:
    """A partial softmax over no key at all, one row: `[B, H, 1, E]`, `[B, H, 1]`, row max -inf."""
    B, H = query.shape[:2]
    return Partial(query.new_zeros(B, H, 1, value_dim), query.new_zeros(B, H, 1),
                   query.new_full((B, H, 1), float("-inf")))


def _window_partial(query: Tensor, keys: Tensor, values: Tensor, start: int, first: Tensor, allowed: Tensor,
                    weight: float, bias: float, rpb_rows: Tensor | None) -> Partial:
    """Partial softmax of `n` queries over their key windows of one level's buffer.

    query `[B, H, n, D]` (scaled); keys / values `[B, H, S, D/E]`, entry i = group `start + i`; `first: [n]`
    the group of each query's first window key; `allowed: [n, K]` the pattern rows (windows before group 0
    are masked here); `weight` what each key adds to the denominator, `bias` its logit bias; `rpb_rows:
    [H, n, K]`. Returns one row per query.
    """
    index = first[:, None] + torch.arange(allowed.shape[1], device=first.device)  # [n, K] absolute groups
    allowed = allowed & (index >= 0)
    local = (index - start).clamp(0, max(keys.shape[2] - 1, 0))
    key, value = keys[:, :, local], values[:, :, local]  # [B, H, n, K, D/E]
    scores = query[..., None, :] @ key.transpose(-1, -2)  # [B, H, n, 1, K]
    if bias:
        scores = scores + bias
    if rpb_rows is not None:
        scores = scores + rpb_rows[:, :, None, :]
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return partial_softmax(scores, value, torch.full(allowed.shape, weight, dtype=scores.dtype,
                                                     device=scores.device))


def _take_rows(partial: Partial, index: Tensor) -> Partial:
    return Partial(partial.numerator[:, :, index], partial.denominator[:, :, index], partial.row_max[:, :, index])


def _cat_rows(parts: list[Partial]) -> Partial:
    return Partial(*(torch.cat(xs, dim=2) for xs in zip(*parts)))


def h_attention_decode(q: Tensor, k: Tensor, v: Tensor, cache: HAttentionCache, block_size: int,
                       value_coarsening: str = "sum", rpb: Tensor | None = None) -> Tensor:
    """Causal `h_attention` of the `m` new tokens `q, k: [B, H, m, D]`, `v: [B, H, m, E]` that follow the
    `cache.n` tokens already passed through `cache` (updated in place). Returns `[B, H, m, E]`, equal to the
    last `m` rows of `h_attention` over the whole sequence up to float rounding."""
    nr = check_block_size(block_size)
    check_value_coarsening(value_coarsening)
    out_dtype, dtype = promoted_dtypes(q, k, v)
    m, dim = q.shape[2:]
    start, end = cache.n, cache.n + m
    if m == 0:
        return v.new_zeros(v.shape, dtype=out_dtype)
    with no_autocast(q.device):
        q, k, v = q.to(dtype) * dim**-0.5, k.to(dtype), v.to(dtype)
        rpb = None if rpb is None else rpb.to(dtype)
        cache.extend(k, v)
        t = torch.arange(start, end, device=q.device)  # the new tokens' positions

        merged = None  # coarsest level first, as in the uncached operator (levels above `top` are empty)
        top = max((level for level in range(1, len(cache.keys)) if (end - 1) >> level >= nr), default=0)
        far_pattern = block_pattern((-1,), 1, True, nr, q.device)  # [Nr, Nr], the same for every level >= 1
        far_rpb = None if rpb is None else relative_position_bias(rpb, (-1,), nr)  # [H, Nr, Nr]
        for level in range(top, 0, -1):
            size, first_group = 2**level, start >> level
            parts = []
            if first_group * size < start:  # the group of the first new token began earlier: cached
                cached = cache.partials.get(level)  # absent while this level's groups had no left block
                parts.append(cached if cached is not None else _empty_partial(q, v.shape[-1]))
            groups = torch.arange(-(-start // size), ((end - 1) >> level) + 1, device=q.device)  # new groups
            if len(groups):
                row = groups % nr  # coarse key = mean of the group; value: sum, or mean with bias log(size)
                if value_coarsening == "sum":
                    values, weight, bias = cache.values[level], float(size), 0.0
                else:
                    values, weight, bias = cache.values[level] / size, 1.0, math.log(size)
                parts.append(_window_partial(
                    q[:, :, groups * size - start], cache.keys[level] / size, values, cache.starts[level],
                    (groups // nr - 1) * nr, far_pattern[row], weight, bias,
                    None if far_rpb is None else far_rpb[:, row]))
            table = _cat_rows(parts)
            cache.partials[level] = Partial(*(x[:, :, -1:].clone() for x in table))
            partial = _take_rows(table, (t >> level) - first_group)  # each new token's row, [B, H, m, .]
            merged = partial if merged is None else lse_merge(partial, merged)

        row = t % nr  # level 0: the own block up to the token and the block to its left
        near = _window_partial(
            q, cache.keys[0], cache.values[0], cache.starts[0], (t // nr - 1) * nr,
            block_pattern((-1, 0), 0, True, nr, q.device)[row], 1.0, 0.0,
            None if rpb is None else relative_position_bias(rpb, (-1, 0), nr)[:, row])
        merged = near if merged is None else lse_merge(near, merged)
        cache.n = end
        cache.trim(end, nr)
        out = merged.numerator / merged.denominator[..., None]
    return out.to(out_dtype)
