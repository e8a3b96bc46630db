"""H-Transformer-1D attention as Triton kernels (forward and backward): the same function as the PyTorch
reference (`reference.py`; the package docstring defines it), run by `h_attention(..., attn_impl="triton")`.

Imported lazily by `h_attention` only: it imports triton at the top, but launches nothing, tunes nothing and
queries no device at import.

Pipeline, for q, k: [B, H, L, D], v: [B, H, L, E]:
1. pyramid   the reference's `coarsening_pyramid` (torch ops, autograd does its backward), always in the
             "mean" form: coarse values are group means and each coarse key carries the logit bias
             log(real tokens in its group) (-inf for an all-padding group). That is the same function as
             value_coarsening="sum" (sum values, count in the denominator), so both options run this path.
2. level 0   one launch of `_fwd_kernel` (FINE): block-banded flash attention, a tile of query rows against
             the keys of its own and neighbouring Nr-blocks (causal: the left block and the lower triangle),
             the pattern, key bias and h-RPB applied element-wise; emits (o_0, lse_0) per fine row.
3. levels>=1 one launch over the packed coarse pyramid (grid over (level, block)): each coarse query block
             against its LEFT / RIGHT neighbour blocks (causal: LEFT) minus the half-block correction;
             emits (o_l, lse_l) per coarse row.
4. merge     the reference's coarsest-first log-sum-exp merge (`upsample`, `lse_merge`) on (o_l, lse_l):
             exact, O(L * E). Autograd through it hands each level the output gradient already reduced over
             each coarse query's group of fine rows (and a gradient for lse_l).
5. backward  flash-attention style, recomputing the probabilities from the saved lse: `_dq_kernel` per query
             tile (dq, and the h-RPB gradient as per-tile partial sums), `_dkdv_kernel` per key tile. The
             lse gradient enters as delta_a = rowsum(dO_a * o_a) - dlse_a. Time O(L * Nr * D).

Kernel operands are the inputs' dtype (float16 / bfloat16, or float32 with exact fp32 dots), accumulation in
float32; per-level outputs, lse and the merge are float32. float64 is not supported (use attn_impl="torch").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hier_lm.ops.common import no_autocast, promoted_dtypes, scratch
from hier_lm.ops.h_attention.reference import (
    Partial,
    coarsening_pyramid,
    hierarchy_size,
    lse_merge,
    normalised_output,
    padded_inputs,
    upsample,
)

__all__ = ["h_attention_triton"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _scores(q, k, rows, cols, row_end, col_end, kbias_ptr, rpb_ptr,
            NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
            PREC: tl.constexpr):
    """Masked logits [BM, BN] of coarse query rows `rows` (< row_end) against key columns `cols` (< col_end)
    of one level: q.k (q pre-scaled) + key bias (+ h-RPB); -inf where the level does not cover the pair."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    col_ok = cols < col_end
    s += tl.load(kbias_ptr + cols, mask=col_ok, other=float("-inf"))[None, :]
    rel = cols[None, :] - rows[:, None]  # key minus query, in tokens of this level
    if HAS_RPB:
        index = tl.minimum(tl.maximum(rel + (2 * NR - 1), 0), 4 * NR - 2)  # clamped only where not allowed
        s += tl.load(rpb_ptr + index)
    block = cols[None, :] // NR - rows[:, None] // NR  # key block minus query block
    if FINE:
        if CAUSAL:
            ok = (block >= -1) & (rel <= 0)
        else:
            ok = (block >= -1) & (block <= 1)
    else:  # neighbour blocks only, minus the adjacent half blocks (covered one level finer)
        half_apart = tl.abs(cols[None, :] // (NR // 2) - rows[:, None] // (NR // 2)) >= 2
        if CAUSAL:
            ok = (block == -1) & half_apart
        else:
            ok = ((block == -1) | (block == 1)) & half_apart
    ok = ok & (rows[:, None] < row_end) & col_ok[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _tile(TILES, tile, L_PAD, BASE):
    """(level, first row, end row, level length, offset of the level in the packed tensors) of one tile."""
    level = tl.load(TILES + 3 * tile)
    start = tl.load(TILES + 3 * tile + 1)
    end = tl.load(TILES + 3 * tile + 2)
    n = L_PAD >> level
    return level, start, end, n, 2 * (L_PAD - n) - BASE  # level l starts at sum_{j<l} L_PAD / 2**j


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, rows, row_end, lo, hi, k_ptr, v_ptr, kbias_ptr, rpb_ptr,
                 stride_kt, stride_vt, D, E,
                 NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Online softmax of the query tile over keys [lo, hi) of its level."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _scores(q, k, rows, cols, row_end, hi, kbias_ptr, rpb_ptr, NR, CAUSAL, FINE, HAS_RPB, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys so far stays at 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, KBIAS, RPB, O, LSE, TILES,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
                stride_biasb, stride_rpbh, H, L_PAD, BASE, D, E,
                NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """One query tile of one (batch, head): (o, lse) of its rows over the keys its level lets them see."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    level, m0, m1, n, off = _tile(TILES, tile, L_PAD, BASE)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = tl.load(Q + b * stride_qb + h * stride_qh + (off + rows)[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh + off * stride_kt
    v_ptr = V + b * stride_vb + h * stride_vh + off * stride_vt
    kbias_ptr = KBIAS + b * stride_biasb + off
    rpb_ptr = RPB + h * stride_rpbh

    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    b0 = m0 // NR
    b1 = (m1 - 1) // NR
    lo = tl.maximum((b0 - 1) * NR, 0)
    if FINE:  # own and neighbouring blocks (causal: the left one and the own up to the row)
        if CAUSAL:
            hi = m1
        else:
            hi = tl.minimum((b1 + 2) * NR, n)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, m1, lo, hi, k_ptr, v_ptr, kbias_ptr, rpb_ptr,
                                     stride_kt, stride_vt, D, E, NR, CAUSAL, FINE, HAS_RPB, PREC,
                                     BLOCK_N, BLOCK_D, BLOCK_E)
    else:  # a coarse tile is one block: its LEFT neighbour (empty for block 0), then its RIGHT one
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, m1, lo, b0 * NR, k_ptr, v_ptr, kbias_ptr,
                                     rpb_ptr, stride_kt, stride_vt, D, E, NR, CAUSAL, FINE, HAS_RPB, PREC,
                                     BLOCK_N, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, m1, (b0 + 1) * NR,
                                         tl.minimum((b0 + 2) * NR, n), k_ptr, v_ptr, kbias_ptr, rpb_ptr,
                                         stride_kt, stride_vt, D, E, NR, CAUSAL, FINE, HAS_RPB, PREC,
                                         BLOCK_N, BLOCK_D, BLOCK_E)
    has_keys = l_i > 0.0  # rows without any allowed key: o = 0, lse = -inf
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + (off + rows)[:, None] * stride_ot + offs_e[None, :], o,
             mask=row_ok[:, None] & (offs_e[None, :] < E))
    tl.store(LSE + b * stride_lb + h * stride_lh + off + rows, lse, mask=row_ok)


@triton.jit
def _dq_segment(dq, q, do, lse, delta, rows, row_end, lo, hi, k_ptr, v_ptr, kbias_ptr, rpb_ptr, drpb_ptr,
                stride_kt, stride_vt, D, E,
                NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                RPB_GRAD: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        s = _scores(q, k, rows, cols, row_end, hi, kbias_ptr, rpb_ptr, NR, CAUSAL, FINE, HAS_RPB, PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if RPB_GRAD:  # this program's own row of partial sums: no contention between programs
            index = cols[None, :] - rows[:, None] + (2 * NR - 1)
            tl.atomic_add(drpb_ptr + tl.minimum(tl.maximum(index, 0), 4 * NR - 2), ds, mask=p > 0.0,
                          sem="relaxed")
    return dq


@triton.jit
def _dq_kernel(Q, K, V, KBIAS, RPB, DO, LSE, DELTA, DQ, DRPB, TILES,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_lb, stride_lh,
               stride_biasb, stride_rpbh, H, L_PAD, BASE, D, E, NUM_TILES,
               NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
               RPB_GRAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """dq of one query tile (and its h-RPB gradient partial sums, DRPB row (b*H + h)*NUM_TILES + tile)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    level, m0, m1, n, off = _tile(TILES, tile, L_PAD, BASE)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = tl.load(Q + b * stride_qb + h * stride_qh + (off + rows)[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (off + rows)[:, None] * stride_dot + offs_e[None, :],
                 mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + off + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows without keys: every logit is -inf, p = 0
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + off + rows, mask=row_ok, other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh + off * stride_kt
    v_ptr = V + b * stride_vb + h * stride_vh + off * stride_vt
    kbias_ptr = KBIAS + b * stride_biasb + off
    rpb_ptr = RPB + h * stride_rpbh
    drpb_ptr = DRPB + (bh * NUM_TILES + tile) * (4 * NR - 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b0 = m0 // NR
    b1 = (m1 - 1) // NR
    lo = tl.maximum((b0 - 1) * NR, 0)
    if FINE:
        if CAUSAL:
            hi = m1
        else:
            hi = tl.minimum((b1 + 2) * NR, n)
        dq = _dq_segment(dq, q, do, lse, delta, rows, m1, lo, hi, k_ptr, v_ptr, kbias_ptr, rpb_ptr, drpb_ptr,
                         stride_kt, stride_vt, D, E, NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD, PREC,
                         BLOCK_N, BLOCK_D, BLOCK_E)
    else:
        dq = _dq_segment(dq, q, do, lse, delta, rows, m1, lo, b0 * NR, k_ptr, v_ptr, kbias_ptr, rpb_ptr,
                         drpb_ptr, stride_kt, stride_vt, D, E, NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD, PREC,
                         BLOCK_N, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            dq = _dq_segment(dq, q, do, lse, delta, rows, m1, (b0 + 1) * NR, tl.minimum((b0 + 2) * NR, n),
                             k_ptr, v_ptr, kbias_ptr, rpb_ptr, drpb_ptr, stride_kt, stride_vt, D, E,
                             NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD, PREC, BLOCK_N, BLOCK_D, BLOCK_E)
    tl.store(DQ + b * stride_qb + h * stride_qh + (off + rows)[:, None] * stride_qt + offs_d[None, :], dq,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_segment(dk, dv, k, v, cols, col_end, lo, hi, q_ptr, do_ptr, lse_ptr, delta_ptr, kbias_ptr, rpb_ptr,
                  stride_qt, stride_dot, D, E,
                  NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Accumulate dk, dv of the key tile over query rows [lo, hi) of its level."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        q = tl.load(q_ptr + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptr + rows[:, None] * stride_dot + offs_e[None, :],
                     mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        s = _scores(q, k, rows, cols, hi, col_end, kbias_ptr, rpb_ptr, NR, CAUSAL, FINE, HAS_RPB, PREC)
        p = tl.exp(s - lse[:, None])  # [BM, BN]
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, KBIAS, RPB, DO, LSE, DELTA, DK, DV, TILES,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_lb, stride_lh,
                 stride_biasb, stride_rpbh, H, L_PAD, BASE, D, E,
                 NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """dk, dv of one key tile: the transpose of the forward's band (which query rows see these keys)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    level, n0, n1, n, off = _tile(TILES, tile, L_PAD, BASE)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    k = tl.load(K + b * stride_kb + h * stride_kh + (off + cols)[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + (off + cols)[:, None] * stride_vt + offs_e[None, :],
                mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    q_ptr = Q + b * stride_qb + h * stride_qh + off * stride_qt
    do_ptr = DO + b * stride_dob + h * stride_doh + off * stride_dot
    lse_ptr = LSE + b * stride_lb + h * stride_lh + off
    delta_ptr = DELTA + b * stride_lb + h * stride_lh + off
    kbias_ptr = KBIAS + b * stride_biasb + off
    rpb_ptr = RPB + h * stride_rpbh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    b0 = n0 // NR
    b1 = (n1 - 1) // NR
    if FINE:  # query blocks b-1..b+1 (causal: rows from the first key on, blocks b..b+1)
        if CAUSAL:
            lo = n0
        else:
            lo = tl.maximum((b0 - 1) * NR, 0)
        dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, lo, tl.minimum((b1 + 2) * NR, n), q_ptr, do_ptr,
                               lse_ptr, delta_ptr, kbias_ptr, rpb_ptr, stride_qt, stride_dot, D, E,
                               NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
    else:  # the query block right of this key block sees it as LEFT; the one left of it as RIGHT
        dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, (b0 + 1) * NR, tl.minimum((b0 + 2) * NR, n), q_ptr,
                               do_ptr, lse_ptr, delta_ptr, kbias_ptr, rpb_ptr, stride_qt, stride_dot, D, E,
                               NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, tl.maximum((b0 - 1) * NR, 0), b0 * NR, q_ptr,
                                   do_ptr, lse_ptr, delta_ptr, kbias_ptr, rpb_ptr, stride_qt, stride_dot,
                                   D, E, NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
    tl.store(DK + b * stride_kb + h * stride_kh + (off + cols)[:, None] * stride_kt + offs_d[None, :], dk,
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + b * stride_vb + h * stride_vh + (off + cols)[:, None] * stride_vt + offs_e[None, :], dv,
             mask=col_ok[:, None] & (offs_e[None, :] < E))


# ----------------------------------------------------------------------------------------- launches


class _Launch(NamedTuple):
    """What one launch over some levels needs besides the tensors."""

    padded: int  # L_pad = Nr * 2**M
    base: int  # row of the packed tensors where the first launched level starts (0 fine, L_pad coarse)
    block_size: int  # Nr
    causal: bool
    fine: bool  # level 0 (banded, own block included) or the coarse levels 1..M-1 (neighbours only)
    levels: int  # M


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def _tile_sizes(launch: _Launch) -> tuple[int, int]:
    """(query tile rows, key tile rows). Fine: tiles of several Nr-blocks (tensor-core sized, Nr=16: 64 x 32,
    a 96-key bidirectional band in 3 key tiles); coarse: one block per tile, padded to >= 16 rows for tl.dot."""
    if launch.fine:
        return _pow2(launch.block_size, 64), _pow2(launch.block_size, 32)
    return (_pow2(launch.block_size),) * 2


@functools.lru_cache(maxsize=64)
def _tiles(launch: _Launch, rows: int, device: torch.device) -> Tensor:
    """[num_tiles, 3] int32 (level, first row, end row): fine = level 0 cut into tiles of `rows` rows;
    coarse = every Nr-block of levels 1..M-1 (`rows` >= Nr)."""
    if launch.fine:
        table = [(0, start, min(start + rows, launch.padded)) for start in range(0, launch.padded, rows)]
    else:
        nr = launch.block_size
        table = [(level, block * nr, (block + 1) * nr)
                 for level in range(1, launch.levels) for block in range((launch.padded >> level) // nr)]
    return torch.tensor(table, dtype=torch.int32).to(device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # exact fp32 dots, as the reference's fp32 matmuls


def _common(launch: _Launch, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, rpb: Tensor | None):
    """Strides and constexprs shared by the three kernels."""
    heads, dim, edim = q.shape[1], q.shape[-1], v.shape[-1]
    rpb_arg = rpb if rpb is not None else key_bias  # never read without HAS_RPB
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    meta = dict(NR=launch.block_size, CAUSAL=launch.causal, FINE=launch.fine, HAS_RPB=rpb is not None,
                PREC=_precision(q.dtype), BLOCK_D=_pow2(dim), BLOCK_E=_pow2(edim))
    bias_batch_stride = key_bias.stride(0) if key_bias.shape[0] > 1 else 0  # [1, T]: shared by the batch
    sizes = (bias_batch_stride, rpb.stride(0) if rpb is not None else 0, heads, launch.padded, launch.base, dim,
             edim)
    return rpb_arg, strides, sizes, meta


class _LevelAttention(torch.autograd.Function):
    """(o, lse) of the banded attention of some levels of the packed pyramid, with backward.

    q, k: [B, H, T, D], v: [B, H, T, E] (kernel dtype, contiguous), key_bias: [B or 1, T] float32
    (log group size, -inf = no key), rpb: [H, 4*Nr - 1] float32 or None. Returns o [B, H, T, E] and
    lse [B, H, T] (float32; rows without keys: o = 0, lse = -inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_bias, rpb, launch: _Launch):
        batch, heads, length, _ = q.shape
        o = scratch((batch, heads, length, v.shape[-1]), torch.float32, q.device)
        lse = scratch((batch, heads, length), torch.float32, q.device)
        block_m, block_n = _tile_sizes(launch)
        tiles = _tiles(launch, block_m, q.device)
        rpb_arg, strides, sizes, meta = _common(launch, q, k, v, key_bias, rpb)
        _fwd_kernel[(tiles.shape[0], batch * heads)](
            q, k, v, key_bias, rpb_arg, o, lse, tiles, *strides, *o.stride()[:3], *lse.stride()[:2], *sizes,
            BLOCK_M=block_m, BLOCK_N=block_n, **meta)
        ctx.save_for_backward(q, k, v, key_bias, rpb, o, lse)
        ctx.launch = launch
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, key_bias, rpb, o, lse = ctx.saved_tensors
        launch = ctx.launch
        batch, heads = q.shape[:2]
        do = torch.zeros_like(o) if do is None else do.float()
        delta = (do * o).sum(-1)  # [B, H, T]; the lse gradient enters as -dlse
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse, 0.0)
        delta = delta.contiguous()
        do = do.to(q.dtype).contiguous()
        rpb_grad = rpb is not None and ctx.needs_input_grad[4]
        dq, dk = scratch(q.shape, torch.float32, q.device), scratch(k.shape, torch.float32, q.device)
        dv = scratch(v.shape, torch.float32, q.device)
        rpb_arg, strides, sizes, meta = _common(launch, q, k, v, key_bias, rpb)
        block_m, block_n = _tile_sizes(launch)

        q_tiles = _tiles(launch, block_m, q.device)
        num = q_tiles.shape[0]
        drpb = torch.zeros(batch * heads * num, 4 * launch.block_size - 1, device=q.device) if rpb_grad else lse
        _dq_kernel[(num, batch * heads)](
            q, k, v, key_bias, rpb_arg, do, lse, delta, dq, drpb, q_tiles, *strides, *do.stride()[:3],
            *lse.stride()[:2], *sizes, num, RPB_GRAD=rpb_grad, BLOCK_M=block_m, BLOCK_N=block_n, **meta)

        # key tiles: the same tables with the roles of the two tile sizes swapped
        k_tiles = _tiles(launch, block_n, q.device)
        _dkdv_kernel[(k_tiles.shape[0], batch * heads)](
            q, k, v, key_bias, rpb_arg, do, lse, delta, dk, dv, k_tiles, *strides, *do.stride()[:3],
            *lse.stride()[:2], *sizes, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
        drpb = drpb.view(batch, heads, num, -1).sum((0, 2)) if rpb_grad else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, drpb, None


# ----------------------------------------------------------------------------------------- the operator


def h_attention_triton(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool = True,
                       value_coarsening: str = "sum", rpb: Tensor | None = None,
                       lengths: Tensor | None = None) -> Tensor:
    """`h_attention` (same arguments, already checked by it: rpb [H or 1, 4*Nr - 1], lengths a long [B]
    tensor or None, L >= 1) with Triton kernels. `value_coarsening` does not change the function (the
    kernels use the mean form, see the module docstring). Returns [B, H, L, E] in the inputs' dtype."""
    del value_coarsening  # "sum" and "mean" are the same function; the mean form is used for both
    heads, length = q.shape[1:3]
    out_dtype, dtype = promoted_dtypes(q, k, v)
    if out_dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton h_attention kernel supports {', '.join(map(str, KERNEL_DTYPES))}, got "
                        f"{out_dtype}; use attn_impl='torch' for it")
    levels, padded = hierarchy_size(length, block_size)
    with no_autocast(q.device):
        q, k, v, real = padded_inputs(q.to(dtype), k.to(dtype), v.to(dtype), padded, lengths)
        pyramid = coarsening_pyramid(q, k, v, real, levels, causal, "mean")
        if rpb is not None:
            rpb = rpb.to(torch.float32).expand(heads, -1).contiguous()

        def level_attention(parts, fine: bool) -> tuple[Tensor, Tensor]:
            operands = [torch.cat([getattr(p, name) for p in parts], -2).to(out_dtype).contiguous()
                        for name in ("query", "key", "value")]
            bias = torch.cat([torch.where(p.key_valid, p.key_bias, float("-inf")) for p in parts], -1)
            bias = bias.to(torch.float32).reshape(-1, bias.shape[-1]).contiguous()  # [B or 1, T]
            launch = _Launch(padded, 0 if fine else padded, block_size, causal, fine, levels)
            return _LevelAttention.apply(*operands, bias, rpb, launch)

        outputs = [level_attention(pyramid[:1], fine=True)]
        if levels > 1:
            o, lse = level_attention(pyramid[1:], fine=False)
            sizes = [padded >> level for level in range(1, levels)]
            outputs += zip(o.split(sizes, -2), lse.split(sizes, -1))

        merged = None  # coarsest first, as the reference: a partial with numerator o, denominator 1 at lse
        for o, lse in reversed(outputs):
            partial = Partial(o, torch.isfinite(lse).to(o.dtype), lse)
            merged = partial if merged is None else lse_merge(partial, upsample(merged))
        out = normalised_output(merged, real, length)
    return out.to(out_dtype)
