"""FLASH / GAU attention cores in plain PyTorch: the reference of the public ops (their package docstring
defines the scaling) and the dense L x L oracle.

Every function here takes tensors already in one compute dtype (float32 or float64) with autocast off; the
callers do the checks, the dtype promotion and the autocast handling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PREFIX_BLOCK", "exclusive_prefix_mean", "mixed_chunk_attention", "naive_mixed_chunk_attention",
           "relative_bias", "relu2_attention", "relu2_weights"]

PREFIX_BLOCK = 32  # chunks per triangular matmul of `exclusive_prefix_mean`


def relative_bias(bias: Tensor, queries: int, keys: int, query_start: int = 0) -> Tensor:
    """The Toeplitz matrix of a relative position bias table: ``bias: [2N - 1]`` -> ``[queries, keys]``, entry
    ``(t, j)`` = ``bias[N - 1 + j - (query_start + t)]`` (key j at ``j - t`` tokens right of query t); offsets
    beyond ``N - 1`` tokens take the end entries."""
    centre = (bias.shape[-1] - 1) // 2
    query = torch.arange(query_start, query_start + queries, device=bias.device)
    offset = torch.arange(keys, device=bias.device)[None, :] - query[:, None]
    return bias[centre + offset.clamp(-centre, centre)]


def relu2_weights(q: Tensor, k: Tensor, norm: float, causal: bool, query_start: int = 0,
                  bias: Tensor | None = None) -> Tensor:
    """``relu(q k^T / sqrt(S) + B)**2 / norm`` over the last two dims, causal entries set to exactly 0; B the
    Toeplitz matrix of the relative position bias table ``bias: [2N - 1]`` (`relative_bias`), or 0.

    q: [..., M, S] at positions ``query_start ..``, k: [..., N, S] at positions ``0 ..`` -> [..., M, N].
    """
    # relu(x / a + b)**2 / n == relu(x / (a sqrt(n)) + b / sqrt(n))**2 for a, n > 0: scale the [M, S] queries,
    # not the [M, N] scores
    scores = (q * (1.0 / math.sqrt(q.shape[-1] * norm))) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + relative_bias(bias, q.shape[-2], k.shape[-2], query_start) * (1.0 / math.sqrt(norm))
    weights = torch.relu(scores).square()
    if causal:
        query = torch.arange(query_start, query_start + q.shape[-2], device=q.device)
        future = torch.arange(k.shape[-2], device=q.device)[None, :] > query[:, None]  # key j > query t
        weights = weights.masked_fill(future, 0.0)
    return weights


def relu2_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, norm: float, query_start: int = 0,
                    bias: Tensor | None = None) -> Tensor:
    """``relu2_weights(q, k, norm, causal, query_start, bias) @ v``: q [..., M, S], k [..., N, S], v [..., N, E]
    -> [..., M, E]."""
    return relu2_weights(q, k, norm, causal, query_start, bias) @ v


def mixed_chunk_attention(q_quad: Tensor, k_quad: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor, chunk_size: int,
                          causal: bool, bias: Tensor | None = None) -> Tensor:
    """FLASH mixed chunk attention vectorised over chunks: q_quad, k_quad, q_lin, k_lin [..., L, S], v [..., L, E]
    -> [..., L, E], in O(L * C * (S + E) + G * S * E) time and memory. The last chunk is padded with zeros
    (padded keys and values add exactly 0) and the padded outputs are dropped. `bias`: an optional relative
    position bias table [2N - 1] inside the relu of the local part."""
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    length, c = v.shape[-2], chunk_size
    groups = -(-length // c)
    pad = groups * c - length

    # [..., L, D] -> zero-pad the time axis to G*C (only if needed: F.pad always copies) -> [..., G, C, D]
    qq, kq, ql, kl, vv = ((F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(-2, (groups, c)) for x in tensors)

    local = relu2_weights(qq, kq, float(c), causal, bias=bias) @ vv  # [..., G, C, E]

    kv = kl.transpose(-1, -2) @ vv  # per-chunk state K_h^T V_h: [..., G, S, E]
    if causal:
        context = exclusive_prefix_mean(kv, c)  # [..., G, S, E]
        # local + ql @ context in one batched matmul (no [..., G, C, E] temporary)
        out = torch.baddbmm(local.flatten(0, -3), ql.flatten(0, -3), context.flatten(0, -3)).view_as(local)
    else:
        # all chunks, own included, divided by the L real tokens (padded rows of K and V are zero)
        context = kv.sum(-3, keepdim=True) / max(length, 1)  # one context for every chunk: broadcast
        out = local + ql @ context  # [..., G, C, E]
    return out.flatten(-3, -2)[..., :length, :]


def exclusive_prefix_mean(kv: Tensor, c: int) -> Tensor:
    """``context[g] = sum_{h<g} kv[h] / (g * C)`` over the chunk axis of ``kv: [..., G, S, E]`` (chunk 0: zeros).

    Strictly-lower-triangular ``[b, b]`` matmuls (the ``1 / (g * C)`` folded into their rows) within blocks of
    ``b = PREFIX_BLOCK`` chunks, plus the running sum of the earlier blocks: O(G * b * S * E), linear in G, at
    matmul speed (a shift + ``cumsum`` + divide over this axis is 3x slower on CPU, forward and backward).
    """
    flat = kv.flatten(-2)  # [..., G, S*E]
    parts, carry = [], None
    for i, block in enumerate(flat.split(PREFIX_BLOCK, dim=-2)):  # one split: a slice's backward is [G, S*E]
        start, n = i * PREFIX_BLOCK, block.shape[-2]
        scale = 1.0 / ((torch.arange(start, start + n, device=kv.device).clamp(min=1) * c).to(kv.dtype))  # [n]
        earlier = torch.ones(n, n, device=kv.device, dtype=kv.dtype).tril(-1) * scale[:, None]  # [g, h]: h < g
        part = earlier @ block
        if carry is not None:
            part = part + scale[:, None] * carry
        carry = block.sum(-2, keepdim=True) if carry is None else carry + block.sum(-2, keepdim=True)
        parts.append(part)
    prefix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return prefix.unflatten(-1, kv.shape[-2:])


def naive_mixed_chunk_attention(q_quad: Tensor, k_quad: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor,
                                chunk_size: int, causal: bool, bias: Tensor | None = None) -> Tensor:
    """The O(L^2) oracle: the weights of ``mixed_chunk_attention`` (the package's ``naive_mixed_chunk_attention``
    writes them out) as one dense [L, L] matrix, times v. Shapes as in ``mixed_chunk_attention``."""
    length, c, s = v.shape[-2], chunk_size, q_quad.shape[-1]
    position = torch.arange(length, device=v.device)
    chunk = position // c
    t, j = position[:, None], position[None, :]  # query index (rows), key index (columns)
    same_chunk = chunk[:, None] == chunk[None, :]

    logits = q_quad @ k_quad.transpose(-1, -2) / math.sqrt(s)
    if bias is not None:
        logits = logits + relative_bias(bias, length, length)
    quad = torch.relu(logits).square() / c
    lin = q_lin @ k_lin.transpose(-1, -2)
    if causal:
        earlier_chunk = chunk[:, None] > chunk[None, :]
        tokens_before_chunk = (chunk[:, None] * c).clamp(min=1).to(v.dtype)  # only used where >= C
        weights = torch.where(same_chunk & (j <= t), quad, 0.0) + torch.where(
            earlier_chunk, lin / tokens_before_chunk, 0.0
        )
    else:
        weights = torch.where(same_chunk, quad, 0.0) + lin / max(length, 1)
    return weights @ v
