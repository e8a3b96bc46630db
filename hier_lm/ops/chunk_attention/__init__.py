"""FLASH / GAU attention cores (Hua et al. 2022, "Transformer Quality in Linear Time").

Four public functions; each checks its arguments and runs the plain PyTorch reference (`reference.py`, the
readable definition) or, for the first two, the Triton kernels (`triton.py`, tested against the reference):

* ``relu2_attention``        FLASH-Quad: full quadratic relu^2 attention (one GAU).
* ``relu2_attention_rows``   its causal rows for new queries (incremental decoding).
* ``mixed_chunk_attention``  FLASH: relu^2 inside chunks of C tokens + linear attention across chunks,
                             vectorised over chunks, O(L*C*(S+E) + (L/C)*S*E) time and memory.
* ``naive_mixed_chunk_attention``  the same function as an explicit L x L weight matrix (the test oracle).

Shapes: ``q, k: [B, L, S]`` (GAU is single-head; ``[B, H, L, S]`` works too), ``v: [B, L, E]``
(``[B, H, L, E]``), output ``[B, L, E]`` (``[B, H, L, E]``). S is the shared q/k dim ("s" in the paper,
128 by default), E the value dim ("e" = 2d). All inputs share their leading dims and length L.

Scaling; ``t`` indexes queries, ``j`` keys:

* Quadratic weights: ``a[t, j] = relu(q_t . k_j / sqrt(S))**2 / n`` with ``n`` a FIXED constant: the
  caller's ``norm`` in ``relu2_attention`` (the model's max length), the chunk size C inside chunks.
  That is ``relu^2(q k^T / sqrt(S)) / n`` (Su Jianlin's variant of GAU), not the paper appendix's
  ``relu(q k / n)**2`` (an effective 1/n^2 on the logits). ``n`` is never the runtime length: that would make
  the output at ``t`` depend on how many tokens follow it (a causality bug of public ports that divide by the
  sequence length).
* Linear weights (the paper appendix's pseudo-code): every chunk state ``K_h^T V_h`` is divided by C, and the
  G x G chunk mask is row-normalised, i.e. averaged over the chunks it covers:
    causal:        query in chunk g (0-based) gets ``q_t . (sum_{h<g} K_h^T V_h) / (g * C)``: the mean over
                   all tokens of strictly earlier chunks (its own chunk excluded, the paper's eq. 7); chunk 0
                   gets 0.
    bidirectional: ``q_t . (sum_h K_h^T V_h) / L``: the mean over all L tokens, its own chunk included
                   (eq. 6). L counts real tokens only, so the zero padding of the last chunk changes nothing.
  No 1/sqrt(S) on the linear part (none in the pseudo-code).
* Relative position bias (optional, ``bias``): a learned table ``[2N - 1]`` whose entry ``N - 1 + j - t`` is
  added to the quadratic logit of key j and query t inside the relu, ``relu(q_t . k_j / sqrt(S) + b)**2 / n``
  (the paper's Toeplitz bias); keys further than ``N - 1`` tokens away share the end entries (a table of
  ``2C - 1`` covers a chunk exactly). The Triton kernels have no bias: with one, ``attn_impl="auto"`` runs
  the reference and ``"triton"`` is an error.

Precision: computed in float32 at least (float64 stays float64) with autocast disabled inside; the
output has the inputs' (promoted) dtype.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from hier_lm.ops.chunk_attention import reference
from hier_lm.ops.common import in_compute_dtype, no_autocast, promoted_dtypes, resolve_impl, triton_installed

__all__ = ["check_kernel_config", "relu2_attention", "relu2_attention_rows", "mixed_chunk_attention",
           "naive_mixed_chunk_attention"]


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


def _check_bias(bias, device) -> None:
    """bias: None, or a floating-point [2N - 1] table on `device`."""
    if bias is None:
        return
    if not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.dim() != 1 or bias.shape[0] % 2 == 0:
        raise ValueError(f"bias must be a 1-D floating-point table of odd length 2N - 1, got {bias!r:.80}")
    if bias.device != device:
        raise ValueError(f"bias must be on the inputs' device {device}, got {bias.device}")


def _bias_impl(attn_impl: str, bias, tensor: Tensor) -> str:
    """`resolve_impl`, with the rule for a bias: the Triton kernels have none ("auto" takes the reference)."""
    backend = resolve_impl(attn_impl, tensor)
    if bias is None:
        return backend
    if attn_impl == "triton":
        raise ValueError("the FLASH Triton kernels have no relative position bias: use attn_impl='auto' or 'torch' "
                         "with a bias")
    return "torch"


def _check_positive(name: str, value, integer: bool) -> None:
    """chunk_size: an int >= 1; norm: a real number > 0 (bools and tensors are refused)."""
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        want = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_kernel_config(s: int, e: int, chunk_size: int) -> None:
    """A ValueError when the Triton kernels cannot tile q/k width `s`, value width `e` and chunks of `chunk_size`
    (FLASH-Quad: its max_len) within the shared memory of this machine's GPU (any GPU on a machine without one), in
    half precision or fp32: what the FLASH model calls when it is built, so that such a configuration fails there
    and not at its first training step. Nothing to check without Triton."""
    if triton_installed():
        from hier_lm.ops.chunk_attention.triton import check_flash_config

        check_flash_config(s, e, chunk_size)


# ----------------------------------------------------------------------------------------- FLASH-Quad


def relu2_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, *, norm: float, attn_impl: str = "auto",
                    bias: Tensor | None = None) -> Tensor:
    """GAU / FLASH-Quad attention: ``relu(q k^T / sqrt(S) + B)**2 / norm @ v``, O(L^2).

    Args:
        q, k: ``[B, L, S]`` or ``[B, H, L, S]``.
        v: ``[B, L, E]`` or ``[B, H, L, E]``.
        causal: key j contributes to query t only if ``j <= t``.
        norm: the FIXED constant n (the model's maximum length, or the chunk size), keyword-only and
            required so that no caller forgets it. Never the runtime length ``L``: in causal use the output
            at t would then depend on later tokens.
        attn_impl: ``"auto"`` (Triton on CUDA, the PyTorch reference elsewhere), ``"torch"`` or ``"triton"``
            (``hier_lm.ops.chunk_attention.triton``; no bias).
        bias: optional relative position bias table ``[2N - 1]`` (B above; see the package docstring).

    Returns:
        ``[B, L, E]`` (``[B, H, L, E]``) in the inputs' dtype.
    """
    _check_qkv(("q", "k", "v"), (q, k, v))
    _check_positive("norm", norm, integer=False)
    _check_bias(bias, v.device)
    if _bias_impl(attn_impl, bias, v) == "triton":
        from hier_lm.ops.chunk_attention.triton import relu2_attention_triton

        return relu2_attention_triton(q, k, v, causal, float(norm))
    return in_compute_dtype(reference.relu2_attention, (q, k, v), causal, float(norm), 0, _compute_bias(bias, q, k, v))


def relu2_attention_rows(q: Tensor, k: Tensor, v: Tensor, query_start: int, *, norm: float,
                         bias: Tensor | None = None) -> Tensor:
    """Causal ``relu2_attention`` for the new queries of incremental decoding.

    ``q: [B, M, S]`` are the queries at positions ``query_start .. query_start + M - 1``, ``k: [B, T, S]`` and
    ``v: [B, T, E]`` every key and value at positions ``0 .. T - 1`` with ``T = query_start + M``. Returns
    ``[B, M, E]`` in the compute dtype (float32 at least), so that callers can add further terms before
    casting, as ``mixed_chunk_attention`` does internally. ``bias``: as in ``relu2_attention``.
    """
    _check_positive("norm", norm, integer=False)
    _check_bias(bias, v.device)
    if k.shape[-2] != query_start + q.shape[-2] or v.shape[-2] != k.shape[-2]:
        raise ValueError(f"expected {query_start + q.shape[-2]} keys and values (query_start {query_start} + "
                         f"{q.shape[-2]} queries), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _, dtype = promoted_dtypes(q, k, v)
    with no_autocast(q.device):
        return reference.relu2_attention(q.to(dtype), k.to(dtype), v.to(dtype), True, float(norm), query_start,
                                         None if bias is None else bias.to(dtype))


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
    bias: Tensor | None = None,
) -> Tensor:
    """FLASH mixed chunk attention, vectorised over chunks (see the package docstring for the scaling).

    The sequence is cut into ``G = ceil(L / C)`` chunks of ``C = chunk_size`` tokens; the last one is padded
    with zeros (padded keys and values add exactly 0) and padded outputs are dropped. Output =
        local:  ``relu(q_quad k_quad^T / sqrt(S) + B)**2 / C @ v`` within each chunk (lower triangle if causal)
      + global: causal ``q_lin_t @ sum_{h<g} k_lin_h^T v_h / (g * C)`` for t in chunk g (0 for g = 0);
                bidirectional ``q_lin_t @ sum_{all h} k_lin_h^T v_h / L``.
    Time and memory O(L * C * (S + E) + G * S * E).

    Args:
        q_quad, k_quad, q_lin, k_lin: ``[B, L, S]`` or ``[B, H, L, S]``.
        v: ``[B, L, E]`` or ``[B, H, L, E]`` (shared by both parts, as in the paper).
        chunk_size: C >= 1; a constant of the model, never derived from L.
        causal: autoregressive masking (local lower triangle, strictly earlier chunks only).
        attn_impl: ``"auto"`` (Triton on CUDA, the PyTorch reference elsewhere), ``"torch"`` or ``"triton"``
            (``hier_lm.ops.chunk_attention.triton``; no bias).
        bias: optional relative position bias table ``[2N - 1]`` of the local part (B above; N = C covers it).

    Returns:
        ``[B, L, E]`` (``[B, H, L, E]``) in the inputs' dtype.
    """
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    _check_qkv(("q_quad", "k_quad", "q_lin", "k_lin", "v"), tensors)
    _check_positive("chunk_size", chunk_size, integer=True)
    _check_bias(bias, v.device)
    if _bias_impl(attn_impl, bias, v) == "triton":
        from hier_lm.ops.chunk_attention.triton import mixed_chunk_attention_triton

        return mixed_chunk_attention_triton(q_quad, k_quad, q_lin, k_lin, v, int(chunk_size), causal)
    return in_compute_dtype(reference.mixed_chunk_attention, tensors, int(chunk_size), causal,
                            _compute_bias(bias, *tensors))


def naive_mixed_chunk_attention(
    q_quad: Tensor,
    k_quad: Tensor,
    q_lin: Tensor,
    k_lin: Tensor,
    v: Tensor,
    chunk_size: int = 256,
    causal: bool = True,
    bias: Tensor | None = None,
) -> Tensor:
    """``mixed_chunk_attention`` written as one dense L x L weight matrix: the O(L^2) test oracle.

    With ``chunk(i) = i // C``, query t and key j get the weight
      causal:        ``relu(q_quad_t . k_quad_j / sqrt(S))**2 / C``    if chunk(j) == chunk(t) and j <= t
                     ``q_lin_t . k_lin_j / (chunk(t) * C)``            if chunk(j) <  chunk(t)
                     0                                                 otherwise
      bidirectional: ``relu(q_quad_t . k_quad_j / sqrt(S))**2 / C``    if chunk(j) == chunk(t)
                     + ``q_lin_t . k_lin_j / L``                        for every pair
    and the output is ``weights @ v`` (with ``bias``, ``B[t, j]`` joins the quadratic logit inside the relu).
    Shapes as in ``mixed_chunk_attention``.
    """
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    _check_qkv(("q_quad", "k_quad", "q_lin", "k_lin", "v"), tensors)
    _check_positive("chunk_size", chunk_size, integer=True)
    _check_bias(bias, v.device)
    return in_compute_dtype(reference.naive_mixed_chunk_attention, tensors, int(chunk_size), causal,
                            _compute_bias(bias, *tensors))


def _compute_bias(bias: Tensor | None, *tensors: Tensor) -> Tensor | None:
    """The bias table in the tensors' compute dtype (float32 at least), as the reference takes it."""
    return None if bias is None else bias.to(promoted_dtypes(*tensors)[1])
