"""FLASH / GAU attention cores (Hua et al. 2022, "Transformer Quality in Linear Time"): the reference.

Three functions, all plain PyTorch, readable first; Triton kernels are tested against them.

* ``relu2_attention``        FLASH-Quad: full quadratic relu^2 attention (one GAU).
* ``mixed_chunk_attention``  FLASH: relu^2 inside chunks of C tokens + linear attention across chunks,
                             vectorised over chunks, O(L*C*(S+E) + (L/C)*S*E) time and memory.
* ``naive_mixed_chunk_attention``  the same function as an explicit L x L weight matrix (the test oracle).

Shapes: ``q, k: [B, L, S]`` (GAU is single-head; ``[B, H, L, S]`` works too), ``v: [B, L, E]``
(``[B, H, L, E]``), output ``[B, L, E]`` (``[B, H, L, E]``). S is the shared q/k dim ("s" in the paper,
128 by default), E the value dim ("e" = 2d). All inputs share their leading dims and length L.

Scaling (DESIGN.md §4, research/flash_gau.md §1.3 and §2.2); ``t`` indexes queries, ``j`` keys:

* Quadratic weights: ``a[t, j] = relu(q_t . k_j / sqrt(S))**2 / n`` with ``n`` a FIXED constant: the
  caller's ``norm`` in ``relu2_attention`` (the model's max length), the chunk size C inside chunks.
  This is the 1/n * relu^2(QK^T/sqrt(s)) form of DESIGN.md (Su's variant, notes §1.3), not the appendix's
  ``relu(qk / n)**2``. ``n`` is never the runtime length: that would make the output at ``t`` depend on
  how many tokens follow it (the public ports' causality bug, notes §1.3).
* Linear weights (the appendix pseudo-code "Code 8", notes §2.2): every chunk state ``K_h^T V_h`` is
  divided by C, and the G x G chunk mask is row-normalised, i.e. averaged over the chunks it covers:
    causal:        query in chunk g (0-based) gets ``q_t . (sum_{h<g} K_h^T V_h) / (g * C)``: the mean over
                   all tokens of strictly earlier chunks (its own chunk excluded, eq. 7); chunk 0 gets 0.
    bidirectional: ``q_t . (sum_h K_h^T V_h) / L``: the mean over all L tokens, its own chunk included
                   (eq. 6). L counts real tokens only, so the zero padding of the last chunk changes nothing.
  No 1/sqrt(S) on the linear part (none in the pseudo-code).

Precision: computed in float32 at least (float64 stays float64) with autocast disabled inside; the
output has the inputs' (promoted) dtype.
"""

from __future__ import annotations

import math
import numbers
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from hier_lm.ops.dispatch import resolve_impl

__all__ = ["relu2_attention", "relu2_attention_rows", "mixed_chunk_attention", "naive_mixed_chunk_attention"]


# ----------------------------------------------------------------------------------------- checks


