"""H-Transformer-1D hierarchical attention (Zhu & Soricut 2021): the plain PyTorch reference.

The semantics are those of the authors' official code (research/h_transformer_1d.md §1), with an exact
row-wise softmax stabiliser instead of its single global offset. Triton kernels are tested against this.

Notation: ``Nr`` = ``block_size``, ``h = Nr / 2``; the sequence is padded to ``L_pad = Nr * 2**M`` (the
smallest such length >= L with M >= 1) and level ``l = 0..M-1`` is a sequence of ``L_pad / 2**l`` coarse
tokens cut into blocks of ``Nr``; coarse token ``a`` of level ``l`` stands for fine tokens
``[a * 2**l, (a + 1) * 2**l)``.

Coarsening (the "pyramid"), over the real (unpadded) tokens of each group only:
    keys    mean of the group's real tokens (sum of unmasked / count of unmasked);
    values  sum of the group's real tokens (``value_coarsening="sum"``), or their mean plus a logit bias
            ``log(count)`` (= ``l * ln 2`` for a full group; ``"mean"``) -- the same function;
    queries mean of the group (bidirectional), or its FIRST token (causal: no leakage from the future).
Padding only ever fills the end of the last real group of a level. There the official code takes the mean of
the non-empty children's means, level by level; here the mean is over the group's real tokens (each real
token weighs the same). Both agree on every group without padding. A right-padded batch (``lengths``, one
length per row) is the same thing row by row: the pyramid's counts and masks then get a leading [B, 1].

Which (query, key) pairs each level covers (coarse query ``a``, coarse key ``c``, ``blk(x) = x // Nr``):
    level 0:   ``blk(c) - blk(a)`` in {-1, 0, +1} (causal: {-1, 0} and ``c <= a``);
    level >= 1: ``blk(c) - blk(a)`` in {-1, +1} (causal: {-1}) and ``|a // h - c // h| >= 2`` -- the
               half-block correction: the adjacent half blocks were already covered one level finer.
Together the levels cover every allowed fine pair (causal: ``j <= i``; bidirectional: all) exactly once, so
the output equals ``softmax(S_hat) @ V`` with the piecewise-constant logits
    ``S_hat[i, j] = q_l[i >> l] . k_l[j >> l] * D**-0.5 (+ rpb)`` for the unique level ``l`` covering (i, j),
and ``-inf`` for the pairs no level covers (the future, padding).

Computation: one loop over the M levels, vectorised over blocks. Each level attends its query blocks to the
neighbouring key blocks ([Nr, 2Nr] or [Nr, 3Nr] scores per block) and returns a partial softmax
(numerator, denominator, row max) at its own resolution; partials are merged coarsest first, each copied to
its 2 children and combined with per-row rescaling to the common max (an exact log-sum-exp merge). Time and
memory O(L * Nr * D); no L x L matrix is ever formed.

Precision: computed in float32 at least (float64 stays float64), autocast disabled inside; the output has
the inputs' (promoted) dtype. Gradients flow to q, k, v and rpb (the row maxima are detached: the result
does not depend on them).
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hier_lm.ops.dispatch import resolve_impl

__all__ = ["h_attention"]

VALUE_COARSENINGS = ("sum", "mean")


class _Level(NamedTuple):
    """One level of the coarsening pyramid, at its own resolution ``n = L_pad / 2**l`` tokens."""

    query: Tensor  # [B, H, n, D]  scaled by D**-0.5; group mean (bidirectional) or first token (causal)
    key: Tensor  # [B, H, n, D]  mean of the group's real tokens (0 for an all-padding group)
    value: Tensor  # [B, H, n, E]  sum ("sum") or mean ("mean") of the group's real tokens
    key_weight: Tensor  # [*, n]  real tokens per group ("sum"), or 1 ("mean"): what a key adds to the denominator
    key_bias: Tensor  # [*, n]  logit bias: 0 ("sum"), or log(real tokens per group) ("mean")
    key_valid: Tensor  # [*, n]  bool: the group holds at least one real token
    # (* = nothing when every row has the same length, [B, 1] with per-row lengths)


class _Partial(NamedTuple):
    """A partial softmax over some keys, per query row: ``sum_j exp(s_j - row_max) * (value_j, weight_j)``."""

    numerator: Tensor  # [B, H, n, E]
    denominator: Tensor  # [B, H, n]
    row_max: Tensor  # [B, H, n]  detached; -inf for a row without any allowed key (then numerator = 0)


# ----------------------------------------------------------------------------------------- checks


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k: [B, H, L, D] (same shape); v: [B, H, L, E]; floating point, one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must be [B, H, L, E] with B, H, L of q {tuple(q.shape[:-1])}, got {tuple(v.shape)}")
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_block_size(block_size) -> int:
    ok = isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool)
    if not ok or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size (Nr) must be an even integer >= 2, got {block_size!r}")
    return int(block_size)


def _check_rpb(rpb: Tensor, heads: int, block_size: int) -> Tensor:
    """rpb: [H, 4*Nr - 1] or [4*Nr - 1] (shared by the heads) -> [H or 1, 4*Nr - 1]."""
    want = 4 * block_size - 1
    if not isinstance(rpb, Tensor) or not rpb.is_floating_point():
        raise TypeError(f"rpb must be a floating-point tensor [H, {want}] or [{want}], got {rpb!r}")
    if rpb.dim() == 1:
        rpb = rpb[None]
    if rpb.dim() != 2 or rpb.shape[1] != want or rpb.shape[0] not in (1, heads):
        raise ValueError(
            f"rpb must be [H={heads}, 4*block_size-1={want}] or [{want}] (one bias per relative offset), "
            f"got {tuple(rpb.shape)}"
        )
    return rpb


def _check_lengths(lengths, batch: int, length: int, device) -> Tensor:
    """lengths: [B] integers in [0, L] -> a long tensor on `device`."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must be [B={batch}] integers (real tokens per row), got "
                         f"{lengths.dtype} of shape {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > length):
        raise ValueError(f"lengths must lie in [0, L={length}], got min {lengths.min().item()}, "
                         f"max {lengths.max().item()}")
    return lengths.long()


