"""`h_attention`'s PyTorch path when nothing needs autograd's graph of it (no dropout): the reference's forward run
without recording a graph, and a hand-derived backward that recomputes the pyramid and each level's probabilities
from the output's log-sum-exp (flash-attention style). Between forward and backward a call keeps only its output
and log-sum-exp, so its memory is that of a few [B, H, L, D] tensors, and its backward makes a few passes per level
where autograd's replays every op of the forward. Each level runs in steps of up to `CHUNK_ROWS` query rows (all
its window parts, the softmax in place, the merge with the coarser levels in place), into score buffers reused from
step to step, instead of fresh [.., Nr, K] tensors the size of the whole level. The function is the reference's
(`reference.merged_levels`, in the "mean" form of the coarsening, the same function as "sum"); the tests check
this backward against autograd's gradient of the reference and against finite differences.

Backward, for the output gradient dO (the derivation the Triton kernels share):
* per fine row i: delta_i = dO_i . o_i and lse_i; per coarse row a of level l, over the real fine rows i of its
  group: lse_a = min lse_i, dO_a = sum_i exp(lse_a - lse_i) dO_i, delta_a likewise (built pairwise, level by
  level). A coarse logit s_ac is shared by the rows of group a, so its gradient is p_ac (dO_a . v_c - delta_a)
  with p_ac = exp(s_ac - lse_a) <= 1: each level's backward is softmax attention's, at its own resolution;
* the pyramid's backward, coarsest level first: a coarse key or value (a group mean) hands each real token of
  its group 1/count of its gradient; a causal coarse query (its group's first token) hands that token all of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hier_lm.ops.h_attention.reference import (
    Level,
    Partial,
    block_pattern,
    coarsening_pyramid,
    hierarchy_size,
    neighbour_offsets,
    normalised_output,
    padded_inputs,
    pairwise_sum,
    relative_position_bias,
    relative_position_index,
)

__all__ = ["h_attention"]

INF = float("inf")
CHUNK_ROWS = 32768  # query rows per step: a few MB of scores ([P, rows, Nr] floats), reused from step to step


def h_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, causal: bool, rpb: Tensor | None,
                lengths: Tensor | None) -> Tensor:
    """`reference.h_attention` without dropout (the same arguments but `value_coarsening`, which does not change
    the function), with the recomputing backward. Returns [B, H, L, E]."""
    return _Recompute.apply(q, k, v, rpb, lengths, block_size, causal)


class _Blocks(NamedTuple):
    """One level as one run of blocks: those of every (batch, head) in a row (G = B * H heads of N blocks,
    R = G * N). Window part i pairs query block r with key block r + offsets[i] of the same run (P parts); a key
    block of another head, or past either end, is masked by `key_bias`."""

    query: Tensor  # [R, Nr, D], unscaled
    key: Tensor  # [R, Nr, D]
    value: Tensor  # [R, Nr, E]
    key_bias: Tensor  # [P, R, Nr]: logit bias of part i's keys seen from block r: log(real tokens), or -inf
    static: Tensor  # [T, P, Nr, Nr]: the block pattern (0 or -inf) plus the h-RPB (T: the table's rows, or 1)
    offsets: tuple[int, ...]
    per_head: int  # N


def _blocks(coarse: Level, level: int, causal: bool, block_size: int, table: Tensor | None) -> _Blocks:
    """The run of blocks of one pyramid level (mean form: its logits get the bias log(real tokens per key))."""
    batch, heads, n, _ = coarse.key.shape
    nr, per_head = block_size, n // block_size
    offsets = neighbour_offsets(level, causal)
    query, key, value = (x.reshape(-1, nr, x.shape[-1]) for x in (coarse.query, coarse.key, coarse.value))
    bias = coarse.key_bias.masked_fill(~coarse.key_valid, -INF).expand(batch, heads, n).reshape(-1, per_head, nr)
    key_bias = bias.new_full((len(offsets), *bias.shape), -INF)
    for i, o in enumerate(offsets):  # block b of a head sees block b + o of the same head, if there is one
        key_bias[i, :, max(0, -o):per_head - max(0, o)] = bias[:, max(0, o):per_head - max(0, -o)]
    pattern = block_pattern(offsets, level, causal, nr, query.device).view(nr, len(offsets), nr).transpose(0, 1)
    static = torch.zeros(pattern.shape, dtype=query.dtype, device=query.device).masked_fill_(~pattern, -INF)
    if table is None:
        static = static[None]
    else:
        static = static + relative_position_bias(table, offsets, nr).view(-1, nr, len(offsets), nr).transpose(1, 2)
    return _Blocks(query, key, value, key_bias.view(len(offsets), -1, nr), static, offsets, per_head)


def _neighbours(offset: int, lo: int, hi: int, runs: int) -> tuple[int, int]:
    """[a, b): the query blocks of [lo, hi) whose key block r + offset lies in the run [0, runs)."""
    return max(lo, -offset), min(hi, runs - offset)


def _table_rows(blocks: _Blocks, lo: int, hi: int) -> int | Tensor:
    """The h-RPB table row of the blocks [lo, hi): one int when they share it, else a [hi - lo] long tensor."""
    rows = blocks.static.shape[0]
    if rows == 1:
        return 0
    first = lo // blocks.per_head
    if (hi - 1) // blocks.per_head == first:
        return first % rows
    return torch.arange(lo, hi, device=blocks.query.device) // blocks.per_head % rows


def _scores(blocks: _Blocks, lo: int, hi: int, out: Tensor) -> Tensor:
    """out [P, hi - lo, Nr, Nr] <- the masked scores of the query blocks [lo, hi) (-inf where not allowed)."""
    runs = blocks.query.shape[0]
    for i, o in enumerate(blocks.offsets):
        a, b = _neighbours(o, lo, hi, runs)
        torch.bmm(blocks.query[a:b], blocks.key[a + o:b + o].transpose(1, 2), out=out[i, a - lo:b - lo])
        out[i, :a - lo].zero_()  # no such key block: masked by its key bias
        out[i, b - lo:].zero_()
    rows = _table_rows(blocks, lo, hi)
    static = blocks.static[rows][:, None] if isinstance(rows, int) else blocks.static[rows].transpose(0, 1)
    return out.mul_(blocks.query.shape[-1] ** -0.5).add_(blocks.key_bias[:, lo:hi, None, :]).add_(static)


def _window_matmul(blocks: _Blocks, lo: int, hi: int, weights: Tensor, right: Tensor, out: Tensor) -> None:
    """out[r] = sum_i weights[i, r - lo] @ right[r + offsets[i]] for the query blocks r in [lo, hi) (0 for a
    missing key block); weights [P, hi - lo, Nr, Nr], right [R, Nr, F], out [R, Nr, F] (rows lo..hi written)."""
    runs = blocks.query.shape[0]
    for i, o in enumerate(blocks.offsets):
        a, b = _neighbours(o, lo, hi, runs)
        part = weights[i, a - lo:b - lo]
        if i:
            out[a:b].baddbmm_(part, right[a + o:b + o])
        else:
            torch.bmm(part, right[a + o:b + o], out=out[a:b])
            out[lo:a].zero_()
            out[b:hi].zero_()


def _transposed_window_matmul(blocks: _Blocks, lo: int, hi: int, weights: Tensor, left: Tensor, out: Tensor) -> None:
    """out[r + offsets[i]] += weights[i, r - lo]^T @ left[r] for the query blocks r in [lo, hi): the gradient
    of the key blocks; weights [P, hi - lo, Nr, Nr], left [R, Nr, F], out [R, Nr, F]."""
    runs = blocks.query.shape[0]
    for i, o in enumerate(blocks.offsets):
        a, b = _neighbours(o, lo, hi, runs)
        out[a + o:b + o].baddbmm_(weights[i, a - lo:b - lo].transpose(1, 2), left[a:b])


def _finite(x: Tensor) -> Tensor:
    """x with -inf (a row without any allowed key) replaced by 0, so that exp(-inf - 0) = 0."""
    return torch.where(torch.isfinite(x), x, 0.0)


def _merge_coarser(numerator: Tensor, denominator: Tensor, row_max: Tensor, coarser: tuple[Tensor, ...]) -> None:
    """`reference.lse_merge` of a level's rows with the prolonged coarser levels' merged rows, in place:
    numerator [n, 2, E], denominator and row_max [n, 2] (pairs of sibling rows); coarser: their parent's
    (numerator [n, E], denominator [n], row_max [n])."""
    c_numerator, c_denominator, c_max = coarser
    both = torch.maximum(row_max, c_max[:, None])
    offset = _finite(both)
    mine, theirs = (row_max - offset).exp_(), (c_max[:, None] - offset).exp_()  # 0 for an empty side
    numerator.mul_(mine[..., None]).addcmul_(c_numerator[:, None, :], theirs[..., None])
    denominator.mul_(mine).addcmul_(c_denominator[:, None], theirs)
    row_max.copy_(both)


def _steps(runs: int, block_size: int):
    """(lo, hi) block ranges of about CHUNK_ROWS query rows covering [0, runs)."""
    step = max(1, CHUNK_ROWS // block_size)
    return [(lo, min(runs, lo + step)) for lo in range(0, runs, step)]


def _row_terms(out: Tensor, grad: Tensor, lse: Tensor, padded: int, levels: int) -> list[tuple[Tensor, ...]]:
    """Per level l: (lse_a [B, H, n], dO_a [B, H, n, E], delta_a [B, H, n]); lse_a = +inf for a group without
    a row of any weight (its probabilities are then 0)."""
    pad = padded - out.shape[-2]
    key = F.pad(torch.where(torch.isfinite(lse), lse, INF), (0, pad), value=INF)
    delta = F.pad((grad * out).sum(-1), (0, pad))
    grad = F.pad(grad, (0, 0, 0, pad)) if pad else grad
    terms = [(key, grad, delta)]
    for _ in range(1, levels):
        pair = key.unflatten(-1, (-1, 2))
        key = pair.amin(-1)
        weight = torch.exp(torch.where(torch.isfinite(key), key, 0.0)[..., None] - pair)  # [B, H, n, 2], <= 1
        grad = (grad.unflatten(-2, (-1, 2)) * weight[..., None]).sum(-2)
        delta = (delta.unflatten(-1, (-1, 2)) * weight).sum(-1)
        terms.append((key, grad, delta))
    return terms


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, lengths, block_size: int, causal: bool):
        length = q.shape[-2]
        levels, padded = hierarchy_size(length, block_size)
        qp, kp, vp, real = padded_inputs(q, k, v, padded, lengths, scale=False)
        pyramid = coarsening_pyramid(qp, kp, vp, real, levels, causal, "mean")
        table = None if rpb is None else rpb.to(q.dtype)
        nr, width = block_size, v.shape[-1]
        merged = None  # (numerator [R * Nr, E], denominator, row_max [R * Nr]) of the levels so far, coarsest first
        for level in reversed(range(levels)):
            blocks = _blocks(pyramid[level], level, causal, nr, table)
            runs = blocks.query.shape[0]
            numerator = q.new_empty(runs, nr, width)
            denominator, row_max = q.new_empty(runs, nr), q.new_empty(runs, nr)
            buffer = q.new_empty(len(blocks.offsets), min(runs, max(1, CHUNK_ROWS // nr)), nr, nr)
            for lo, hi in _steps(runs, nr):
                scores = _scores(blocks, lo, hi, buffer[:, :hi - lo])
                torch.amax(scores.amax(-1), 0, out=row_max[lo:hi])
                p = scores.sub_(_finite(row_max[lo:hi])[..., None]).exp_()
                _window_matmul(blocks, lo, hi, p, blocks.value, numerator)
                torch.sum(p, (0, 3), out=denominator[lo:hi])
                if merged is not None:  # rows [lo, hi) of this level are children of rows [lo, hi) / 2 above
                    parents = slice(lo * nr // 2, hi * nr // 2)
                    _merge_coarser(numerator[lo:hi].view(-1, 2, width), denominator[lo:hi].view(-1, 2),
                                   row_max[lo:hi].view(-1, 2), tuple(x[parents] for x in merged))
            merged = numerator.view(-1, width), denominator.view(-1), row_max.view(-1)
        shape = q.shape[:2] + (padded,)
        merged = Partial(merged[0].view(*shape, width), merged[1].view(shape), merged[2].view(shape))
        out = normalised_output(merged, real, length)
        denominator = merged.denominator[..., :length]
        rows = denominator > 0 if real.dim() == 1 else (denominator > 0) & real[..., :length]  # padding: no weight
        lse = torch.where(rows, merged.row_max[..., :length] + denominator.log(), -INF)
        ctx.save_for_backward(q, k, v, rpb, lengths, out, lse)
        ctx.args = block_size, causal
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, rpb, lengths, out, lse = ctx.saved_tensors
        block_size, causal = ctx.args
        length, dim = q.shape[-2:]
        levels, padded = hierarchy_size(length, block_size)
        qp, kp, vp, real = padded_inputs(q, k, v, padded, lengths, scale=False)
        pyramid = coarsening_pyramid(qp, kp, vp, real, levels, causal, "mean")
        table = None if rpb is None else rpb.to(q.dtype)
        d_rpb = None if rpb is None else torch.zeros(rpb.shape, dtype=q.dtype, device=q.device)
        counts = [real.to(q.dtype)]  # real tokens per group, level by level
        for _ in range(1, levels):
            counts.append(pairwise_sum(counts[-1][..., None])[..., 0])

        nr = block_size
        dq = dk = dv = None  # running gradients, coarsest level first, prolonged one level at a time
        for level, (key, grad_a, delta) in reversed(list(enumerate(_row_terms(out, grad, lse, padded, levels)))):
            coarse = pyramid[level]
            blocks = _blocks(coarse, level, causal, nr, table)
            shape = coarse.key.shape[:-1]
            key, delta = key.reshape(-1, nr), delta.reshape(-1, nr)  # [R, Nr]
            grad_blocks = grad_a.reshape(-1, nr, grad_a.shape[-1]).contiguous()  # [R, Nr, E]
            runs = grad_blocks.shape[0]
            g_q = torch.empty_like(blocks.query)
            g_k, g_v = torch.zeros_like(blocks.key), torch.zeros_like(blocks.value)
            d_static = None if table is None else torch.zeros_like(blocks.static)
            buffers = q.new_empty(2, len(blocks.offsets), min(runs, max(1, CHUNK_ROWS // nr)), nr, nr)
            for lo, hi in _steps(runs, nr):
                p = _scores(blocks, lo, hi, buffers[0, :, :hi - lo]).sub_(key[lo:hi, :, None]).exp_()  # 0: lse_a = inf
                ds = buffers[1, :, :hi - lo]
                for i, o in enumerate(blocks.offsets):  # dP = dO_a V^T per window part (0 for a missing block)
                    a, b = _neighbours(o, lo, hi, runs)
                    torch.bmm(grad_blocks[a:b], blocks.value[a + o:b + o].transpose(1, 2), out=ds[i, a - lo:b - lo])
                    ds[i, :a - lo].zero_()
                    ds[i, b - lo:].zero_()
                ds.sub_(delta[lo:hi, :, None]).mul_(p)  # [P, hi - lo, Nr, Nr]
                if d_static is not None:
                    rows = _table_rows(blocks, lo, hi)
                    if isinstance(rows, int):
                        d_static[rows] += ds.sum(1)
                    else:
                        d_static.index_add_(0, rows, ds.transpose(0, 1))
                _window_matmul(blocks, lo, hi, ds, blocks.key, g_q)
                _transposed_window_matmul(blocks, lo, hi, ds, blocks.query, g_k)
                _transposed_window_matmul(blocks, lo, hi, p, grad_blocks, g_v)
            if d_static is not None:
                index = relative_position_index(blocks.offsets, nr, q.device).flatten()
                d_rpb.index_add_(1, index, d_static.transpose(1, 2).reshape(d_static.shape[0], -1))
            g_q = g_q.view(*shape, -1)  # unscaled gradients of the coarse queries and keys (scaled at the end)
            g_k, g_v = g_k.view(*shape, -1), g_v.view(*shape, -1)
            if level:  # a group mean hands each real token 1/count (level 0: its own token, count 1)
                per_token = counts[level].clamp(min=1)[..., None]
                g_k, g_v = g_k.div_(per_token), g_v.div_(per_token)
                if not causal:
                    g_q = g_q.div_(per_token)
            if dq is not None:  # the coarser levels' gradients, prolonged: to each child (causal q: the first)
                (g_q.unflatten(-2, (-1, 2))[..., 0, :] if causal else g_q.unflatten(-2, (-1, 2))).add_(
                    dq if causal else dq[..., None, :])
                g_k.unflatten(-2, (-1, 2)).add_(dk[..., None, :])
                g_v.unflatten(-2, (-1, 2)).add_(dv[..., None, :])
            dq, dk, dv = g_q, g_k, g_v
        dq, dk = dq.mul_(dim**-0.5), dk.mul_(dim**-0.5)  # the logits' scale (dv has none)
        if real.dim() > 1:  # padded rows of q, k, v were zeroed: no gradient
            dq, dk, dv = (x.mul_(real[..., None]) for x in (dq, dk, dv))
        dq, dk, dv = (x[..., :length, :] for x in (dq, dk, dv))
        return dq, dk, dv, None if d_rpb is None else d_rpb.to(rpb.dtype), None, None, None
