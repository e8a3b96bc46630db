"""Triton kernels (forward and backward) for FLASH's attention cores: the same functions as the references
``mixed_chunk_attention`` and ``relu2_attention`` of ``reference.py`` (the package docstring defines the
scaling); only imported by those ops when they run with ``attn_impl="triton"``.

Inputs are flattened to ``[N, L, D]`` (N = batch x heads) and made contiguous; C is the chunk, G = ceil(L / C)
chunks, chunk g holds the tokens ``g*C .. min(g*C + C, L) - 1`` (the last chunk is never padded in memory: loads
past L are masked to 0). Nothing [C, C] or [L, L] is stored: the weights are recomputed in the backward.

Kernels (one program per tile, fp32 accumulation, float64 in float64; block sizes are constexpr):

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
part. bf16/fp16 inputs feed ``tl.dot`` directly (weights cast to the input dtype before ``A @ V``, as in
flash attention); fp32 inputs use TF32 only when ``torch.get_float32_matmul_precision()`` allows it, as the
reference's matmuls do. Under ``TRITON_INTERPRET=1`` (the CPU tests) bf16 is not supported by Triton's
interpreter; fp16, fp32 and fp64 are.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hier_lm.ops.chunk_attention.reference import mixed_chunk_attention, relu2_attention  # for empty inputs
from hier_lm.ops.common import in_compute_dtype, promoted_dtypes, scratch

__all__ = ["mixed_chunk_attention_triton", "relu2_attention_triton"]


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_state_kernel(X, Y, H, L, C, NG, S, E,
                        ACC: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """``H[n, g] = X_g^T Y_g`` over chunk g's tokens (X: [N, L, S], Y: [N, L, E], H: [N, NG, S, E]), every chunk
    in parallel; grid (S tiles * E tiles, NG, N)."""
    pid_se, g, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    tiles_e = tl.cdiv(E, BE)
    offs_s = (pid_se // tiles_e) * BS + tl.arange(0, BS)
    offs_e = (pid_se % tiles_e) * BE + tl.arange(0, BE)
    mask_s, mask_e = offs_s < S, offs_e < E
    X += pid_n * L * S
    Y += pid_n * L * E
    lo = g * C
    hi = tl.minimum(lo + C, L)
    state = tl.zeros((BS, BE), dtype=ACC)
    for t0 in range(lo, hi, BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < hi
        xt = tl.load(X + offs_t[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_t[None, :], other=0.0)
        y = tl.load(Y + offs_t[:, None] * E + offs_e[None, :], mask=mask_t[:, None] & mask_e[None, :], other=0.0)
        state += tl.dot(xt, y, input_precision=PREC, out_dtype=ACC)
    H += (pid_n * NG + g) * S * E
    tl.store(H + offs_s[:, None] * E + offs_e[None, :], state, mask=mask_s[:, None] & mask_e[None, :])


@triton.jit
def _state_scan_kernel(H, NG, C, S, E, inv_len,
                       CAUSAL: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                       BS: tl.constexpr, BE: tl.constexpr):
    """In place over the chunk states ``H: [N, NG, S, E]`` (``X_g^T Y_g``); grid (S tiles, E tiles, N).

    CAUSAL forward: ``H[g] <- sum_{h<g} H[h] / (g*C)`` (0 for g = 0); REVERSE: ``H[h] <- sum_{g>h} H[g] / (g*C)``;
    otherwise ``H[0] <- sum_g H[g] * inv_len`` (the other entries are left as they are and never read).
    """
    pid_s, pid_e, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BS + tl.arange(0, BS)
    offs_e = pid_e * BE + tl.arange(0, BE)
    mask = (offs_s < S)[:, None] & (offs_e < E)[None, :]
    H += pid_n * NG * S * E + offs_s[:, None] * E + offs_e[None, :]
    running = tl.zeros((BS, BE), dtype=ACC)
    if CAUSAL:
        for i in range(0, NG):
            if REVERSE:
                g = NG - 1 - i
            else:
                g = i
            chunk = tl.load(H + g * S * E, mask=mask, other=0.0)
            tokens_before = tl.maximum(g * C, 1).to(ACC)
            if REVERSE:
                tl.store(H + g * S * E, running, mask=mask)
                running += chunk / tokens_before  # chunk 0 (divided by 1) comes last and is never stored
            else:
                tl.store(H + g * S * E, running / tokens_before, mask=mask)
                running += chunk
    else:
        for g in range(0, NG):
            running += tl.load(H + g * S * E, mask=mask, other=0.0)
        tl.store(H, running * inv_len, mask=mask)


@triton.jit
def _fwd_kernel(QQ, KQ, QL, V, H, O, L, C, TILES, NG, S, E, scale, inv_c,
                CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """O[tile of BM queries, tile of BE values]; grid (G * TILES query tiles, E tiles, N)."""
    pid_t, pid_e, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = pid_t // TILES
    start = g * C
    end = tl.minimum(start + C, L)
    offs_m = start + (pid_t % TILES) * BM + tl.arange(0, BM)
    offs_s = tl.arange(0, BS)
    offs_e = pid_e * BE + tl.arange(0, BE)
    mask_m, mask_s, mask_e = offs_m < end, offs_s < S, offs_e < E
    QQ += pid_n * L * S
    KQ += pid_n * L * S
    V += pid_n * L * E
    q_mask = mask_m[:, None] & mask_s[None, :]
    q = tl.load(QQ + offs_m[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
    acc = tl.zeros((BM, BE), dtype=ACC)
    if CAUSAL:
        hi = tl.minimum(start + (pid_t % TILES) * BM + BM, end)
    else:
        hi = end
    for n0 in range(start, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < hi
        kt = tl.load(KQ + offs_n[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_n[None, :], other=0.0)
        scores = tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale
        weights = tl.maximum(scores, 0.0)
        weights = weights * weights * inv_c
        if CAUSAL:
            weights = tl.where(offs_m[:, None] >= offs_n[None, :], weights, 0.0)
        v = tl.load(V + offs_n[:, None] * E + offs_e[None, :], mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        acc += tl.dot(weights.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    if LINEAR:
        QL += pid_n * L * S
        if CAUSAL:
            H += (pid_n * NG + g) * S * E
        else:
            H += pid_n * NG * S * E
        ql = tl.load(QL + offs_m[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
        state = tl.load(H + offs_s[:, None] * E + offs_e[None, :], mask=mask_s[:, None] & mask_e[None, :], other=0.0)
        acc += tl.dot(ql, state.to(ql.dtype), input_precision=PREC, out_dtype=ACC)
    O += pid_n * L * E
    tl.store(O + offs_m[:, None] * E + offs_e[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_e[None, :])


@triton.jit
def _bwd_dq_kernel(QQ, KQ, V, DO, H, DQQ, DQL, L, C, TILES, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dQq and dQl of a tile of BM queries (all S columns); grid (G * TILES query tiles, N)."""
    pid_t, pid_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = pid_t // TILES
    start = g * C
    end = tl.minimum(start + C, L)
    offs_m = start + (pid_t % TILES) * BM + tl.arange(0, BM)
    offs_s = tl.arange(0, BS)
    mask_m, mask_s = offs_m < end, offs_s < S
    QQ += pid_n * L * S
    KQ += pid_n * L * S
    V += pid_n * L * E
    DO += pid_n * L * E
    q_mask = mask_m[:, None] & mask_s[None, :]
    q = tl.load(QQ + offs_m[:, None] * S + offs_s[None, :], mask=q_mask, other=0.0)
    dq = tl.zeros((BM, BS), dtype=ACC)
    if CAUSAL:
        hi = tl.minimum(start + (pid_t % TILES) * BM + BM, end)
    else:
        hi = end
    for n0 in range(start, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < hi
        kt = tl.load(KQ + offs_n[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_n[None, :], other=0.0)
        relu = tl.maximum(tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)
        if CAUSAL:
            relu = tl.where(offs_m[:, None] >= offs_n[None, :], relu, 0.0)
        dweights = tl.zeros((BM, BN), dtype=ACC)  # dO V^T, summed over the value tiles
        for e0 in range(0, E, BE):
            offs_e = e0 + tl.arange(0, BE)
            mask_e = offs_e < E
            do = tl.load(DO + offs_m[:, None] * E + offs_e[None, :], mask=mask_m[:, None] & mask_e[None, :],
                         other=0.0)
            vt = tl.load(V + offs_n[None, :] * E + offs_e[:, None], mask=mask_e[:, None] & mask_n[None, :],
                         other=0.0)
            dweights += tl.dot(do, vt, input_precision=PREC, out_dtype=ACC)
        dscores = dweights * relu * (2.0 * inv_c * scale)
        dq += tl.dot(dscores.to(kt.dtype), tl.trans(kt), input_precision=PREC, out_dtype=ACC)
    DQQ += pid_n * L * S
    tl.store(DQQ + offs_m[:, None] * S + offs_s[None, :], dq.to(DQQ.dtype.element_ty), mask=q_mask)
    if LINEAR:
        if CAUSAL:
            H += (pid_n * NG + g) * S * E
        else:
            H += pid_n * NG * S * E
        dql = tl.zeros((BM, BS), dtype=ACC)
        for e0 in range(0, E, BE):
            offs_e = e0 + tl.arange(0, BE)
            mask_e = offs_e < E
            do = tl.load(DO + offs_m[:, None] * E + offs_e[None, :], mask=mask_m[:, None] & mask_e[None, :],
                         other=0.0)
            state_t = tl.load(H + offs_s[None, :] * E + offs_e[:, None], mask=mask_e[:, None] & mask_s[None, :],
                              other=0.0)
            dql += tl.dot(do, state_t.to(do.dtype), input_precision=PREC, out_dtype=ACC)
        DQL += pid_n * L * S
        tl.store(DQL + offs_m[:, None] * S + offs_s[None, :], dql.to(DQL.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dk_kernel(QQ, KQ, V, DO, D, DKQ, DKL, L, C, TILES, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dKq and dKl of a tile of BN keys (all S columns); grid (G * TILES key tiles, N)."""
    pid_t, pid_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = pid_t // TILES
    start = g * C
    end = tl.minimum(start + C, L)
    first = start + (pid_t % TILES) * BN
    offs_n = first + tl.arange(0, BN)
    offs_s = tl.arange(0, BS)
    mask_n, mask_s = offs_n < end, offs_s < S
    QQ += pid_n * L * S
    KQ += pid_n * L * S
    V += pid_n * L * E
    DO += pid_n * L * E
    k_mask = mask_n[:, None] & mask_s[None, :]
    k = tl.load(KQ + offs_n[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
    dk = tl.zeros((BN, BS), dtype=ACC)
    if CAUSAL:
        lo = first  # queries before the tile's first key do not see it
    else:
        lo = start
    for m0 in range(lo, end, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < end
        qt = tl.load(QQ + offs_m[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_m[None, :], other=0.0)
        relu_t = tl.maximum(tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)  # [BN, BM]
        if CAUSAL:
            relu_t = tl.where(offs_m[None, :] >= offs_n[:, None], relu_t, 0.0)
        dweights_t = tl.zeros((BN, BM), dtype=ACC)  # V dO^T
        for e0 in range(0, E, BE):
            offs_e = e0 + tl.arange(0, BE)
            mask_e = offs_e < E
            v = tl.load(V + offs_n[:, None] * E + offs_e[None, :], mask=mask_n[:, None] & mask_e[None, :], other=0.0)
            dot_ = tl.load(DO + offs_m[None, :] * E + offs_e[:, None], mask=mask_e[:, None] & mask_m[None, :],
                           other=0.0)
            dweights_t += tl.dot(v, dot_, input_precision=PREC, out_dtype=ACC)
        dscores_t = dweights_t * relu_t * (2.0 * inv_c * scale)
        dk += tl.dot(dscores_t.to(qt.dtype), tl.trans(qt), input_precision=PREC, out_dtype=ACC)
    DKQ += pid_n * L * S
    tl.store(DKQ + offs_n[:, None] * S + offs_s[None, :], dk.to(DKQ.dtype.element_ty), mask=k_mask)
    if LINEAR:
        if CAUSAL:
            D += (pid_n * NG + g) * S * E
        else:
            D += pid_n * NG * S * E
        dkl = tl.zeros((BN, BS), dtype=ACC)
        for e0 in range(0, E, BE):
            offs_e = e0 + tl.arange(0, BE)
            mask_e = offs_e < E
            v = tl.load(V + offs_n[:, None] * E + offs_e[None, :], mask=mask_n[:, None] & mask_e[None, :], other=0.0)
            dstate_t = tl.load(D + offs_s[None, :] * E + offs_e[:, None], mask=mask_e[:, None] & mask_s[None, :],
                               other=0.0)
            dkl += tl.dot(v, dstate_t.to(v.dtype), input_precision=PREC, out_dtype=ACC)
        DKL += pid_n * L * S
        tl.store(DKL + offs_n[:, None] * S + offs_s[None, :], dkl.to(DKL.dtype.element_ty), mask=k_mask)


@triton.jit
def _bwd_dv_kernel(QQ, KQ, KL, DO, D, DV, L, C, TILES, NG, S, E, scale, inv_c,
                   CAUSAL: tl.constexpr, LINEAR: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr):
    """dV of a tile of BN keys and BE value columns; grid (G * TILES key tiles, E tiles, N)."""
    pid_t, pid_e, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = pid_t // TILES
    start = g * C
    end = tl.minimum(start + C, L)
    first = start + (pid_t % TILES) * BN
    offs_n = first + tl.arange(0, BN)
    offs_s = tl.arange(0, BS)
    offs_e = pid_e * BE + tl.arange(0, BE)
    mask_n, mask_s, mask_e = offs_n < end, offs_s < S, offs_e < E
    QQ += pid_n * L * S
    KQ += pid_n * L * S
    DO += pid_n * L * E
    k_mask = mask_n[:, None] & mask_s[None, :]
    k = tl.load(KQ + offs_n[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
    dv = tl.zeros((BN, BE), dtype=ACC)
    if CAUSAL:
        lo = first
    else:
        lo = start
    for m0 in range(lo, end, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < end
        qt = tl.load(QQ + offs_m[None, :] * S + offs_s[:, None], mask=mask_s[:, None] & mask_m[None, :], other=0.0)
        weights_t = tl.maximum(tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * scale, 0.0)  # [BN, BM]
        weights_t = weights_t * weights_t * inv_c
        if CAUSAL:
            weights_t = tl.where(offs_m[None, :] >= offs_n[:, None], weights_t, 0.0)
        do = tl.load(DO + offs_m[:, None] * E + offs_e[None, :], mask=mask_m[:, None] & mask_e[None, :], other=0.0)
        dv += tl.dot(weights_t.to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
    if LINEAR:
        KL += pid_n * L * S
        if CAUSAL:
            D += (pid_n * NG + g) * S * E
        else:
            D += pid_n * NG * S * E
        kl = tl.load(KL + offs_n[:, None] * S + offs_s[None, :], mask=k_mask, other=0.0)
        dstate = tl.load(D + offs_s[:, None] * E + offs_e[None, :], mask=mask_s[:, None] & mask_e[None, :],
                         other=0.0)
        dv += tl.dot(kl, dstate.to(kl.dtype), input_precision=PREC, out_dtype=ACC)
    DV += pid_n * L * E
    tl.store(DV + offs_n[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & mask_e[None, :])


# ----------------------------------------------------------------------------------------- host side


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def _config(x: Tensor, chunk: int, s: int, e: int) -> dict:
    """Block sizes (constexpr), the accumulator dtype, the fp32 dot precision and the launch options for one
    call: fixed choices, no autotuning (nothing is benchmarked at import or on the first call).

    Tensor-core dots (bf16, fp16, fp32 as TF32): 64-row query/key tiles (never wider than the power-of-2-rounded
    chunk), E in tiles of 64 (32 where dq/dk sum dO V^T over E). Exact fp32 ("ieee") and fp64 dots run on FMA
    units and hold their operands in registers: 16-row tiles, E in tiles of 32. S is one tile (128 in the
    paper); at S = 32 and 128 every variant (bf16, fp16, fp32 TF32 and exact, fp64; causal or not; with or
    without the linear part) compiles for sm_90 without register spills (triton.compile for a GPUTarget, then
    cuobjdump -res-usage; not run on a GPU here).
    """
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32:  # TF32 only where the reference's fp32 matmuls may use it too
        prec = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        prec = "ieee" if x.dtype == torch.float64 else None  # half inputs: Triton's default
    bs = _pow2(s, 16, 1 << 20)
    if prec == "ieee":
        tile, be, be_qk, warps = 16, _pow2(e, 16, 32), _pow2(e, 16, 32), 4
    else:
        tile, be, be_qk, warps = _pow2(chunk, 16, 64), _pow2(e, 16, 64), _pow2(e, 16, 32), 8
    return dict(ACC=acc, PREC=prec, BM=tile, BN=tile, BS=bs, BE=be, BE_QK=be_qk, num_warps=warps, num_stages=2)


def _states(x: Tensor, y: Tensor, chunk: int, causal: bool, reverse: bool, cfg: dict) -> Tensor:
    """The linear part's states from x: [N, L, S], y: [N, L, E] -> [N, G, S, E] (fp32; fp64 for fp64): every
    chunk's ``x_g^T y_g`` in parallel, then the scan over chunks (bidirectional: the mean in entry 0)."""
    n, length, s = x.shape
    e = y.shape[-1]
    groups = -(-length // chunk)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = scratch((n, groups, s, e), dtype, x.device)
    bs, be = _pow2(s, 16, 64), _pow2(e, 16, 64)
    _chunk_state_kernel[(triton.cdiv(s, bs) * triton.cdiv(e, be), groups, n)](
        x, y, out, length, chunk, groups, s, e, ACC=cfg["ACC"], PREC=cfg["PREC"], BT=_pow2(chunk, 16, 64), BS=bs,
        BE=be, num_stages=2)
    bs, be = _pow2(s, 16, 32), _pow2(e, 16, 32)  # a light sequential walk over G: small tiles, more programs
    _state_scan_kernel[(triton.cdiv(s, bs), triton.cdiv(e, be), n)](
        out, groups, chunk, s, e, 1.0 / max(length, 1), CAUSAL=causal, REVERSE=reverse, ACC=cfg["ACC"], BS=bs, BE=be)
    return out


def _geometry(length: int, chunk: int, tile: int) -> tuple[int, int]:
    """(chunks G, tiles per chunk): program i handles tile ``i % tiles`` of chunk ``i // tiles``."""
    return -(-length // chunk), triton.cdiv(min(chunk, length), tile)


def _forward(qq, kq, ql, kl, v, chunk, inv_c, causal, linear):
    n, length, s = qq.shape
    e = v.shape[-1]
    cfg = _config(qq, chunk, s, e)
    del cfg["BE_QK"]
    states = _states(kl, v, chunk, causal, False, cfg) if linear else qq
    groups, tiles = _geometry(length, chunk, cfg["BM"])
    out = scratch((n, length, e), v.dtype, v.device)
    grid = (groups * tiles, triton.cdiv(e, cfg["BE"]), n)
    _fwd_kernel[grid](qq, kq, ql if linear else qq, v, states, out, length, chunk, tiles, states.shape[1], s, e,
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
    groups, tiles = _geometry(length, chunk, cfg["BM"])
    args = (length, chunk, tiles, states.shape[1], s, e, 1.0 / math.sqrt(s), inv_c)
    be_qk = cfg.pop("BE_QK")
    flags = dict(CAUSAL=causal, LINEAR=linear, **cfg)
    flags_qk = {**flags, "BE": be_qk}  # dq/dk sum dO V^T over E in narrower tiles (no spills)
    dqq, dkq, dv = (scratch(x.shape, x.dtype, x.device) for x in (qq, kq, v))
    dql, dkl = (scratch(x.shape, x.dtype, x.device) for x in (ql, kl)) if linear else (dqq, dkq)
    _bwd_dq_kernel[(groups * tiles, n)](qq, kq, v, grad, states, dqq, dql, *args, **flags_qk)
    _bwd_dk_kernel[(groups * tiles, n)](qq, kq, v, grad, dstates, dkq, dkl, *args, **flags_qk)
    _bwd_dv_kernel[(groups * tiles, triton.cdiv(e, cfg["BE"]), n)](qq, kq, kl if linear else kq, grad, dstates, dv,
                                                                   *args, **flags)
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
    """Promote to one dtype and flatten the leading dims: ``[..., L, D] -> [N, L, D]`` contiguous."""
    dtype, _ = promoted_dtypes(*tensors)
    return tuple(x.to(dtype).reshape(-1, *x.shape[-2:]).contiguous() for x in tensors)


def mixed_chunk_attention_triton(q_quad: Tensor, k_quad: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor,
                                 chunk_size: int, causal: bool) -> Tensor:
    """``mixed_chunk_attention`` on Triton kernels; inputs already checked by it. Shapes as there."""
    tensors = (q_quad, k_quad, q_lin, k_lin, v)
    if v.numel() == 0 or q_quad.numel() == 0:  # nothing to launch: the reference handles empty shapes
        return in_compute_dtype(mixed_chunk_attention, tensors, int(chunk_size), causal)
    flat = _flatten(tensors)
    out = _MixedChunkAttention.apply(*flat, int(chunk_size), bool(causal))
    return out.reshape(v.shape)


def relu2_attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, norm: float) -> Tensor:
    """``relu2_attention`` on Triton kernels; inputs already checked by it. Shapes as there."""
    if v.numel() == 0 or q.numel() == 0:
        return in_compute_dtype(relu2_attention, (q, k, v), causal, float(norm))
    flat = _flatten((q, k, v))
    out = _Relu2Attention.apply(*flat, float(norm), bool(causal))
    return out.reshape(v.shape)
