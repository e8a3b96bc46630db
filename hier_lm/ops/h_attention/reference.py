"""H-Transformer-1D attention in plain PyTorch: the reference of `h_attention` (its package docstring defines the
function) and the building blocks that the cached decoding and the Triton path reuse.

Every function here takes tensors already in the compute dtype (float32 or float64) with autocast off; the
callers do the checks, the dtype promotion and the autocast handling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Level", "Partial", "block_pattern", "coarsening_pyramid", "h_attention", "hierarchy_size",
           "level_block_scores", "lse_merge", "merged_levels", "neighbour_blocks", "neighbour_offsets", "normalised_output",
           "padded_inputs", "pairwise_sum", "partial_softmax", "relative_position_bias", "relative_position_index",
           "upsample"]


class Level(NamedTuple):
    """One level of the coarsening pyramid, at its own resolution ``n = L_pad / 2**l`` tokens."""

    query: Tensor  # [B, H, n, D]  scaled by D**-0.5; group mean (bidirectional) or first token (causal)
    key: Tensor  # [B, H, n, D]  mean of the group's real tokens (0 for an all-padding group)
    value: Tensor  # [B, H, n, E]  sum ("sum") or mean ("mean") of the group's real tokens
    key_weight: Tensor  # [*, n]  real tokens per group ("sum"), or 1 ("mean"): what a key adds to the denominator
    key_bias: Tensor  # [*, n]  logit bias: 0 ("sum"), or log(real tokens per group) ("mean")
    key_valid: Tensor  # [*, n]  bool: the group holds at least one real token
    # (* = nothing when every row has the same length, [B, 1] with per-row lengths)


class Partial(NamedTuple):
    """A partial softmax over some keys, per query row: ``sum_j exp(s_j - row_max) * (value_j, weight_j)``."""

    numerator: Tensor  # [B, H, n, E]
    denominator: Tensor  # [B, H, n]
    row_max: Tensor  # [B, H, n]  detached; -inf for a row without any allowed key (then numerator = 0)


# ----------------------------------------------------------------------------------------- hierarchy


def hierarchy_size(length: int, block_size: int) -> tuple[int, int]:
    """(number of levels M, padded length L_pad = block_size * 2**M): the smallest L_pad >= length, M >= 1."""
    levels = 1
    while block_size * 2**levels < length:
        levels += 1
    return levels, block_size * 2**levels


def padded_inputs(q: Tensor, k: Tensor, v: Tensor, padded: int, lengths: Tensor | None, scale: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k: [B, H, L, D], v: [B, H, L, E] -> (q * D**-0.5, k, v) zero-padded to [B, H, L_pad, .], and `real`:
    [L_pad] bool (the first L positions), or [B, 1, L_pad] with per-row `lengths` (a long [B]; the rows of q, k,
    v past each row's length become zero). `scale=False`: q unscaled (the caller scales the logits)."""
    length, dim = q.shape[-2:]
    if padded > length:
        q, k, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (q, k, v))
    if scale:
        q = q * dim**-0.5
    real = torch.arange(padded, device=q.device) < length  # [L_pad]
    if lengths is not None:  # per row: [B, 1, L_pad]; padded rows of q, k, v become zero
        real = real & (torch.arange(padded, device=q.device) < lengths[:, None, None])
        q, k, v = (torch.where(real[..., None], x, 0.0) for x in (q, k, v))
    return q, k, v, real


