"""H-Transformer-1D hierarchical attention (Zhu & Soricut 2021): `h_attention`, its cached decoding
(`HAttentionCache`, `h_attention_decode`) and its level structure as dense maps (`h_attention_levels`, ...).

The semantics are those of the authors' official code, with an exact row-wise softmax stabiliser instead of
its single global offset. The plain PyTorch reference (`reference.py`) is the readable definition; the Triton
kernels (`triton.py`) are tested against it.

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

import torch
from torch import Tensor

from hier_lm.ops.common import in_compute_dtype, promoted_dtypes, resolve_impl
from hier_lm.ops.h_attention import recompute, reference
from hier_lm.ops.h_attention.cache import HAttentionCache, h_attention_decode
from hier_lm.ops.h_attention.checks import VALUE_COARSENINGS, check_block_size, check_value_coarsening
from hier_lm.ops.h_attention.structure import h_attention_level_masks, h_attention_levels, h_attention_num_levels
from hier_lm.ops.h_attention.tiles import check_kernel_fits

__all__ = ["VALUE_COARSENINGS", "HAttentionCache", "check_block_size", "check_kernel_fits", "h_attention",
           "h_attention_decode", "h_attention_level_masks", "h_attention_levels", "h_attention_num_levels"]


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
    dropout_p: float = 0.0,
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
        attn_impl: ``"auto"`` (the Triton kernels of ``hier_lm.ops.h_attention.triton`` for CUDA tensors,
            except float64, which has no kernel; the PyTorch reference otherwise), ``"torch"`` or ``"triton"``.
            The kernels have no dropout: with ``dropout_p > 0`` ``"auto"`` runs the reference and ``"triton"``
            is an error.
        dropout_p: attention dropout in ``[0, 1)``, applied whenever it is > 0 (a model passes 0 in eval
            mode): each coarse (query, key) weight of each level is zeroed with probability ``dropout_p`` and
            the kept ones are scaled by ``1 / (1 - dropout_p)``; the softmax denominator keeps every weight,
            so this is dropout on the normalised attention weights (the official code's, after the partition;
            it shares one mask across batch and heads, here every weight draws its own).

    Returns:
        ``[B, H, L, E]`` in the inputs' (promoted) dtype.
    """
    _check_inputs(q, k, v)
    block_size = check_block_size(block_size)
    check_value_coarsening(value_coarsening)
    _, heads, length, _ = q.shape
    if rpb is not None:
        rpb = _check_rpb(rpb, heads, block_size)
    if lengths is not None:
        lengths = _check_lengths(lengths, q.shape[0], length, q.device)
    out_dtype, _ = promoted_dtypes(q, k, v)  # rpb (a parameter, often float32) does not change the output dtype
    backend = resolve_impl(attn_impl, q)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if dropout_p > 0 and attn_impl == "triton":
        raise ValueError("the h-attention Triton kernels have no attention dropout: use attn_impl='auto' or "
                         "'torch' with dropout_p > 0, or dropout_p=0")
    if length == 0:
        return v.new_zeros(v.shape, dtype=out_dtype)
    if backend == "triton" and not (attn_impl == "auto" and (out_dtype == torch.float64 or dropout_p > 0)):
        from hier_lm.ops.h_attention.triton import h_attention_triton  # imports triton: only when used

        return h_attention_triton(q, k, v, block_size, causal, value_coarsening, rpb, lengths)
    if dropout_p > 0:  # the definition, through autograd: dropout masks live in its graph
        return in_compute_dtype(reference.h_attention, (q, k, v), block_size, causal, value_coarsening, rpb,
                                lengths, dropout_p)
    return in_compute_dtype(recompute.h_attention, (q, k, v), block_size, causal, rpb, lengths)
