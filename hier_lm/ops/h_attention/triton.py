"""H-Transformer-1D attention as Triton kernels (forward and backward): the same function as the PyTorch
reference (`reference.py`; the package docstring defines it), run by `h_attention(..., attn_impl="triton")`.

Imported lazily by `h_attention` only: it imports triton at the top, but launches nothing, tunes nothing and
queries no device at import.

The kernels use the "mean" form of the coarsening: coarse keys and values are group means and a coarse key
carries the logit bias log(real tokens in its group) (-inf for an all-padding group), computed in the kernels
from the group's index and the row's length. That is the same function as value_coarsening="sum", so both run
this path. Coarse level l (1..M-1) of the pyramid is stored packed: rows [L_pad - 2 * (L_pad >> l), + L_pad >> l)
of one [B, H, T_c, .] tensor, T_c = L_pad - 2 * Nr. Level 0 is the inputs themselves (never padded or copied).

Forward, for q, k: [B, H, L, D], v: [B, H, L, E] (2 + ceil((M-1) / c) launches, c = log2 of the chunk):
1. pyramid   `_pyramid_kernel`: a program reduces a chunk of 2**c rows of level s pairwise in registers and
             writes levels s+1..s+c of the coarse q (group mean; causal: the group's first token), k and v
             (group means), in the inputs' dtype; one launch for levels 1..c, one more per further c levels.
2. coarse    `_attention_kernel` over every Nr-block of every coarse level (levels are rows of the tile
             table): each coarse query block against its LEFT / RIGHT neighbour blocks (causal: LEFT) minus
             the half-block correction; a partial softmax (o_l, lse_l) per coarse row, float32.
3. level 0   `_attention_kernel` (FINE) per tile of query rows: flash attention over the own and neighbouring
             Nr-blocks (causal: the left block and the lower triangle), then an online log-sum-exp merge of
             the row's coarse partials (o_l, lse_l)[i >> l] of every level; writes the output in its dtype and
             the row's final lse.
Backward (4 + max(1, ceil((M-1) / c)) launches), flash-attention style, probabilities recomputed from the lse:
1. `_grad_pyramid_kernel`: delta_i = dO_i . o_i per fine row, and per coarse row a of every level, over the real
   fine rows i of its group: lse_a = min_i lse_i, dO_a = sum_i exp(lse_a - lse_i) dO_i, delta_a likewise. A
   coarse logit s_ac is shared by the rows of group a, so its gradient is exp(s_ac - lse_a) (dO_a . v_c -
   delta_a): a coarse level's backward is plain flash-attention backward on (lse_a, dO_a, delta_a).
2. coarse `_dq_kernel` and `_dkdv_kernel` over the coarse tiles: gradients of the packed coarse q, k, v (fp32).
3. level-0 `_dq_kernel` and `_dkdv_kernel` per fine tile, each ending with the pyramid's backward for its rows
   (a fine row's share of every coarse row it was averaged or sampled into), written in the inputs' dtype.
The h-RPB gradient: per-tile partial sums of the dq launches, summed by one torch op.

Precision: operands in the kernel dtype (`kernel_dtype`: the inputs' dtype, or autocast's), dots at
`dot_precision` (fp32: exact or TF32 as `torch.get_float32_matmul_precision()` says), accumulation, the
coarse partials, lse and coarse gradients in float32 (the coarse dO_a in the kernel dtype, as dO). float64 has no kernel (use attn_impl="torch").
Large shapes: every offset into a tensor is computed in int64; the grid is 1-D (tiles x batch x heads, at
most 2**31 - 1 programs), within CUDA's limits at any B * H. Tiles: `tiles.attention_tiles`, from the
launch target's shared memory per block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hier_lm.ops.common import dot_precision, kernel_dtype, promoted_dtypes, scratch, shared_memory_budget
from hier_lm.ops.h_attention.reference import hierarchy_size
from hier_lm.ops.h_attention.tiles import BACKWARD_WARPS, attention_tiles, pow2

__all__ = ["KERNEL_DTYPES", "h_attention_triton"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- shared pieces


@triton.jit
def _count(idx, level, length):
    """Real fine tokens of group `idx` of `level` (fine rows [idx << level, (idx + 1) << level)) in a row of
    `length` real tokens."""
    return tl.minimum(tl.maximum(length - (idx << level), 0), (idx * 0 + 1) << level)


@triton.jit
def _level_offset(L_PAD, level):
    """First row of coarse level `level` (>= 1) in the packed pyramid."""
    return L_PAD - 2 * (L_PAD >> level)


@triton.jit
def _program(NUM, H, LENS, LENGTH, HAS_LENS: tl.constexpr):
    """(index in [0, NUM), batch * H + head as int64, this row's real length) of this program (1-D grid)."""
    pid = tl.program_id(0)
    index = pid % NUM
    bh = pid // NUM
    if HAS_LENS:
        length = tl.load(LENS + bh // H).to(tl.int32)
    else:
        length = LENGTH
    return index, bh.to(tl.int64), length


@triton.jit
def _scores(q, k, rows, cols, row_end, col_end, level, length, rpb_ptr, scale,
            NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
            PREC: tl.constexpr):
    """Masked logits [BM, BN] of query rows `rows` (< row_end) against key columns `cols` (< col_end) of one
    level: q.k * scale + log(real tokens of the key's group) (+ h-RPB); -inf where the level does not cover
    the pair or the key holds no real token."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    count = _count(cols, level, length)
    col_ok = (cols < col_end) & (count > 0)
    s += tl.log(tl.maximum(count, 1).to(tl.float32))[None, :]
    rel = cols[None, :] - rows[:, None]  # key minus query, in tokens of this level
    if HAS_RPB:
        index = tl.minimum(tl.maximum(rel + (2 * NR - 1), 0), 4 * NR - 2)  # clamped only where not allowed
        s += tl.load(rpb_ptr + index).to(tl.float32)
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
def _tile(TILES, tile, L_PAD, LENGTH):
    """(level, first row, end row, rows of the level in memory, first row of the level in its tensor)."""
    level = tl.load(TILES + 3 * tile)
    start = tl.load(TILES + 3 * tile + 1)
    end = tl.load(TILES + 3 * tile + 2)
    coarse = tl.maximum(level, 1)
    n = tl.where(level == 0, LENGTH, L_PAD >> coarse)
    off = tl.where(level == 0, 0, _level_offset(L_PAD, coarse))
    return level, start, end, n, off


# ----------------------------------------------------------------------------------------- pyramids


@triton.jit
def _pyramid_kernel(Q, K, V, QC, KC, VC, LENS,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt,
                    H, L_PAD, LENGTH, LEVELS, SRC_LEVEL, NUM_CHUNKS, T_C, D, E,
                    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, SRC_FINE: tl.constexpr,
                    CHUNK_LOG2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Levels SRC_LEVEL+1 .. SRC_LEVEL+CHUNK_LOG2 (those < LEVELS) of the coarse q, k, v, reduced pairwise in
    registers from one chunk of 2**CHUNK_LOG2 rows of level SRC_LEVEL (SRC_FINE: the inputs; else the packed
    pyramid, whose rows are group means, or first tokens for causal q)."""
    CHUNK: tl.constexpr = 1 << CHUNK_LOG2
    chunk, bh, length = _program(NUM_CHUNKS, H, LENS, LENGTH, HAS_LENS)
    b = bh // H
    h = bh % H
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    if SRC_FINE:
        src = rows.to(tl.int64)
        n_src = LENGTH
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
    else:
        src = (_level_offset(L_PAD, SRC_LEVEL) + rows).to(tl.int64)
        n_src = L_PAD >> SRC_LEVEL
        q_base = QC + bh * T_C * D
        k_base = KC + bh * T_C * D
        v_base = VC + bh * T_C * E
    count = _count(rows, SRC_LEVEL, length).to(tl.float32)
    ok = (rows < n_src) & (count > 0)
    d_mask = ok[:, None] & (offs_d[None, :] < D)
    e_mask = ok[:, None] & (offs_e[None, :] < E)
    # group sums of the real tokens (a coarse row holds a mean: times its count); causal q: first tokens
    k = tl.load(k_base + src[:, None] * stride_kt + offs_d[None, :], mask=d_mask, other=0.0).to(tl.float32)
    v = tl.load(v_base + src[:, None] * stride_vt + offs_e[None, :], mask=e_mask, other=0.0).to(tl.float32)
    q = tl.load(q_base + src[:, None] * stride_qt + offs_d[None, :], mask=d_mask, other=0.0).to(tl.float32)
    k = k * count[:, None]
    v = v * count[:, None]
    if not CAUSAL:
        q = q * count[:, None]
    for j in tl.static_range(1, CHUNK_LOG2 + 1):
        k = tl.sum(tl.reshape(k, [CHUNK >> j, 2, BLOCK_D]), 1)
        v = tl.sum(tl.reshape(v, [CHUNK >> j, 2, BLOCK_E]), 1)
        if CAUSAL:  # the first of each pair
            first = (tl.arange(0, CHUNK >> (j - 1)) % 2) == 0
            q = tl.sum(tl.reshape(tl.where(first[:, None], q, 0.0), [CHUNK >> j, 2, BLOCK_D]), 1)
        else:
            q = tl.sum(tl.reshape(q, [CHUNK >> j, 2, BLOCK_D]), 1)
        level = SRC_LEVEL + j
        safe = tl.minimum(level, LEVELS - 1)  # addresses of levels past the last are never used
        out_rows = chunk * (CHUNK >> j) + tl.arange(0, CHUNK >> j)
        inv = 1.0 / tl.maximum(_count(out_rows, safe, length).to(tl.float32), 1.0)
        dst = (_level_offset(L_PAD, tl.maximum(safe, 1)) + out_rows).to(tl.int64)
        store = (level < LEVELS) & (out_rows < (L_PAD >> safe))
        qk_mask = store[:, None] & (offs_d[None, :] < D)
        tl.store(KC + bh * T_C * D + dst[:, None] * D + offs_d[None, :], (k * inv[:, None]).to(KC.dtype.element_ty),
                 mask=qk_mask)
        tl.store(VC + bh * T_C * E + dst[:, None] * E + offs_e[None, :], (v * inv[:, None]).to(VC.dtype.element_ty),
                 mask=store[:, None] & (offs_e[None, :] < E))
        if CAUSAL:
            q_out = q
        else:
            q_out = q * inv[:, None]
        tl.store(QC + bh * T_C * D + dst[:, None] * D + offs_d[None, :], q_out.to(QC.dtype.element_ty), mask=qk_mask)


@triton.jit
def _grad_pyramid_kernel(DO, O, LSE, DELTA, DOC, LSEC, DELTAC, LENS,
                         stride_dob, stride_doh, stride_dot,
                         H, L_PAD, LENGTH, LEVELS, SRC_LEVEL, NUM_CHUNKS, T_C, E,
                         HAS_LENS: tl.constexpr, SRC_FINE: tl.constexpr, CHUNK_LOG2: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    """The coarse rows' backward inputs for levels SRC_LEVEL+1 .. SRC_LEVEL+CHUNK_LOG2 (< LEVELS), from a chunk of
    level SRC_LEVEL (SRC_FINE: the output o, its gradient dO and lse; it also writes delta_i = dO_i . o_i):
    LSEC_a = min over the group's rows with a finite lse (+inf if none), DOC_a = sum exp(LSEC_a - lse_i) dO_i,
    DELTAC_a = sum exp(LSEC_a - lse_i) delta_i; a coarse source row stands for its group's rows."""
    CHUNK: tl.constexpr = 1 << CHUNK_LOG2
    chunk, bh, length = _program(NUM_CHUNKS, H, LENS, LENGTH, HAS_LENS)
    b = bh // H
    h = bh % H
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    offs_e = tl.arange(0, BLOCK_E)
    if SRC_FINE:
        ok = rows < LENGTH
        e_mask = ok[:, None] & (offs_e[None, :] < E)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows.to(tl.int64)[:, None] * stride_dot + offs_e[None, :],
                     mask=e_mask, other=0.0).to(tl.float32)
        o = tl.load(O + (bh * LENGTH + rows)[:, None] * E + offs_e[None, :], mask=e_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * LENGTH + rows, mask=ok, other=float("-inf"))
        delta = tl.sum(do * o, 1)
        tl.store(DELTA + bh * LENGTH + rows, delta, mask=ok)
        key = tl.where(lse == float("-inf"), float("inf"), lse)  # padding rows: no weight
    else:
        src = bh * T_C + _level_offset(L_PAD, SRC_LEVEL) + rows
        ok = rows < (L_PAD >> SRC_LEVEL)
        do = tl.load(DOC + src[:, None] * E + offs_e[None, :], mask=ok[:, None] & (offs_e[None, :] < E),
                     other=0.0).to(tl.float32)
        key = tl.load(LSEC + src, mask=ok, other=float("inf"))
        delta = tl.load(DELTAC + src, mask=ok, other=0.0)
    for j in tl.static_range(1, CHUNK_LOG2 + 1):
        pair = tl.reshape(key, [CHUNK >> j, 2])
        key = tl.min(pair, 1)
        finite = tl.where(key < float("inf"), key, 0.0)  # both children without weight: w = 0
        w = tl.where(pair < float("inf"), tl.exp(finite[:, None] - pair), 0.0)  # [CHUNK >> j, 2], at most 1
        do = tl.sum(tl.reshape(do, [CHUNK >> j, 2, BLOCK_E]) * w[:, :, None], 1)
        delta = tl.sum(tl.reshape(delta, [CHUNK >> j, 2]) * w, 1)
        level = SRC_LEVEL + j
        safe = tl.minimum(level, LEVELS - 1)
        out_rows = chunk * (CHUNK >> j) + tl.arange(0, CHUNK >> j)
        dst = bh * T_C + _level_offset(L_PAD, tl.maximum(safe, 1)) + out_rows
        store = (level < LEVELS) & (out_rows < (L_PAD >> safe))
        tl.store(DOC + dst[:, None] * E + offs_e[None, :], do.to(DOC.dtype.element_ty),
                 mask=store[:, None] & (offs_e[None, :] < E))
        tl.store(LSEC + dst, key, mask=store)
        tl.store(DELTAC + dst, delta, mask=store)


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, rows, row_end, lo, hi, level, length, k_ptr, v_ptr, rpb_ptr,
                 stride_kt, stride_vt, scale, D, E,
                 NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Online softmax of the query tile over keys [lo, hi) of its level."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _scores(q, k, rows, cols, row_end, hi, level, length, rpb_ptr, scale, NR, CAUSAL, FINE, HAS_RPB, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys so far stays at 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols.to(tl.int64)[:, None] * stride_vt + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(Q, K, V, RPB, LENS, O, LSE, OC, LSEC, TILES,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_rpbh,
                      H, L_PAD, LENGTH, LEVELS, NUM_TILES, T_OUT, T_C, scale, D, E,
                      NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                      HAS_LENS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """One query tile of one (batch, head). Coarse: the partial (o, lse) of its rows over their level's keys,
    into O, LSE (= the packed OC, LSEC). FINE: level 0, merged with the coarse partials OC, LSEC of every
    coarser level; the output (O's dtype) and the final lse."""
    tile, bh, length = _program(NUM_TILES, H, LENS, LENGTH, HAS_LENS)
    b = bh // H
    h = bh % H
    level, m0, m1, n, off = _tile(TILES, tile, L_PAD, LENGTH)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = tl.load(Q + b * stride_qb + h * stride_qh + (off + rows).to(tl.int64)[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh + off.to(tl.int64) * stride_kt
    v_ptr = V + b * stride_vb + h * stride_vh + off.to(tl.int64) * stride_vt
    rpb_ptr = RPB + h * stride_rpbh

    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    b0 = m0 // NR
    b1 = (m1 - 1) // NR
    lo = tl.maximum((b0 - 1) * NR, 0)
    if FINE:  # own and neighbouring blocks (causal: the left one and the own up to the row); real rows only
        if CAUSAL:
            hi = m1
        else:
            hi = tl.minimum((b1 + 2) * NR, n)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, tl.minimum(m1, length), lo, hi, level, length, k_ptr,
                                     v_ptr, rpb_ptr, stride_kt, stride_vt, scale, D, E, NR, CAUSAL, FINE, HAS_RPB,
                                     PREC, BLOCK_N, BLOCK_D, BLOCK_E)
        real = row_ok & (rows < length)
        for coarse in range(1, LEVELS):  # online merge of the coarse partials of the row's groups
            src = bh * T_C + _level_offset(L_PAD, coarse) + (rows >> coarse)
            lse_c = tl.load(LSEC + src, mask=real, other=float("-inf"))
            o_c = tl.load(OC + src[:, None] * E + offs_e[None, :], mask=real[:, None] & (offs_e[None, :] < E),
                          other=0.0)
            m_new = tl.maximum(m_i, lse_c)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            beta = tl.exp(lse_c - m_safe)
            acc = acc * alpha[:, None] + o_c * beta[:, None]
            l_i = l_i * alpha + beta
            m_i = m_new
    else:  # a coarse tile lies in one block: its LEFT neighbour (empty for block 0), then its RIGHT one
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, m1, lo, b0 * NR, level, length, k_ptr, v_ptr, rpb_ptr,
                                     stride_kt, stride_vt, scale, D, E, NR, CAUSAL, FINE, HAS_RPB, PREC,
                                     BLOCK_N, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, rows, m1, (b0 + 1) * NR, tl.minimum((b0 + 2) * NR, n),
                                         level, length, k_ptr, v_ptr, rpb_ptr, stride_kt, stride_vt, scale, D, E,
                                         NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_N, BLOCK_D, BLOCK_E)
    has_keys = l_i > 0.0  # rows without any allowed key (padding): o = 0, lse = -inf
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    dst = bh * T_OUT + off + rows
    tl.store(O + dst[:, None] * E + offs_e[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_e[None, :] < E))
    tl.store(LSE + dst, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _dq_segment(dq, q, do, lse, delta, rows, row_end, lo, hi, level, length, k_ptr, v_ptr, rpb_ptr, drpb_ptr,
                stride_kt, stride_vt, scale, D, E,
                NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                RPB_GRAD: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Accumulate the query tile's dq (unscaled: sum ds k) over keys [lo, hi) of its level."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + cols.to(tl.int64)[:, None] * stride_vt + offs_e[None, :],
                    mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        s = _scores(q, k, rows, cols, row_end, hi, level, length, rpb_ptr, scale, NR, CAUSAL, FINE, HAS_RPB, PREC)
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
def _dq_kernel(Q, K, V, RPB, LENS, DO, LSE, DELTA, DQ, DQC, DRPB, TILES,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_rpbh,
               H, L_PAD, LENGTH, LEVELS, NUM_TILES, T_OUT, T_C, DRPB_ROW0, DRPB_ROWS, scale, D, E,
               NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
               HAS_LENS: tl.constexpr, RPB_GRAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """dq of one query tile into DQ (rows T_OUT per (batch, head); coarse: the packed float32 dQC), and its h-RPB
    gradient partial sums (DRPB row bh * DRPB_ROWS + DRPB_ROW0 + tile). FINE: plus the pyramid's backward, the
    row's share of the coarse queries' gradients DQC (causal: it was its group's first token; else 1/count)."""
    tile, bh, length = _program(NUM_TILES, H, LENS, LENGTH, HAS_LENS)
    b = bh // H
    h = bh % H
    level, m0, m1, n, off = _tile(TILES, tile, L_PAD, LENGTH)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    rows64 = (off + rows).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64[:, None] * stride_dot + offs_e[None, :],
                 mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0).to(Q.dtype.element_ty)
    lse = tl.load(LSE + bh * T_OUT + off + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows without keys: every logit is -inf, p = 0
    delta = tl.load(DELTA + bh * T_OUT + off + rows, mask=row_ok, other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh + off.to(tl.int64) * stride_kt
    v_ptr = V + b * stride_vb + h * stride_vh + off.to(tl.int64) * stride_vt
    rpb_ptr = RPB + h * stride_rpbh
    drpb_ptr = DRPB + (bh * DRPB_ROWS + DRPB_ROW0 + tile) * (4 * NR - 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b0 = m0 // NR
    b1 = (m1 - 1) // NR
    lo = tl.maximum((b0 - 1) * NR, 0)
    if FINE:
        if CAUSAL:
            hi = m1
        else:
            hi = tl.minimum((b1 + 2) * NR, n)
        dq = _dq_segment(dq, q, do, lse, delta, rows, tl.minimum(m1, length), lo, hi, level, length, k_ptr, v_ptr,
                         rpb_ptr, drpb_ptr, stride_kt, stride_vt, scale, D, E, NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD,
                         PREC, BLOCK_N, BLOCK_D, BLOCK_E)
        dq = dq * scale
        real = row_ok & (rows < length)
        for coarse in range(1, LEVELS):  # the pyramid's backward for these query rows
            group = rows >> coarse
            if CAUSAL:
                share = tl.where(real & ((group << coarse) == rows), 1.0, 0.0)
            else:
                share = tl.where(real, 1.0 / tl.maximum(_count(group, coarse, length), 1).to(tl.float32), 0.0)
            src = bh * T_C + _level_offset(L_PAD, coarse) + group
            g = tl.load(DQC + src[:, None] * D + offs_d[None, :], mask=(share > 0)[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            dq += g * share[:, None]
    else:
        dq = _dq_segment(dq, q, do, lse, delta, rows, m1, lo, b0 * NR, level, length, k_ptr, v_ptr, rpb_ptr,
                         drpb_ptr, stride_kt, stride_vt, scale, D, E, NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD, PREC,
                         BLOCK_N, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            dq = _dq_segment(dq, q, do, lse, delta, rows, m1, (b0 + 1) * NR, tl.minimum((b0 + 2) * NR, n), level,
                             length, k_ptr, v_ptr, rpb_ptr, drpb_ptr, stride_kt, stride_vt, scale, D, E,
                             NR, CAUSAL, FINE, HAS_RPB, RPB_GRAD, PREC, BLOCK_N, BLOCK_D, BLOCK_E)
        dq = dq * scale
    dst = bh * T_OUT + off + rows
    tl.store(DQ + dst[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_segment(dk, dv, k, v, cols, col_end, lo, hi, row_end, level, length, q_ptr, do_ptr, lse_ptr, delta_ptr,
                  rpb_ptr, stride_qt, stride_dot, scale, D, E,
                  NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Accumulate dk (unscaled: sum ds^T q), dv of the key tile over query rows [lo, hi) (< row_end) of its level."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptr + rows.to(tl.int64)[:, None] * stride_dot + offs_e[None, :],
                     mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0).to(q.dtype)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        s = _scores(q, k, rows, cols, tl.minimum(hi, row_end), col_end, level, length, rpb_ptr, scale, NR, CAUSAL,
                    FINE, HAS_RPB, PREC)
        p = tl.exp(s - lse[:, None])  # [BM, BN]
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, RPB, LENS, DO, LSE, DELTA, DK, DV, DKC, DVC, TILES,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_rpbh,
                 H, L_PAD, LENGTH, LEVELS, NUM_TILES, T_OUT, T_C, scale, D, E,
                 NR: tl.constexpr, CAUSAL: tl.constexpr, FINE: tl.constexpr, HAS_RPB: tl.constexpr,
                 HAS_LENS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """dk, dv of one key tile (the transpose of the forward's band: which query rows see these keys) into DK,
    DV (coarse: the packed float32 dKC, dVC). FINE: plus the pyramid's backward, the key's share 1/count of the
    gradients DKC, DVC of the coarse keys and values its group was averaged into."""
    tile, bh, length = _program(NUM_TILES, H, LENS, LENGTH, HAS_LENS)
    b = bh // H
    h = bh % H
    level, n0, n1, n, off = _tile(TILES, tile, L_PAD, LENGTH)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n1
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    cols64 = (off + cols).to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + cols64[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols64[:, None] * stride_vt + offs_e[None, :],
                mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    q_ptr = Q + b * stride_qb + h * stride_qh + off.to(tl.int64) * stride_qt
    do_ptr = DO + b * stride_dob + h * stride_doh + off.to(tl.int64) * stride_dot
    lse_ptr = LSE + bh * T_OUT + off
    delta_ptr = DELTA + bh * T_OUT + off
    rpb_ptr = RPB + h * stride_rpbh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    b0 = n0 // NR
    b1 = (n1 - 1) // NR
    if FINE:  # query blocks b-1..b+1 (causal: rows from the first key on, blocks b..b+1); real rows only
        if CAUSAL:
            lo = n0
        else:
            lo = tl.maximum((b0 - 1) * NR, 0)
        dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, lo, tl.minimum((b1 + 2) * NR, n), length, level, length,
                               q_ptr, do_ptr, lse_ptr, delta_ptr, rpb_ptr, stride_qt, stride_dot, scale, D, E,
                               NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
        dk = dk * scale
        real = col_ok & (cols < length)
        for coarse in range(1, LEVELS):  # the pyramid's backward for these keys and values
            group = cols >> coarse
            share = tl.where(real, 1.0 / tl.maximum(_count(group, coarse, length), 1).to(tl.float32), 0.0)
            src = bh * T_C + _level_offset(L_PAD, coarse) + group
            g = tl.load(DKC + src[:, None] * D + offs_d[None, :], mask=real[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            dk += g * share[:, None]
            g = tl.load(DVC + src[:, None] * E + offs_e[None, :], mask=real[:, None] & (offs_e[None, :] < E),
                        other=0.0)
            dv += g * share[:, None]
    else:  # the query block right of this key block sees it as LEFT; the one left of it as RIGHT
        dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, (b0 + 1) * NR, tl.minimum((b0 + 2) * NR, n), n, level,
                               length, q_ptr, do_ptr, lse_ptr, delta_ptr, rpb_ptr, stride_qt, stride_dot, scale,
                               D, E, NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
        if not CAUSAL:
            dk, dv = _dkdv_segment(dk, dv, k, v, cols, n1, tl.maximum((b0 - 1) * NR, 0), b0 * NR, n, level,
                                   length, q_ptr, do_ptr, lse_ptr, delta_ptr, rpb_ptr, stride_qt, stride_dot,
                                   scale, D, E, NR, CAUSAL, FINE, HAS_RPB, PREC, BLOCK_M, BLOCK_D, BLOCK_E)
        dk = dk * scale
    dst = bh * T_OUT + off + cols
    tl.store(DK + dst[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + dst[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_e[None, :] < E))


# ----------------------------------------------------------------------------------------- launches


class _Plan(NamedTuple):
    """The shape-dependent constants of one call (hashable: the tile tables are cached on it)."""

    length: int  # L
    padded: int  # L_pad = Nr * 2**M
    levels: int  # M
    block_size: int  # Nr
    causal: bool
    fine_tiles: tuple[int, int, int, int]  # (query rows, key rows, stages, warps) of the level-0 kernels
    coarse_tiles: tuple[int, int, int, int]  # the same for the coarse levels
    chunk_log2: int  # the pyramid kernels reduce chunks of 2**chunk_log2 rows

    @property
    def coarse_rows(self) -> int:
        """T_c: rows of the packed coarse levels 1..M-1 (at least 1, so that the buffers are never empty)."""
        return max(self.padded - 2 * self.block_size, 1)


def _plan(length: int, block_size: int, causal: bool, dim: int, value_dim: int, dtype: torch.dtype,
          device: torch.device) -> _Plan:
    levels, padded = hierarchy_size(length, block_size)
    budget = shared_memory_budget(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    fine, coarse = (attention_tiles(block_size, dim, value_dim, itemsize, f, budget) for f in (True, False))
    chunk_log2 = 5 if max(pow2(dim), pow2(value_dim)) <= 64 else 4  # 32 or 16 rows: q, k, v chunks in registers
    return _Plan(length, padded, levels, block_size, causal, tuple(fine.values()), tuple(coarse.values()), chunk_log2)


@functools.lru_cache(maxsize=128)
def _tiles(plan: _Plan, fine: bool, rows: int, device: torch.device) -> Tensor:
    """[num_tiles, 3] int32 (level, first row, end row): fine = rows [0, L) of level 0 cut into tiles of `rows`;
    coarse = every Nr-block of levels 1..M-1, each cut into tiles of at most `rows` rows."""
    if fine:
        table = [(0, start, min(start + rows, plan.length)) for start in range(0, plan.length, rows)]
    else:
        nr = plan.block_size
        table = [(level, start, min(start + rows, block + nr))
                 for level in range(1, plan.levels) for block in range(0, plan.padded >> level, nr)
                 for start in range(block, block + nr, rows)]
    return torch.tensor(table, dtype=torch.int32).to(device)


def _strides(*tensors: Tensor) -> list[int]:
    """(batch, head, row) strides of [B, H, T, .] tensors, flattened."""
    return [s for x in tensors for s in x.stride()[:3]]


def _meta(plan: _Plan, fine: bool, q: Tensor, v: Tensor, rpb: Tensor | None, lengths: Tensor | None) -> dict:
    rows, cols, stages, warps = plan.fine_tiles if fine else plan.coarse_tiles
    return dict(NR=plan.block_size, CAUSAL=plan.causal, FINE=fine, HAS_RPB=rpb is not None,
                HAS_LENS=lengths is not None, PREC=dot_precision(q.dtype), BLOCK_M=rows, BLOCK_N=cols,
                BLOCK_D=pow2(q.shape[-1]), BLOCK_E=pow2(v.shape[-1]), num_stages=stages, num_warps=warps)


def _pyramid_sources(plan: _Plan) -> range:
    """The source levels of the pyramid launches: 0, c, 2c, ... below the last level."""
    return range(0, plan.levels - 1, plan.chunk_log2)


class _HAttention(torch.autograd.Function):
    """out = h_attention(q, k, v) (mean form), with its backward. q, k: [B, H, L, D], v: [B, H, L, E] in the
    kernel dtype (unit stride on the last dim); rpb: [H or 1, 4*Nr - 1] or None; lengths: long [B] or None.
    Returns [B, H, L, E] in `out_dtype`."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, lengths, plan: _Plan, out_dtype: torch.dtype):
        batch, heads, length, dim = q.shape
        edim = v.shape[-1]
        t_c = plan.coarse_rows
        device = q.device
        rpb_arg = rpb if rpb is not None else q  # never read without HAS_RPB
        lens_arg = lengths if lengths is not None else q  # never read without HAS_LENS
        rpb_stride = rpb.stride(0) if rpb is not None and rpb.shape[0] > 1 else 0
        qc, kc = scratch((batch, heads, t_c, dim), q.dtype, device), scratch((batch, heads, t_c, dim), q.dtype, device)
        vc = scratch((batch, heads, t_c, edim), q.dtype, device)
        oc = scratch((batch, heads, t_c, edim), torch.float32, device)
        lse_c = scratch((batch, heads, t_c), torch.float32, device)
        out = scratch((batch, heads, length, edim), out_dtype, device)
        lse = scratch((batch, heads, length), torch.float32, device)
        shape = (heads, plan.padded, length, plan.levels)
        if plan.levels > 1:
            for source in _pyramid_sources(plan):
                src = (q, k, v) if source == 0 else (qc, kc, vc)
                chunks = triton.cdiv(plan.padded >> source, 1 << plan.chunk_log2)
                _pyramid_kernel[(chunks * batch * heads,)](
                    q, k, v, qc, kc, vc, lens_arg, *_strides(*src), *shape, source, chunks, t_c, dim, edim,
                    CAUSAL=plan.causal, HAS_LENS=lengths is not None, SRC_FINE=source == 0,
                    CHUNK_LOG2=plan.chunk_log2, BLOCK_D=pow2(dim), BLOCK_E=pow2(edim))
            meta = _meta(plan, False, q, v, rpb, lengths)
            tiles = _tiles(plan, False, meta["BLOCK_M"], device)
            _attention_kernel[(tiles.shape[0] * batch * heads,)](
                qc, kc, vc, rpb_arg, lens_arg, oc, lse_c, oc, lse_c, tiles, *_strides(qc, kc, vc), rpb_stride,
                *shape, tiles.shape[0], t_c, t_c, dim**-0.5, dim, edim, **meta)
        meta = _meta(plan, True, q, v, rpb, lengths)
        tiles = _tiles(plan, True, meta["BLOCK_M"], device)
        _attention_kernel[(tiles.shape[0] * batch * heads,)](
            q, k, v, rpb_arg, lens_arg, out, lse, oc, lse_c, tiles, *_strides(q, k, v), rpb_stride,
            *shape, tiles.shape[0], length, t_c, dim**-0.5, dim, edim, **meta)
        ctx.save_for_backward(q, k, v, rpb, lengths, qc, kc, vc, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, rpb, lengths, qc, kc, vc, out, lse = ctx.saved_tensors
        plan = ctx.plan
        batch, heads, length, dim = q.shape
        edim = v.shape[-1]
        t_c = plan.coarse_rows
        device = q.device
        rpb_arg = rpb if rpb is not None else q
        lens_arg = lengths if lengths is not None else q
        rpb_stride = rpb.stride(0) if rpb is not None and rpb.shape[0] > 1 else 0
        shape = (heads, plan.padded, length, plan.levels)
        scale = dim**-0.5

        delta = scratch((batch, heads, length), torch.float32, device)
        do_c = scratch((batch, heads, t_c, edim), q.dtype, device)  # the kernel dtype, as the fine dO
        lse_c, delta_c = (scratch((batch, heads, t_c), torch.float32, device) for _ in range(2))
        for source in _pyramid_sources(plan) or [0]:  # at source 0 also delta (with one level: only delta)
            chunks = triton.cdiv((plan.padded if plan.levels > 1 else length) >> source, 1 << plan.chunk_log2)
            _grad_pyramid_kernel[(chunks * batch * heads,)](
                do, out, lse, delta, do_c, lse_c, delta_c, lens_arg, *do.stride()[:3], *shape, source, chunks,
                t_c, edim, HAS_LENS=lengths is not None, SRC_FINE=source == 0, CHUNK_LOG2=plan.chunk_log2,
                BLOCK_E=pow2(edim))

        rpb_grad = rpb is not None and ctx.needs_input_grad[3]
        fine_meta, coarse_meta = _meta(plan, True, q, v, rpb, lengths), _meta(plan, False, q, v, rpb, lengths)
        q_tiles = {fine: _tiles(plan, fine, meta["BLOCK_M"], device)
                   for fine, meta in ((True, fine_meta), (False, coarse_meta)) if fine or plan.levels > 1}
        k_tiles = {fine: _tiles(plan, fine, meta["BLOCK_N"], device) for fine, meta in
                   ((True, fine_meta), (False, coarse_meta)) if fine or plan.levels > 1}
        drpb_rows = sum(t.shape[0] for t in q_tiles.values())
        drpb = (torch.zeros(batch * heads * drpb_rows, 4 * plan.block_size - 1, device=device) if rpb_grad
                else lse)
        dq, dk, dv = (scratch(x.shape, x.dtype, device) for x in (q, k, v))
        dq_c, dk_c = (scratch((batch, heads, t_c, dim), torch.float32, device) for _ in range(2))
        dv_c = scratch((batch, heads, t_c, edim), torch.float32, device)
        if plan.levels > 1:
            tiles = q_tiles[False]
            _dq_kernel[(tiles.shape[0] * batch * heads,)](
                qc, kc, vc, rpb_arg, lens_arg, do_c, lse_c, delta_c, dq_c, dq_c, drpb, tiles,
                *_strides(qc, kc, vc, do_c), rpb_stride, *shape, tiles.shape[0], t_c, t_c, q_tiles[True].shape[0],
                drpb_rows, scale, dim, edim, RPB_GRAD=rpb_grad, **coarse_meta)
            tiles = k_tiles[False]
            _dkdv_kernel[(tiles.shape[0] * batch * heads,)](
                qc, kc, vc, rpb_arg, lens_arg, do_c, lse_c, delta_c, dk_c, dv_c, dk_c, dv_c, tiles,
                *_strides(qc, kc, vc, do_c), rpb_stride, *shape, tiles.shape[0], t_c, t_c, scale, dim, edim,
                **dict(coarse_meta, num_warps=BACKWARD_WARPS))
        tiles = q_tiles[True]
        _dq_kernel[(tiles.shape[0] * batch * heads,)](
            q, k, v, rpb_arg, lens_arg, do, lse, delta, dq, dq_c, drpb, tiles, *_strides(q, k, v, do), rpb_stride,
            *shape, tiles.shape[0], length, t_c, 0, drpb_rows, scale, dim, edim, RPB_GRAD=rpb_grad, **fine_meta)
        tiles = k_tiles[True]
        _dkdv_kernel[(tiles.shape[0] * batch * heads,)](
            q, k, v, rpb_arg, lens_arg, do, lse, delta, dk, dv, dk_c, dv_c, tiles, *_strides(q, k, v, do),
            rpb_stride, *shape, tiles.shape[0], length, t_c, scale, dim, edim,
            **dict(fine_meta, num_warps=BACKWARD_WARPS))
        d_rpb = None
        if rpb_grad:
            d_rpb = drpb.view(batch, heads if rpb.shape[0] > 1 else 1, -1, drpb.shape[-1]).sum((0, 2))
            d_rpb = d_rpb.to(rpb.dtype)
        return dq, dk, dv, d_rpb, None, None, None


# ----------------------------------------------------------------------------------------- the operator


def h_attention_triton(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool = True,
                       value_coarsening: str = "sum", rpb: Tensor | None = None,
                       lengths: Tensor | None = None) -> Tensor:
    """`h_attention` (same arguments, already checked by it: rpb [H or 1, 4*Nr - 1], lengths a long [B]
    tensor or None, L >= 1) with Triton kernels. `value_coarsening` does not change the function (the
    kernels use the mean form, see the module docstring). Returns [B, H, L, E] in the inputs' dtype."""
    del value_coarsening  # "sum" and "mean" are the same function; the mean form is used for both
    out_dtype = promoted_dtypes(q, k, v)[0]
    dtype = kernel_dtype(q, k, v)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton h_attention kernel supports {', '.join(map(str, KERNEL_DTYPES))}, got "
                        f"{dtype}; use attn_impl='torch' for it")
    q, k, v = (x.to(dtype) if x.stride(-1) == 1 else x.to(dtype).contiguous() for x in (q, k, v))
    if rpb is not None and rpb.stride(-1) != 1:
        rpb = rpb.contiguous()
    plan = _plan(q.shape[2], block_size, causal, q.shape[-1], v.shape[-1], dtype, q.device)
    return _HAttention.apply(q, k, v, rpb, lengths, plan, out_dtype)