def _dtypes(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype): the promoted input dtype, and it promoted to at least float32."""
    out = tensors[0].dtype
    for x in tensors[1:]:
        out = torch.promote_types(out, x.dtype)
    return out, torch.promote_types(out, torch.float32)


def _no_autocast(device: torch.device):
    """Autocast would cast our float32 matmuls back to half precision; switch it off inside."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


# ----------------------------------------------------------------------------------------- hierarchy


def _hierarchy_size(length: int, block_size: int) -> tuple[int, int]:
    """(number of levels M, padded length L_pad = block_size * 2**M): the smallest L_pad >= length, M >= 1."""
    levels = 1
    while block_size * 2**levels < length:
        levels += 1
    return levels, block_size * 2**levels


def _pairwise_sum(x: Tensor) -> Tensor:
    """Sum of neighbouring pairs along the time axis: [..., 2n, F] -> [..., n, F]."""
    return x.unflatten(-2, (x.shape[-2] // 2, 2)).sum(-2)


def _coarsening_pyramid(
    q: Tensor, k: Tensor, v: Tensor, real: Tensor, levels: int, causal: bool, value_coarsening: str
) -> list[_Level]:
    """The M levels of coarse queries / keys / values (see the module docstring).

    q, k: [B, H, L_pad, D] (q already scaled), v: [B, H, L_pad, E], padded rows zero;
    real: [L_pad] or [B, 1, L_pad] bool (per-row lengths).
    """
    count = real.to(q.dtype)  # real fine tokens per group, [*, n]
    q_sum, k_sum, v_sum = q, k, v  # sums over each group's real tokens (padded rows are zero)
    pyramid = []
    for level in range(levels):
        if level > 0:
            count, k_sum, v_sum = _pairwise_sum(count[..., None])[..., 0], _pairwise_sum(k_sum), _pairwise_sum(v_sum)
            if not causal:
                q_sum = _pairwise_sum(q_sum)
        valid = count > 0
        per_token = count.clamp(min=1)[..., None]  # avoids 0/0 in all-padding groups (their sums are 0)
        # causal: the first token of each group, q[a * 2**l] (sampled at stride 2**l, never averaged)
        query = q[..., :: 2**level, :] if causal else q_sum / per_token
        key = k_sum / per_token
        if value_coarsening == "sum":
            value, weight, bias = v_sum, count, torch.zeros_like(count)
        else:
            value, weight = v_sum / per_token, torch.ones_like(count)
            bias = count.clamp(min=1).log()  # l * ln 2 for a full group (0 for an all-padding one: masked)
        pyramid.append(_Level(query, key, value, weight, bias, valid))
    return pyramid


# ----------------------------------------------------------------------------------------- block structure


def _neighbour_offsets(level: int, causal: bool) -> tuple[int, ...]:
    """Key blocks a query block attends to, as offsets from its own block (own = 0, left = -1, right = +1)."""
    if level == 0:
        return (-1, 0) if causal else (-1, 0, 1)
    return (-1,) if causal else (-1, 1)


def _neighbour_blocks(x: Tensor, offsets: tuple[int, ...], block_size: int) -> Tensor:
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


def _block_pattern(offsets: tuple[int, ...], level: int, causal: bool, block_size: int, device) -> Tensor:
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


def _relative_position_bias(rpb: Tensor, offsets: tuple[int, ...], block_size: int) -> Tensor:
    """h-RPB of one block window: [H or 1, 4*Nr - 1] -> [H or 1, Nr, K], shared by all levels.

    Query row ``a`` of the own block and key ``c`` of block offset ``o`` are ``o*Nr + c - a`` coarse tokens
    apart; that relative position, in [-(2Nr-1), 2Nr-1], indexes the table (shifted by 2Nr-1).
    """
    nr = block_size
    a = torch.arange(nr, device=rpb.device)[:, None]
    c = torch.arange(nr, device=rpb.device)[None, :]
    index = torch.cat([offset * nr + c - a for offset in offsets], dim=-1) + 2 * nr - 1  # [Nr, K]
    return rpb[:, index]


# ----------------------------------------------------------------------------------------- softmax pieces


def _level_block_scores(
    coarse: _Level, level: int, causal: bool, block_size: int, rpb: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-level block scores, masked. With N = n / Nr blocks and K = len(offsets) * Nr keys per window:
    (scores [B, H, N, Nr, K], -inf where not allowed; key values [B, H, N, K, E]; key weights [*, N, K])."""
    offsets = _neighbour_offsets(level, causal)
    query = coarse.query.unflatten(-2, (coarse.query.shape[-2] // block_size, block_size))  # [B, H, N, Nr, D]
    key = _neighbour_blocks(coarse.key, offsets, block_size)  # [B, H, N, K, D]
    value = _neighbour_blocks(coarse.value, offsets, block_size)  # [B, H, N, K, E]
    per_key = torch.stack([coarse.key_weight, coarse.key_bias, coarse.key_valid.to(coarse.key_bias.dtype)], -1)
    weight, bias, valid = _neighbour_blocks(per_key, offsets, block_size).unbind(-1)  # [*, N, K] each

    scores = query @ key.transpose(-1, -2) + bias[..., None, :]  # [B, H, N, Nr, K]
    if rpb is not None:
        scores = scores + _relative_position_bias(rpb, offsets, block_size)[:, None]  # [H, 1, Nr, K]
    pattern = _block_pattern(offsets, level, causal, block_size, scores.device)  # [Nr, K]
    allowed = pattern & (valid[..., None, :] > 0)  # [*, N, Nr, K]; missing neighbours and padding are invalid
    return scores.masked_fill(~allowed, float("-inf")), value, weight


def _partial_softmax(scores: Tensor, value: Tensor, weight: Tensor) -> _Partial:
    """Row-stabilised partial softmax of one level, flattened back to its resolution.

    scores [B, H, N, Nr, K] (-inf = not allowed), value [B, H, N, K, E], weight [N, K] or [B, 1, N, K].
    """
    row_max = scores.detach().amax(-1)  # [B, H, N, Nr]
    offset = torch.where(torch.isfinite(row_max), row_max, 0.0)  # rows without any key: exp(-inf - 0) = 0
    p = torch.exp(scores - offset[..., None])
    numerator = p @ value  # [B, H, N, Nr, E]
    denominator = (p * weight[..., None, :]).sum(-1)  # [B, H, N, Nr]
    return _Partial(numerator.flatten(-3, -2), denominator.flatten(-2), row_max.flatten(-2))


def _upsample(partial: _Partial) -> _Partial:
    """Piecewise-constant prolongation: each coarse row is copied to its 2 children (time axis x2)."""
    return _Partial(
        partial.numerator.repeat_interleave(2, dim=-2),
        partial.denominator.repeat_interleave(2, dim=-1),
        partial.row_max.repeat_interleave(2, dim=-1),
    )


def _lse_merge(a: _Partial, b: _Partial) -> _Partial:
    """Exact merge of two partial softmaxes over disjoint keys: rescale both to the per-row common max."""
    row_max = torch.maximum(a.row_max, b.row_max)
    offset = torch.where(torch.isfinite(row_max), row_max, 0.0)
    scale_a, scale_b = torch.exp(a.row_max - offset), torch.exp(b.row_max - offset)  # 0 for an empty side
    return _Partial(
        a.numerator * scale_a[..., None] + b.numerator * scale_b[..., None],
        a.denominator * scale_a + b.denominator * scale_b,
        row_max,
    )


# ----------------------------------------------------------------------------------------- the operator


def h_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    causal: bool = True,
    value_coarsening: str = "sum",
    rpb: Tensor | None = None,
    lengths: Tensor | None = None,
    attn_impl: str = "auto",
) -> Tensor:
    """H-Transformer-1D attention ``softmax(S_hat) @ v`` in O(L * Nr * D) time and memory.

    Args:
        q, k: ``[B, H, L, D]``; logits are scaled by ``D**-0.5`` inside. Any ``L >= 1``.
        v: ``[B, H, L, E]`` (usually E = D).
        block_size: Nr, the level-0 block size, even and >= 2. For ``L <= 2 * Nr`` the result is full
            softmax attention.
        causal: decoder (query i sees keys j <= i; coarse queries sample the first token of their group)
            or encoder (all pairs; coarse queries are group means).
        value_coarsening: ``"sum"`` (coarse values are sums, the denominator counts each group's tokens)
            or ``"mean"`` (coarse values are means, logit bias ``log(count)``): the same result.
        rpb: optional hierarchical relative position bias, ``[H, 4*Nr - 1]`` or ``[4*Nr - 1]``: entry
            ``r + 2*Nr - 1`` is added to every logit whose key is ``r`` tokens of its level right of the
            query (``r = c - a``, in [-(2Nr-1), 2Nr-1]); one table shared by all levels (official h-RPB).
        lengths: optional ``[B]`` integers in ``[0, L]``: row ``b`` holds ``lengths[b]`` real tokens followed
            by padding (a right-padded batch). Padding is neither a key nor a query (its rows of q, k, v are
            ignored) and its outputs are zero; each row equals ``h_attention`` on its real tokens alone.
        attn_impl: ``"auto"`` (the Triton kernels of ``ops/h_attention_triton.py`` for CUDA tensors, except
            float64, which has no kernel; this reference otherwise), ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, H, L, E]`` in the inputs' (promoted) dtype.
    """
    _check_inputs(q, k, v)
    block_size = check_block_size(block_size)
    if value_coarsening not in VALUE_COARSENINGS:
        raise ValueError(f"value_coarsening must be one of {VALUE_COARSENINGS}, got {value_coarsening!r}")
    _, heads, length, dim = q.shape
    if rpb is not None:
        rpb = _check_rpb(rpb, heads, block_size)
    if lengths is not None:
        lengths = _check_lengths(lengths, q.shape[0], length, q.device)
    out_dtype, dtype = _dtypes(q, k, v)  # rpb (a parameter, often float32) does not change the output dtype
    backend = resolve_impl(attn_impl, q)
    if length == 0:
        return v.new_zeros(v.shape, dtype=out_dtype)
    if backend == "triton" and not (attn_impl == "auto" and out_dtype == torch.float64):
        from hier_lm.ops.h_attention_triton import h_attention_triton  # imports triton: only when used

        return h_attention_triton(q, k, v, block_size, causal, value_coarsening, rpb, lengths)

    levels, padded = _hierarchy_size(length, block_size)
    with _no_autocast(q.device):
        q, k, v = (F.pad(x.to(dtype), (0, 0, 0, padded - length)) for x in (q, k, v))
        q = q * dim**-0.5
        real = torch.arange(padded, device=q.device) < length  # [L_pad]
        if lengths is not None:  # per row: [B, 1, L_pad]; padded rows of q, k, v become zero
            real = real & (torch.arange(padded, device=q.device) < lengths[:, None, None])
            q, k, v = (torch.where(real[..., None], x, 0.0) for x in (q, k, v))
        rpb = None if rpb is None else rpb.to(dtype)
        pyramid = _coarsening_pyramid(q, k, v, real, levels, causal, value_coarsening)

        merged = None  # coarsest level first; each finer level is merged with the prolonged coarser ones
        for level in reversed(range(levels)):
            scores, value, weight = _level_block_scores(pyramid[level], level, causal, block_size, rpb)
            partial = _partial_softmax(scores, value, weight)
            merged = partial if merged is None else _lse_merge(partial, _upsample(merged))

        # every real row has at least one allowed key (itself, or its own block), so denominator >= 1
        numerator, denominator = merged.numerator[..., :length, :], merged.denominator[..., :length, None]
        if lengths is None:
            out = numerator / denominator
        else:  # padded query rows may have no key at all (0 / 0): their output is zero
            out = torch.where(real[..., :length, None], numerator / denominator.clamp(min=1e-30), 0.0)
    return out.to(out_dtype)
