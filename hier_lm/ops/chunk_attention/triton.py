"""Triton kernels (forward and backward) for FLASH's attention cores: the same functions as the references
``mixed_chunk_attention`` and ``relu2_attention`` of ``reference.py`` (the package docstring defines the
scaling); only imported by those ops when they run with ``attn_impl="triton"``.

Inputs are flattened to ``[N, L, D]`` (N = batch x heads) and made contiguous; C is the chunk, G = ceil(L / C)
chunks, chunk g holds the tokens ``g*C .. min(g*C + C, L) - 1`` (the last chunk is never padded in memory: loads
past L are masked to 0). Nothing [C, C] or [L, L] is stored: the weights are recomputed in the backward.

Kernels (one program per tile, fp32 accumulation, float64 in float64; block sizes are constexpr; every grid is
1-D, so B x H and L never meet CUDA's limits on the other grid axes; offsets are an int64 base per tile plus int32
offsets within it, so nothing wraps past 2^31 elements):

* ``_chunk_state_kernel`` + ``_state_scan_kernel``: states of the linear part, ``[N, G, S, E]`` in fp32
  (every chunk's ``X_g^T Y_g`` in parallel, then a light in-place walk over the G chunks):
    forward:  ``H_g = sum_{h<g} K_h^T V_h / (g*C)`` (an exclusive prefix over chunks, ``H_0 = 0``), or
              ``sum_h K_h^T V_h / L`` (bidirectional, in entry 0);
    backward: ``D_h = sum_{g>h} Q_g^T dO_g / (g*C)`` (an exclusive suffix: the states' gradient by a reverse
              prefix sum), or ``Q^T dO / L``.
* ``_fwd_kernel``    ``O = relu(Qq Kq^T / sqrt(S))**2 / C @ V`` within the chunk (causal mask) ``+ Ql @ H_g``.
* ``_bwd_dq_kernel`` ``dQq = dA Kq / sqrt(S)`` with ``dA = (dO V^T) * 2 relu(.) / C`` and ``dQl = dO H_g^T``.
* ``_bwd_dk_kernel`` ``dKq = dA^T Qq / sqrt(S)`` and ``dKl = V D_g^T``.
* ``_bwd_dv_kernel`` ``dV = A^T dO + Kl D_g``.

``relu2_attention`` runs the same kernels with one chunk of L tokens, the divisor ``norm`` and no linear
part. Operands take ``kernel_dtype`` (the autocast dtype under autocast) and fp32 dots ``dot_precision`` (TF32 unless
``torch.get_float32_matmul_precision()`` is "highest"); tiles are picked from the GPU's shared memory
(``_config``). Under ``TRITON_INTERPRET=1`` (the CPU tests) bf16 is not supported by Triton's interpreter; fp16,
fp32 and fp64 are.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hier_lm.ops.chunk_attention.reference import mixed_chunk_attention, relu2_attention  # for empty inputs
from hier_lm.ops.common import (
    construction_budget,
    dot_precision,
    in_compute_dtype,
    kernel_dtype,
    pick_config,
    promoted_dtypes,
    scratch,
    shared_memory_budget,
)

__all__ = ["mixed_chunk_attention_triton", "relu2_attention_triton"]


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_state_kernel(X, Y, H, L, C, NG, S, E,
                        ACC: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """``H[n, g] = X_g^T Y_g`` over chunk g's tokens (X: [N, L, S], Y: [N, L, E], H: [N, NG, S, E]), every chunk
    in parallel; a 1-D grid over (S tile, E tile, chunk, n), the first fastest."""
    pid = tl.program_id(0)
    tiles_e = tl.cdiv(E, BE)
    tiles_se = tl.cdiv(S, BS) * tiles_e
    pid_se, g, pid_n = pid % tiles_se, (pid // tiles_se) % NG, (pid // tiles_se // NG).to(tl.int64)
    offs_s = (pid_se // tiles_e) * BS + tl.arange(0, BS)
    offs_e = (pid_se % tiles_e) * BE + tl.arange(0, BE)
    offs_t = tl.arange(0, BT)
    mask_s, mask_e = offs_s < S, offs_e < E
    lo = g * C
    hi = tl.minimum(lo + C, L)
    state = tl.zeros((BS, BE), dtype=ACC)
    for t0 in range(lo, hi, BT):
        row = pid_n * L + t0  # int64: the offsets below stay within one tile
        mask_t = offs_t < hi - t0
        xt = tl.load(X + row * S + offs_t[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_t[None, :],
                     other=0.0)
        y = tl.load(Y + row * E + offs_t[:, None] * E + offs_e[None, :], mask=mask_t[:, None] & mask_e[None, :],
                    other=0.0)
        state += tl.dot(xt, y, input_precision=PREC, out_dtype=ACC)
    H += (pid_n * NG + g) * S * E
    tl.store(H + offs_s[:, None] * E + offs_e[None, :], state, mask=mask_s[:, None] & mask_e[None, :])


@triton.jit
def _state_scan_kernel(H, NG, C, S, E, inv_len,
                       CAUSAL: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                       BS: tl.constexpr, BE: tl.constexpr):
    """In place over the chunk states ``H: [N, NG, S, E]`` (``X_g^T Y_g``); a 1-D grid over (S tile, E tile, n).

    CAUSAL forward: ``H[g] <- sum_{h<g} H[h] / (g*C)`` (0 for g = 0); REVERSE: ``H[h] <- sum_{g>h} H[g] / (g*C)``;
    otherwise ``H[0] <- sum_g H[g] * inv_len`` (the other entries are left as they are and never read).
    """
    pid = tl.program_id(0)
    tiles_e = tl.cdiv(E, BE)
    tiles_se = tl.cdiv(S, BS) * tiles_e
    pid_se, pid_n = pid % tiles_se, (pid // tiles_se).to(tl.int64)
    offs_s = (pid_se // tiles_e) * BS + tl.arange(0, BS)
    offs_e = (pid_se % tiles_e) * BE + tl.arange(0, BE)
    mask = (offs_s < S)[:, None] & (offs_e < E)[None, :]
    H += offs_s[:, None] * E + offs_e[None, :]
    first = pid_n * NG  # int64: the entry of chunk g is H + (first + g) * S * E
    running = tl.zeros((BS, BE), dtype=ACC)
    if CAUSAL:
        for i in range(0, NG):
            if REVERSE:
                g = NG - 1 - i
            else:
                g = i
            entry = H + (first + g) * S * E
            chunk = tl.load(entry, mask=mask, other=0.0)
            tokens_before = tl.maximum(g * C, 1).to(ACC)
            if REVERSE:
                tl.store(entry, running, mask=mask)
                running += chunk / tokens_before  # chunk 0 (divided by 1) comes last and is never stored
            else:
                tl.store(entry, running / tokens_before, mask=mask)
                running += chunk
    else:
        for g in range(0, NG):
            running += tl.load(H + (first + g) * S * E, mask=mask, other=0.0)
        tl.store(H + first * S * E, running * inv_len, mask=mask)


@triton.jit
def _tile(pid, GT, TILES, C, L, BM: tl.constexpr):
    """(n, chunk g, first row of the tile, end of the chunk) of tile ``pid % GT`` of sequence ``pid // GT``."""
    pid_n = (pid // GT).to(tl.int64)
    pid_t = pid % GT
    g = pid_t // TILES
    start = g * C
    return pid_n, g, start + (pid_t % TILES) * BM, tl.minimum(start + C, L), start


@triton.jit
def _fwd_kernel(QQ, KQ, QL, V, H, O, L, C, TILES, GT, NG, S, E, scale, inv_c,
                CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """O[tile of BM queries, tile of BE values]; a 1-D grid over (E tile, query tile, n), the first fastest (the
    programs of one query tile read the same q and k tiles)."""
    pid = tl.program_id(0)
    tiles_e = tl.cdiv(E, BE)
    pid_e = pid % tiles_e
    pid_n, g, m0, end, start = _tile(pid // tiles_e, GT, TILES, C, L, BM)
    rm, rn, offs_s = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BS)
    offs_e = pid_e * BE + tl.arange(0, BE)
    mask_m, mask_s, mask_e = rm < end - m0, offs_s < S, offs_e < E
    row_m = pid_n * L + m0  # int64; every offset below stays within one tile
    q_mask = mask_m[:, None] & mask_s[None, :]
    q = tl.load(QQ + row_m * S + rm[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
    acc = tl.zeros((BM, BE), dtype=ACC)
    if CAUSAL:
        hi = tl.minimum(m0 + BM, end)
    else:
        hi = end
    for n0 in range(start, hi, BN):
        row_n = pid_n * L + n0
        mask_n = rn < hi - n0
        kt = tl.load(KQ + row_n * S + rn[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_n[None, :],
                     other=0.0)
        scores = tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale
        weights = tl.maximum(scores, 0.0)
        weights = weights * weights * inv_c
        if CAUSAL:
            weights = tl.where(rm[:, None] >= rn[None, :] + (n0 - m0), weights, 0.0)
        v = tl.load(V + row_n * E + rn[:, None] * E + offs_e[None, :], mask=mask_n[:, None] & mask_e[None, :],
                    other=0.0)
        acc += tl.dot(weights.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    if LINEAR:
        if CAUSAL:
            H += (pid_n * NG + g) * S * E
        else:
            H += pid_n * NG * S * E
        ql = tl.load(QL + row_m * S + rm[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
        state = tl.load(H + offs_s[:, None] * E + offs_e[None, :], mask=mask_s[:, None] & mask_e[None, :], other=0.0)
        acc += tl.dot(ql, state.to(ql.dtype), input_precision=PREC, out_dtype=ACC)
    tl.store(O + row_m * E + rm[:, None] * E + offs_e[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_e[None, :])


@triton.jit
def _bwd_dq_kernel(QQ, KQ, V, DO, H, DQQ, DQL, L, C, TILES, GT, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dQq and dQl of a tile of BM queries (all S columns); a 1-D grid over (query tile, n)."""
    pid_n, g, m0, end, start = _tile(tl.program_id(0), GT, TILES, C, L, BM)
    rm, rn, re, offs_s = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BE), tl.arange(0, BS)
    mask_m, mask_s = rm < end - m0, offs_s < S
    row_m = pid_n * L + m0
    q_mask = mask_m[:, None] & mask_s[None, :]
    q = tl.load(QQ + row_m * S + rm[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
    dq = tl.zeros((BM, BS), dtype=ACC)
    if CAUSAL:
        hi = tl.minimum(m0 + BM, end)
    else:
        hi = end
    for n0 in range(start, hi, BN):
        row_n = pid_n * L + n0
        mask_n = rn < hi - n0
        kt = tl.load(KQ + row_n * S + rn[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_n[None, :],
                     other=0.0)
        relu = tl.maximum(tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)
        if CAUSAL:
            relu = tl.where(rm[:, None] >= rn[None, :] + (n0 - m0), relu, 0.0)
        dweights = tl.zeros((BM, BN), dtype=ACC)  # dO V^T, summed over the value tiles
        for e0 in range(0, E, BE):
            mask_e = re < E - e0
            do = tl.load(DO + row_m * E + e0 + rm[:, None] * E + re[None, :], mask=mask_m[:, None] & mask_e[None, :],
                         other=0.0)
            vt = tl.load(V + row_n * E + e0 + rn[None, :] * E + re[:, None], mask=mask_e[:, None] & mask_n[None, :],
                         other=0.0)
            dweights += tl.dot(do, vt, input_precision=PREC, out_dtype=ACC)
        dscores = dweights * relu * (2.0 * inv_c * scale)
        dq += tl.dot(dscores.to(kt.dtype), tl.trans(kt), input_precision=PREC, out_dtype=ACC)
    tl.store(DQQ + row_m * S + rm[:, None] * S + offs_s[None, :], dq.to(DQQ.dtype.element_ty), mask=q_mask)
    if LINEAR:
        if CAUSAL:
            H += (pid_n * NG + g) * S * E
        else:
            H += pid_n * NG * S * E
        dql = tl.zeros((BM, BS), dtype=ACC)
        for e0 in range(0, E, BE):
            mask_e = re < E - e0
            do = tl.load(DO + row_m * E + e0 + rm[:, None] * E + re[None, :], mask=mask_m[:, None] & mask_e[None, :],
                         other=0.0)
            state_t = tl.load(H + offs_s[None, :] * E + e0 + re[:, None], mask=mask_e[:, None] & mask_s[None, :],
                              other=0.0)
            dql += tl.dot(do, state_t.to(do.dtype), input_precision=PREC, out_dtype=ACC)
        tl.store(DQL + row_m * S + rm[:, None] * S + offs_s[None, :], dql.to(DQL.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dk_kernel(QQ, KQ, V, DO, D, DKQ, DKL, L, C, TILES, GT, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dKq and dKl of a tile of BN keys (all S columns); a 1-D grid over (key tile, n)."""
    pid_n, g, n0, end, start = _tile(tl.program_id(0), GT, TILES, C, L, BN)
    rm, rn, re, offs_s = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BE), tl.arange(0, BS)
    mask_n, mask_s = rn < end - n0, offs_s < S
    row_n = pid_n * L + n0
    k_mask = mask_n[:, None] & mask_s[None, :]
    k = tl.load(KQ + row_n * S + rn[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
    dk = tl.zeros((BN, BS), dtype=ACC)
    if CAUSAL:
        lo = n0  # queries before the tile's first key do not see it
    else:
        lo = start
    for m0 in range(lo, end, BM):
        row_m = pid_n * L + m0
        mask_m = rm < end - m0
        qt = tl.load(QQ + row_m * S + rm[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_m[None, :],
                     other=0.0)
        relu_t = tl.maximum(tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)  # [BN, BM]
        if CAUSAL:
            relu_t = tl.where(rm[None, :] + (m0 - n0) >= rn[:, None], relu_t, 0.0)
        dweights_t = tl.zeros((BN, BM), dtype=ACC)  # V dO^T
        for e0 in range(0, E, BE):
            mask_e = re < E - e0
            v = tl.load(V + row_n * E + e0 + rn[:, None] * E + re[None, :], mask=mask_n[:, None] & mask_e[None, :],
                        other=0.0)
            dot_ = tl.load(DO + row_m * E + e0 + rm[None, :] * E + re[:, None], mask=mask_e[:, None] & mask_m[None, :],
                           other=0.0)
            dweights_t += tl.dot(v, dot_, input_precision=PREC, out_dtype=ACC)
        dscores_t = dweights_t * relu_t * (2.0 * inv_c * scale)
        dk += tl.dot(dscores_t.to(qt.dtype), tl.trans(qt), input_precision=PREC, out_dtype=ACC)
    tl.store(DKQ + row_n * S + rn[:, None] * S + offs_s[None, :], dk.to(DKQ.dtype.element_ty), mask=k_mask)
    if LINEAR:
        if CAUSAL:
            D += (pid_n * NG + g) * S * E
        else:
            D += pid_n * NG * S * E
        dkl = tl.zeros((BN, BS), dtype=ACC)
        for e0 in range(0, E, BE):
            mask_e = re < E - e0
            v = tl.load(V + row_n * E + e0 + rn[:, None] * E + re[None, :], mask=mask_n[:, None] & mask_e[None, :],
                        other=0.0)
            dstate_t = tl.load(D + offs_s[None, :] * E + e0 + re[:, None], mask=mask_e[:, None] & mask_s[None, :],
                               other=0.0)
            dkl += tl.dot(v, dstate_t.to(v.dtype), input_precision=PREC, out_dtype=ACC)
        tl.store(DKL + row_n * S + rn[:, None] * S + offs_s[None, :], dkl.to(DKL.dtype.element_ty), mask=k_mask)


@triton.jit
def _bwd_dv_kernel(QQ, KQ, KL, DO, D, DV, L, C, TILES, GT, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dV of a tile of BN keys and BE value columns; a 1-D grid over (E tile, key tile, n), the first fastest."""
    pid = tl.program_id(0)
    tiles_e = tl.cdiv(E, BE)
    pid_e = pid % tiles_e
    pid_n, g, n0, end, start = _tile(pid // tiles_e, GT, TILES, C, L, BN)
    rm, rn, offs_s = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BS)
    offs_e = pid_e * BE + tl.arange(0, BE)
    mask_n, mask_s, mask_e = rn < end - n0, offs_s < S, offs_e < E
    row_n = pid_n * L + n0
    k_mask = mask_n[:, None] & mask_s[None, :]
    k = tl.load(KQ + row_n * S + rn[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
    dv = tl.zeros((BN, BE), dtype=ACC)
    if CAUSAL:
        lo = n0
    else:
        lo = start
    for m0 in range(lo, end, BM):
        row_m = pid_n * L + m0
        mask_m = rm < end - m0
        qt = tl.load(QQ + row_m * S + rm[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_m[None, :],
                     other=0.0)
        weights_t = tl.maximum(tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)  # [BN, BM]
        weights_t = weights_t * weights_t * inv_c
        if CAUSAL:
            weights_t = tl.where(rm[None, :] + (m0 - n0) >= rn[:, None], weights_t, 0.0)
        do = tl.load(DO + row_m * E + rm[:, None] * E + offs_e[None, :], mask=mask_m[:, None] & mask_e[None, :],
                     other=0.0)
        dv += tl.dot(weights_t.to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
    if LINEAR:
        if CAUSAL:
            D += (pid_n * NG + g) * S * E
        else:
            D += pid_n * NG * S * E
        kl = tl.load(KL + row_n * S + rn[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
        dstate = tl.load(D + offs_s[:, None] * E + offs_e[None, :], mask=mask_s[:, None] & mask_e[None, :],
                         other=0.0)
        dv += tl.dot(kl, dstate.to(kl.dtype), input_precision=PREC, out_dtype=ACC)
    tl.store(DV + row_n * E + rn[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & mask_e[None, :])


# ----------------------------------------------------------------------------------------- host side


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _shared_bytes(cfg: dict) -> int:
    """An upper bound of the shared memory of the forward and backward kernels with the tiles of `cfg`: the operand
    loaded before the key (query) loop, plus ``num_stages`` copies of those loaded in it (Triton's software
    pipelining; the inner E loop of dq/dk counted as pipelined too); operands loaded after the loop reuse that
    memory. Calibrated on the compiled kernels (tests/test_aot_compile.py): exact for sm_90; on sm_80 2-byte
    operands take one more copy of the loop's tiles, which the bound counts for every target."""
    bm, bn, bs, be, be_qk = cfg["BM"], cfg["BN"], cfg["BS"], cfg["BE"], cfg["BE_QK"]
    copies = cfg["num_stages"] + (cfg["bytes"] == 2)
    fwd_dv = bm * bs + copies * (bn * bs + bn * be)  # q (k); k (q) and v (dO) per step
    dq_dk = bm * bs + copies * (bn * bs + 2 * bm * be_qk)  # q (k); k (q), dO and V per step
    return cfg["bytes"] * max(fwd_dv, dq_dk)


def _candidates(x: Tensor, chunk: int, s: int, e: int, prec: str | None) -> list[dict]:
    """Kernel configurations, best first. Tensor-core dots (bf16, fp16, fp32 as TF32): 64-row query/key tiles
    (never wider than the chunk) and E tiles as wide as the budget allows, up to 256 (2-byte operands) or 128 (fp32:
    wider ones spill registers on sm_90). The forward and dV kernels recompute their ``Qq Kq^T`` tile once per E
    tile: at the model's S = 128, E = 1024 that costs 1.33x the ideal FLOPs of those kernels with 256-wide tiles
    (1.78x with 128, 2.7x with 64). dq/dk sum ``dO V^T`` over E in tiles of 32. 8 warps for the widest tiles; 2-byte
    tiles of 128 or less take 4 (with 8, ptxas caps them at 128 registers and spills on sm_80). Exact fp32 ("ieee") and fp64 dots
    run on FMA units with their operands in registers: 16-row tiles, E in tiles of 32. S is one tile (128 in the
    paper)."""
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    common_ = dict(ACC=acc, PREC=prec, BS=_pow2(s, 16, 1 << 20), bytes=x.element_size())
    if prec == "ieee":
        shapes = [(16, 32, 32, 4, 2), (16, 16, 16, 4, 1)]
    else:
        tile, half = _pow2(chunk, 16, 64), x.element_size() == 2
        shapes = [(tile, width, 32, 8 if width >= 256 or not half else 4, 2)
                  for width in sorted({_pow2(e, 16, cap) for cap in ((256, 128, 64) if half else (128, 64))},
                                      reverse=True)]
        shapes += [(min(tile, 32), 64, 32, 4, 2), (16, 32, 32, 4, 2), (16, 16, 16, 4, 1)]
    return [dict(common_, BM=tile, BN=tile, BE=_pow2(e, 16, be), BE_QK=_pow2(e, 16, be_qk), num_warps=warps,
                 num_stages=stages) for tile, be, be_qk, warps, stages in shapes]


def _config(x: Tensor, chunk: int, s: int, e: int, budget: int | None = None) -> dict:
    """Block sizes (constexpr), the accumulator dtype, the dot precision (`dot_precision`) and the launch options
    for one call: the first of `_candidates` whose shared memory fits the GPU's (`shared_memory_budget`). Fixed
    choices, no autotuning: nothing is benchmarked at import or on the first call."""
    budget = shared_memory_budget() if budget is None else budget
    cfg = pick_config(_candidates(x, chunk, s, e, dot_precision(x.dtype)), _shared_bytes, budget,
                      f"FLASH attention with s = {s}, e = {e}, chunk {chunk}, {x.dtype}",
                      "choose a smaller shared q/k dim s")
    return {key: value for key, value in cfg.items() if key != "bytes"}


def check_flash_config(s: int, e: int, chunk: int, budget: int | None = None) -> None:
    """Raise a ValueError when no tiling of (s, e, chunk) fits `budget` (default `construction_budget`) in fp16 /
    bf16 or fp32 at either matmul precision (fp64 is checked at launch only)."""
    budget = construction_budget() if budget is None else budget
    for dtype, prec in ((torch.float16, None), (torch.float32, "tf32"), (torch.float32, "ieee")):
        pick_config(_candidates(torch.empty(0, dtype=dtype), chunk, s, e, prec), _shared_bytes, budget,
                    f"the FLASH kernels with s = {s}, e = {e} in {dtype}", "choose a smaller s (model.s)")


def _states(x: Tensor, y: Tensor, chunk: int, causal: bool, reverse: bool, cfg: dict) -> Tensor:
    """The linear part's states from x: [N, L, S], y: [N, L, E] -> [N, G, S, E] (fp32; fp64 for fp64): every
    chunk's ``x_g^T y_g`` in parallel, then the scan over chunks (bidirectional: the mean in entry 0)."""
    n, length, s = x.shape
    e = y.shape[-1]
    groups = -(-length // chunk)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = scratch((n, groups, s, e), dtype, x.device)
    bs, be = _pow2(s, 16, 64), _pow2(e, 16, 64)
    _chunk_state_kernel[(triton.cdiv(s, bs) * triton.cdiv(e, be) * groups * n,)](
        x, y, out, length, chunk, groups, s, e, ACC=cfg["ACC"], PREC=cfg["PREC"], BT=_pow2(chunk, 16, 64), BS=bs,
        BE=be, num_stages=2)
    bs, be = _pow2(s, 16, 32), _pow2(e, 16, 32)  # a light sequential walk over G: small tiles, more programs
    _state_scan_kernel[(triton.cdiv(s, bs) * triton.cdiv(e, be) * n,)](
        out, groups, chunk, s, e, 1.0 / max(length, 1), CAUSAL=causal, REVERSE=reverse, ACC=cfg["ACC"], BS=bs, BE=be)
    return out


def _geometry(length: int, chunk: int, tile: int) -> tuple[int, int]:
    """(tiles per chunk, chunks x tiles): program i handles tile ``i % tiles`` of chunk ``i // tiles``."""
    tiles = triton.cdiv(min(chunk, length), tile)
    return tiles, -(-length // chunk) * tiles


def _forward(qq, kq, ql, kl, v, chunk, inv_c, causal, linear):
    n, length, s = qq.shape
    e = v.shape[-1]
    cfg = _config(qq, chunk, s, e)
    del cfg["BE_QK"]
    states = _states(kl, v, chunk, causal, False, cfg) if linear else qq
    tiles, gt = _geometry(length, chunk, cfg["BM"])
    out = scratch((n, length, e), v.dtype, v.device)
    _fwd_kernel[(triton.cdiv(e, cfg["BE"]) * gt * n,)](
        qq, kq, ql if linear else qq, v, states, out, length, chunk, tiles, gt, states.shape[1], s, e,
        1.0 / math.sqrt(s), inv_c, CAUSAL=causal, LINEAR=linear, **cfg)
    return out


def _backward(grad, qq, kq, ql, kl, v, chunk, inv_c, causal, linear):
    n, length, s = qq.shape
    e = v.shape[-1]
    cfg = _config(qq, chunk, s, e)
    grad = grad.contiguous().to(v.dtype)
    if linear:
        states = _states(kl, v, chunk, causal, False, cfg)  # recomputed, not stored by the forward
        dstates = _states(ql, grad, chunk, causal, True, cfg)
    else:
        states = dstates = qq
    tiles, gt = _geometry(length, chunk, cfg["BM"])
    args = (length, chunk, tiles, gt, states.shape[1], s, e, 1.0 / math.sqrt(s), inv_c)
    be_qk = cfg.pop("BE_QK")
    flags = dict(CAUSAL=causal, LINEAR=linear, **cfg)
    flags_qk = {**flags, "BE": be_qk}  # dq/dk sum dO V^T over E in narrower tiles (no spills)
    dqq, dkq, dv = (scratch(x.shape, x.dtype, x.device) for x in (qq, kq, v))
    dql, dkl = (scratch(x.shape, x.dtype, x.device) for x in (ql, kl)) if linear else (dqq, dkq)
    _bwd_dq_kernel[(gt * n,)](qq, kq, v, grad, states, dqq, dql, *args, **flags_qk)
    _bwd_dk_kernel[(gt * n,)](qq, kq, v, grad, dstates, dkq, dkl, *args, **flags_qk)
    _bwd_dv_kernel[(triton.cdiv(e, cfg["BE"]) * gt * n,)](qq, kq, kl if linear else kq, grad, dstates, dv, *args,
                                                          **flags)
    return dqq, dkq, (dql if linear else None), (dkl if linear else None), dv


class _MixedChunkAttention(torch.autograd.Function):
    """Inputs ``[N, L, S]`` x4 and ``[N, L, E]``, one dtype, contiguous."""

    @staticmethod
    def forward(ctx, qq, kq, ql, kl, v, chunk: int, causal: bool):
        ctx.save_for_backward(qq, kq, ql, kl, v)
        ctx.chunk, ctx.causal = chunk, causal
        return _forward(qq, kq, ql, kl, v, chunk, 1.0 / chunk, causal, linear=True)

    @staticmethod
    def backward(ctx, grad):
        qq, kq, ql, kl, v = ctx.saved_tensors
        grads = _backward(grad, qq, kq, ql, kl, v, ctx.chunk, 1.0 / ctx.chunk, ctx.causal, linear=True)
        return (*grads, None, None)


class _Relu2Attention(torch.autograd.Function):
    """Inputs ``[N, L, S]`` x2 and ``[N, L, E]``, one dtype, contiguous; one chunk of L tokens."""

    @staticmethod
    def forward(ctx, q, k, v, norm: float, causal: bool):
        ctx.save_for_backward(q, k, v)
        ctx.norm, ctx.causal = norm, causal
        return _forward(q, k, q, k, v, max(q.shape[1], 1), 1.0 / norm, causal, linear=False)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        dq, dk, _, _, dv = _backward(grad, q, k, q, k, v, max(q.shape[1], 1), 1.0 / ctx.norm, ctx.causal,
                                     linear=False)
        return dq, dk, dv, None, None


def _flatten(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Cast to the kernels' dtype (`kernel_dtype`: the autocast dtype under autocast, so that the dots run on tensor
    cores, else the promoted dtype) and flatten the leading dims: ``[..., L, D] -> [N, L, D]`` contiguous. The ops
    return the inputs' promoted dtype, as the references do."""
    dtype = kernel_dtype(*tensors)
    return tuple(x.to(dtype).reshape(-1, *x.shape[-2:]).contiguous() for x in tensors)


def mixed_chunk_attention_triton(q_quad: Tensor, k_quad: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor,
                                 chunk_size: int, causal: bool) -> Tensor:
    """``mixed_chunk_attention`` on Triton kernels; inputs already checked by it. Shapes as there."""
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    if v.numel() == 0 or q_quad.numel() == 0:  # nothing to launch: the reference handles empty shapes
        return in_compute_dtype(mixed_chunk_attention, tensors, int(chunk_size), causal)
    flat = _flatten(tensors)
    out = _MixedChunkAttention.apply(*flat, int(chunk_size), bool(causal))
    return out.reshape(v.shape).to(promoted_dtypes(*tensors)[0])


def relu2_attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, norm: float) -> Tensor:
    """``relu2_attention`` on Triton kernels; inputs already checked by it. Shapes as there."""
    if v.numel() == 0 or q.numel() == 0:
        return in_compute_dtype(relu2_attention, (q, k, v), causal, float(norm))
    flat = _flatten((q, k, v))
    out = _Relu2Attention.apply(*flat, float(norm), bool(causal))
    return out.reshape(v.shape).to(promoted_dtypes(q, k, v)[0])