def pairwise_sum(x: Tensor) -> Tensor:
    """Sum of neighbouring pairs along the time axis: [..., 2n, F] -> [..., n, F]."""
    return x.unflatten(-2, (x.shape[-2] // 2, 2)).sum(-2)


def coarsening_pyramid(
    q: Tensor, k: Tensor, v: Tensor, real: Tensor, levels: int, causal: bool, value_coarsening: str
) -> list[Level]:
    """The M levels of coarse queries / keys / values (see the package docstring).

    q, k: [B, H, L_pad, D] (q already scaled), v: [B, H, L_pad, E], padded rows zero;
    real: [L_pad] or [B, 1, L_pad] bool (per-row lengths).
    """
    count = real.to(q.dtype)  # real fine tokens per group, [*, n]
    q_sum, k_sum, v_sum = q, k, v  # sums over each group's real tokens (padded rows are zero)
    pyramid = []
    for level in range(levels):
        if level > 0:
            count, k_sum, v_sum = pairwise_sum(count[..., None])[..., 0], pairwise_sum(k_sum), pairwise_sum(v_sum)
            if not causal:
                q_sum = pairwise_sum(q_sum)
        valid = count > 0
        per_token = count.clamp(min=1)[..., None]  # avoids 0/0 in all-padding groups (their sums are 0)

        def mean(x: Tensor) -> Tensor:  # level 0: one token per group, its own mean (padded rows are zero)
            return x / per_token if level else x

        # causal: the first token of each group, q[a * 2**l] (sampled at stride 2**l, never averaged)
        query = q[..., :: 2**level, :] if causal else mean(q_sum)
        key = mean(k_sum)
        if value_coarsening == "sum":
            value, weight, bias = v_sum, count, torch.zeros_like(count)
        else:
            value, weight = mean(v_sum), torch.ones_like(count)
            bias = count.clamp(min=1).log()  # l * ln 2 for a full group (0 for an all-padding one: masked)
        pyramid.append(Level(query, key, value, weight, bias, valid))
    return pyramid


# ----------------------------------------------------------------------------------------- block structure


def neighbour_offsets(level: int, causal: bool) -> tuple[int, ...]:
    """Key blocks a query block attends to, as offsets from its own block (own = 0, left = -1, right = +1)."""
    if level == 0:
        return (-1, 0) if causal else (-1, 0, 1)
    return (-1,) if causal else (-1, 1)


def neighbour_blocks(x: Tensor, offsets: tuple[int, ...], block_size: int) -> Tensor:
    """Key windows: [..., n*Nr, F] -> [..., n, len(offsets)*Nr, F]; window of block b = blocks b+o, o in offsets.

    Missing neighbours (before the first / after the last block) are zero-filled.
    """
    blocks = x.unflatten(-2, (x.shape[-2] // block_size, block_size))  # [..., n, Nr, F]
    zero = torch.zeros_like(blocks[..., :1, :, :])
    shifted = []
    for offset in offsets:
        if offset == 0:
            shifted.append(blocks)
        elif offset == -1:  # block b sees block b-1
            shifted.append(torch.cat([zero, blocks[..., :-1, :, :]], dim=-3))
        else:  # block b sees block b+1
            shifted.append(torch.cat([blocks[..., 1:, :, :], zero], dim=-3))
    return torch.cat(shifted, dim=-2)


def block_pattern(offsets: tuple[int, ...], level: int, causal: bool, block_size: int, device) -> Tensor:
    """Allowed (query row, key column) entries of one block window, the same for every block: [Nr, K] bool.

    Own block: all (lower triangle incl. diagonal if causal). Neighbours at level 0: all. Neighbours at
    level >= 1 (the half-block correction): LEFT drops rows [0, h) x cols [h, Nr), RIGHT drops rows [h, Nr)
    x cols [0, h) -- those adjacent half blocks are covered one level finer.
    """
    nr, h = block_size, block_size // 2
    row = torch.arange(nr, device=device)[:, None]
    col = torch.arange(nr, device=device)[None, :]
    parts = []
    for offset in offsets:
        if offset == 0:
            parts.append(col <= row if causal else torch.ones(nr, nr, dtype=torch.bool, device=device))
        elif level == 0:
            parts.append(torch.ones(nr, nr, dtype=torch.bool, device=device))
        elif offset == -1:
            parts.append(~((row < h) & (col >= h)))
        else:
            parts.append(~((row >= h) & (col < h)))
    return torch.cat(parts, dim=-1)


def relative_position_bias(rpb: Tensor, offsets: tuple[int, ...], block_size: int) -> Tensor:
    """h-RPB of one block window: [H or 1, 4*Nr - 1] -> [H or 1, Nr, K], shared by all levels.

    Query row ``a`` of the own block and key ``c`` of block offset ``o`` are ``o*Nr + c - a`` coarse tokens
    apart; that relative position, in [-(2Nr-1), 2Nr-1], indexes the table (shifted by 2Nr-1).
    """
    return rpb[:, relative_position_index(offsets, block_size, rpb.device)]


def relative_position_index(offsets: tuple[int, ...], block_size: int, device) -> Tensor:
    """[Nr, K] long: the h-RPB table entry of each (query row, key column) of a block window."""
    nr = block_size
    a = torch.arange(nr, device=device)[:, None]
    c = torch.arange(nr, device=device)[None, :]
    return torch.cat([offset * nr + c - a for offset in offsets], dim=-1) + 2 * nr - 1


# ----------------------------------------------------------------------------------------- softmax pieces


def level_block_scores(
    coarse: Level, level: int, causal: bool, block_size: int, rpb: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-level block scores, masked. With N = n / Nr blocks and K = len(offsets) * Nr keys per window:
    (scores [B, H, N, Nr, K], -inf where not allowed; key values [B, H, N, K, E]; key weights [*, N, K];
    the keys [B, H, N, K, D])."""
    offsets = neighbour_offsets(level, causal)
    query = coarse.query.unflatten(-2, (coarse.query.shape[-2] // block_size, block_size))  # [B, H, N, Nr, D]
    key = neighbour_blocks(coarse.key, offsets, block_size)  # [B, H, N, K, D]
    value = neighbour_blocks(coarse.value, offsets, block_size)  # [B, H, N, K, E]
    per_key = torch.stack([coarse.key_weight, coarse.key_bias, coarse.key_valid.to(coarse.key_bias.dtype)], -1)
    weight, bias, valid = neighbour_blocks(per_key, offsets, block_size).unbind(-1)  # [*, N, K] each

    scores = query @ key.transpose(-1, -2) + bias[..., None, :]  # [B, H, N, Nr, K]
    if rpb is not None:
        scores = scores + relative_position_bias(rpb, offsets, block_size)[:, None]  # [H, 1, Nr, K]
    pattern = block_pattern(offsets, level, causal, block_size, scores.device)  # [Nr, K]
    allowed = pattern & (valid[..., None, :] > 0)  # [*, N, Nr, K]; missing neighbours and padding are invalid
    return scores.masked_fill(~allowed, float("-inf")), value, weight, key


def partial_softmax(scores: Tensor, value: Tensor, weight: Tensor, dropout_p: float = 0.0) -> Partial:
    """Row-stabilised partial softmax of one level, flattened back to its resolution.

    scores [B, H, N, Nr, K] (-inf = not allowed), value [B, H, N, K, E], weight [N, K] or [B, 1, N, K].
    dropout_p > 0: each (coarse query, coarse key) weight is zeroed with that probability and the kept ones
    scaled by 1 / (1 - dropout_p) in the numerator only, the denominator keeping every weight: dropout on the
    normalised attention weights, at the level's resolution (as the official code, after the partition).
    """
    row_max = scores.detach().amax(-1)  # [B, H, N, Nr]
    offset = torch.where(torch.isfinite(row_max), row_max, 0.0)  # rows without any key: exp(-inf - 0) = 0
    p = torch.exp(scores - offset[..., None])
    numerator = (F.dropout(p, dropout_p) if dropout_p > 0 else p) @ value  # [B, H, N, Nr, E]
    denominator = (p * weight[..., None, :]).sum(-1)  # [B, H, N, Nr]
    return Partial(numerator.flatten(-3, -2), denominator.flatten(-2), row_max.flatten(-2))


def upsample(partial: Partial) -> Partial:
    """Piecewise-constant prolongation: each coarse row is copied to its 2 children (time axis x2)."""
    return Partial(
        partial.numerator.repeat_interleave(2, dim=-2),
        partial.denominator.repeat_interleave(2, dim=-1),
        partial.row_max.repeat_interleave(2, dim=-1),
    )


def lse_merge(a: Partial, b: Partial) -> Partial:
    """Exact merge of two partial softmaxes over disjoint keys: rescale both to the per-row common max."""
    row_max = torch.maximum(a.row_max, b.row_max)
    offset = torch.where(torch.isfinite(row_max), row_max, 0.0)
    scale_a, scale_b = torch.exp(a.row_max - offset), torch.exp(b.row_max - offset)  # 0 for an empty side
    return Partial(
        a.numerator * scale_a[..., None] + b.numerator * scale_b[..., None],
        a.denominator * scale_a + b.denominator * scale_b,
        row_max,
    )


def normalised_output(merged: Partial, real: Tensor, length: int) -> Tensor:
    """numerator / denominator of the merged partial of every level: [B, H, L_pad, .] -> [B, H, L, E].

    real: [L_pad] when every row has L real tokens (each then has an allowed key: itself, or its own block, so
    the denominator is >= 1), or [B, 1, L_pad] with per-row lengths: padded query rows, which may have no key at
    all (0 / 0), give zero.
    """
    numerator, denominator = merged.numerator[..., :length, :], merged.denominator[..., :length, None]
    if real.dim() == 1:
        return numerator / denominator
    return torch.where(real[..., :length, None], numerator / denominator.clamp(min=1e-30), 0.0)


# ----------------------------------------------------------------------------------------- the operator


def h_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool, value_coarsening: str,
                rpb: Tensor | None, lengths: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """The O(L * Nr * D) computation of `h_attention` (arguments checked by it, L >= 1): one loop over the M
    levels, vectorised over blocks, merging the levels' partial softmaxes coarsest first. Returns [B, H, L, E]."""
    merged, real = merged_levels(q, k, v, block_size, causal, value_coarsening, rpb, lengths, dropout_p)
    return normalised_output(merged, real, q.shape[-2])


def merged_levels(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool, value_coarsening: str,
                  rpb: Tensor | None, lengths: Tensor | None, dropout_p: float = 0.0) -> tuple[Partial, Tensor]:
    """The merged partial softmax of every level ([B, H, L_pad, .] rows) and `real` (see `padded_inputs`)."""
    levels, padded = hierarchy_size(q.shape[-2], block_size)
    q, k, v, real = padded_inputs(q, k, v, padded, lengths)
    rpb = None if rpb is None else rpb.to(q.dtype)
    pyramid = coarsening_pyramid(q, k, v, real, levels, causal, value_coarsening)

    merged = None  # coarsest level first; each finer level is merged with the prolonged coarser ones
    for level in reversed(range(levels)):
        scores, value, weight, _ = level_block_scores(pyramid[level], level, causal, block_size, rpb)
        partial = partial_softmax(scores, value, weight, dropout_p)
        merged = partial if merged is None else lse_merge(partial, upsample(merged))
    return merged, real