def _check_qkv(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> None:
    """q/k-like tensors (all but the last, identical shapes) and v: [B, L, *] or [B, H, L, *]."""
    for name, x in zip(names, tensors):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be [B, L, D] or [B, H, L, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    *qk, v = tensors
    for name, x in zip(names[1:-1], qk[1:]):
        if x.shape != qk[0].shape:
            raise ValueError(f"{name} must have the shape of {names[0]} {tuple(qk[0].shape)}, got {tuple(x.shape)}")
    if v.shape[:-1] != qk[0].shape[:-1]:
        raise ValueError(
            f"{names[-1]} must share the leading dims and length of {names[0]}: expected "
            f"{tuple(qk[0].shape[:-1])} + (E,), got {tuple(v.shape)}"
        )
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_positive(name: str, value, integer: bool) -> None:
    """chunk_size: an int >= 1; norm: a real number > 0 (bools and tensors are refused)."""
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        want = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _dtypes(tensors: tuple[Tensor, ...]) -> tuple[torch.dtype, torch.dtype]:
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


# ----------------------------------------------------------------------------------------- shared


def _relu2_weights(q: Tensor, k: Tensor, norm: float, causal: bool, query_start: int = 0) -> Tensor:
    """``relu(q k^T / sqrt(S))**2 / norm`` over the last two dims, causal entries set to exactly 0.

    q: [..., M, S] at positions ``query_start ..``, k: [..., N, S] at positions ``0 ..`` -> [..., M, N].
    """
    # relu(x / a)**2 / n == relu(x)**2 / (a**2 n) for a, n > 0: scale the [M, S] queries, not the [M, N] scores
    scores = (q * (1.0 / math.sqrt(q.shape[-1] * norm))) @ k.transpose(-1, -2)
    weights = torch.relu(scores).square()
    if causal:
        query = torch.arange(query_start, query_start + q.shape[-2], device=q.device)
        future = torch.arange(k.shape[-2], device=q.device)[None, :] > query[:, None]  # key j > query t
        weights = weights.masked_fill(future, 0.0)
    return weights


# ----------------------------------------------------------------------------------------- FLASH-Quad


def relu2_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, *, norm: float, attn_impl: str = "auto") -> Tensor:
    """GAU / FLASH-Quad attention: ``relu(q k^T / sqrt(S))**2 / norm @ v``, O(L^2).

    Args:
        q, k: ``[B, L, S]`` or ``[B, H, L, S]``.
        v: ``[B, L, E]`` or ``[B, H, L, E]``.
        causal: key j contributes to query t only if ``j <= t``.
        norm: the FIXED constant n (the model's maximum length, or the chunk size), keyword-only and
            required so that no caller forgets it. Never the runtime length ``L``: in causal use the output
            at t would then depend on later tokens.
        attn_impl: ``"auto"`` (Triton on CUDA, this reference elsewhere), ``"torch"`` or ``"triton"``
            (``chunk_attention_triton.py``).

    Returns:
        ``[B, L, E]`` (``[B, H, L, E]``) in the inputs' dtype.
    """
    _check_qkv(("q", "k", "v"), (q, k, v))
    _check_positive("norm", norm, integer=False)
    if resolve_impl(attn_impl, v) == "triton":
        from hier_lm.ops.chunk_attention_triton import relu2_attention_triton

        return relu2_attention_triton(q, k, v, causal, float(norm))
    out_dtype, dtype = _dtypes((q, k, v))
    with _no_autocast(q.device):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = _relu2_weights(q, k, float(norm), causal) @ v
    return out.to(out_dtype)


def relu2_attention_rows(q: Tensor, k: Tensor, v: Tensor, query_start: int, *, norm: float) -> Tensor:
    """Causal ``relu2_attention`` for the new queries of incremental decoding.

    ``q: [B, M, S]`` are the queries at positions ``query_start .. query_start + M - 1``, ``k: [B, T, S]`` and
    ``v: [B, T, E]`` every key and value at positions ``0 .. T - 1`` with ``T = query_start + M``. Returns
    ``[B, M, E]`` in the compute dtype (float32 at least), so that callers can add further terms before
    casting, as ``mixed_chunk_attention`` does internally.
    """
    _check_positive("norm", norm, integer=False)
    if k.shape[-2] != query_start + q.shape[-2] or v.shape[-2] != k.shape[-2]:
        raise ValueError(f"expected {query_start + q.shape[-2]} keys and values (query_start {query_start} + "
                         f"{q.shape[-2]} queries), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _, dtype = _dtypes((q, k, v))
    with _no_autocast(q.device):
        return _relu2_weights(q.to(dtype), k.to(dtype), float(norm), True, query_start) @ v.to(dtype)


# ----------------------------------------------------------------------------------------- FLASH


def mixed_chunk_attention(
    q_quad: Tensor,
    k_quad: Tensor,
    q_lin: Tensor,
    k_lin: Tensor,
    v: Tensor,
    chunk_size: int = 256,
    causal: bool = True,
    attn_impl: str = "auto",
) -> Tensor:
    """FLASH mixed chunk attention, vectorised over chunks (see the module docstring for the scaling).

    The sequence is cut into ``G = ceil(L / C)`` chunks of ``C = chunk_size`` tokens; the last one is padded
    with zeros (padded keys and values add exactly 0) and padded outputs are dropped. Output =
        local:  ``relu(q_quad k_quad^T / sqrt(S))**2 / C @ v`` within each chunk (lower triangle if causal)
      + global: causal ``q_lin_t @ sum_{h<g} k_lin_h^T v_h / (g * C)`` for t in chunk g (0 for g = 0);
                bidirectional ``q_lin_t @ sum_{all h} k_lin_h^T v_h / L``.
    Time and memory O(L * C * (S + E) + G * S * E).

    Args:
        q_quad, k_quad, q_lin, k_lin: ``[B, L, S]`` or ``[B, H, L, S]``.
        v: ``[B, L, E]`` or ``[B, H, L, E]`` (shared by both parts, as in the paper).
        chunk_size: C >= 1; a constant of the model, never derived from L.
        causal: autoregressive masking (local lower triangle, strictly earlier chunks only).
        attn_impl: ``"auto"`` (Triton on CUDA, this reference elsewhere), ``"torch"`` or ``"triton"``
            (``chunk_attention_triton.py``).

    Returns:
        ``[B, L, E]`` (``[B, H, L, E]``) in the inputs' dtype.
    """
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    _check_qkv(("q_quad", "k_quad", "q_lin", "k_lin", "v"), tensors)
    _check_positive("chunk_size", chunk_size, integer=True)
    if resolve_impl(attn_impl, v) == "triton":
        from hier_lm.ops.chunk_attention_triton import mixed_chunk_attention_triton

        return mixed_chunk_attention_triton(q_quad, k_quad, q_lin, k_lin, v, int(chunk_size), causal)
    out_dtype, dtype = _dtypes(tensors)
    length, c = v.shape[-2], int(chunk_size)
    groups = -(-length // c)
    pad = groups * c - length

    with _no_autocast(v.device):
        # [..., L, D] -> zero-pad the time axis to G*C (only if needed: F.pad always copies) -> [..., G, C, D]
        qq, kq, ql, kl, vv = ((F.pad(x.to(dtype), (0, 0, 0, pad)) if pad else x.to(dtype)).unflatten(-2, (groups, c))
                              for x in tensors)

        local = _relu2_weights(qq, kq, float(c), causal) @ vv  # [..., G, C, E]

        kv = kl.transpose(-1, -2) @ vv  # per-chunk state K_h^T V_h: [..., G, S, E]
        if causal:
            context = _exclusive_prefix_mean(kv, c)  # [..., G, S, E]
            # local + ql @ context in one batched matmul (no [..., G, C, E] temporary)
            out = torch.baddbmm(local.flatten(0, -3), ql.flatten(0, -3), context.flatten(0, -3)).view_as(local)
        else:
            # all chunks, own included, divided by the L real tokens (padded rows of K and V are zero)
            context = kv.sum(-3, keepdim=True) / max(length, 1)  # one context for every chunk: broadcast
            out = local + ql @ context  # [..., G, C, E]
        out = out.flatten(-3, -2)[..., :length, :]
    return out.to(out_dtype)


PREFIX_BLOCK = 32  # chunks per triangular matmul of `_exclusive_prefix_mean`


def _exclusive_prefix_mean(kv: Tensor, c: int) -> Tensor:
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


def naive_mixed_chunk_attention(
    q_quad: Tensor,
    k_quad: Tensor,
    q_lin: Tensor,
    k_lin: Tensor,
    v: Tensor,
    chunk_size: int = 256,
    causal: bool = True,
) -> Tensor:
    """``mixed_chunk_attention`` written as one dense L x L weight matrix: the O(L^2) test oracle.

    With ``chunk(i) = i // C``, query t and key j get the weight
      causal:        ``relu(q_quad_t . k_quad_j / sqrt(S))**2 / C``    if chunk(j) == chunk(t) and j <= t
                     ``q_lin_t . k_lin_j / (chunk(t) * C)``            if chunk(j) <  chunk(t)
                     0                                                 otherwise
      bidirectional: ``relu(q_quad_t . k_quad_j / sqrt(S))**2 / C``    if chunk(j) == chunk(t)
                     + ``q_lin_t . k_lin_j / L``                        for every pair
    and the output is ``weights @ v``. Shapes as in ``mixed_chunk_attention``.
    """
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    _check_qkv(("q_quad", "k_quad", "q_lin", "k_lin", "v"), tensors)
    _check_positive("chunk_size", chunk_size, integer=True)
    out_dtype, dtype = _dtypes(tensors)
    q_quad, k_quad, q_lin, k_lin, v = (x.to(dtype) for x in tensors)
    length, c, s = v.shape[-2], int(chunk_size), q_quad.shape[-1]

    with _no_autocast(v.device):
        position = torch.arange(length, device=v.device)
        chunk = position // c
        t, j = position[:, None], position[None, :]  # query index (rows), key index (columns)
        same_chunk = chunk[:, None] == chunk[None, :]

        quad = torch.relu(q_quad @ k_quad.transpose(-1, -2) / math.sqrt(s)).square() / c
        lin = q_lin @ k_lin.transpose(-1, -2)
        if causal:
            earlier_chunk = chunk[:, None] > chunk[None, :]
            tokens_before_chunk = (chunk[:, None] * c).clamp(min=1).to(dtype)  # only used where >= C
            weights = torch.where(same_chunk & (j <= t), quad, 0.0) + torch.where(
                earlier_chunk, lin / tokens_before_chunk, 0.0
            )
        else:
            weights = torch.where(same_chunk, quad, 0.0) + lin / max(length, 1)
        out = weights @ v
    return out.to(out_dtype)
