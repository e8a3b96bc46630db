"""Hourglass shortening (downsampling) and upsampling layers, with incremental-decoding state.

Conventions (one hourglass level, local shortening factor `k`, outer cumulative factor `F`):

- The shortening layers take *shifted slots*: the outer activations shifted right by `k - 1` (the valley
  does the shift), cut into complete groups of `k`. Group `g` holds slots `g*k .. g*k + k - 1`, that is the
  outer positions `g*k - k + 1 .. g*k`; so shortened token `g` carries information up to outer position
  `g*k` and stands at that position (`g*k*F` in original-token units).
- The upsampling layers map shortened tokens back to outer positions: position `j` receives group
  `floor(j/k)` (repeat/linear) or attends to groups `0..floor(j/k)` (attention upsampling).
- Positions (RoPE or relative) are in original-token units: outer position `j` is at `j*F`, the slot `s` holds outer
  position `s - (k - 1)`, shortened token `g` is at `g*k*F`. Attention sees only non-negative distances.

Every layer works on a whole sequence (`start=0`, no state), or, for cached decoding, on the groups/positions
that follow those already passed through its state. Nothing a state holds ever changes once computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hier_lm.models.layers import FeedForward, KVCache, RotaryEmbedding
from hier_lm.models.relative_attention import RelativeBiases, RelativePosition

SHORTENINGS = ("attention", "average", "linear")
UPSAMPLINGS = ("attention", "repeat", "linear")


class ScaledRotaryEmbedding(RotaryEmbedding):
    """RoPE whose integer positions are multiplied by `scale` (positions in original-token units)."""

    def __init__(self, head_dim: int, scale: int = 1, base: float = 10000.0):
        super().__init__(head_dim, base)
        self.scale = scale

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(x, positions * self.scale)


class CrossAttention(nn.Module):
    """Multi-head attention of queries `xq: [B, Lq, d]` over keys/values from `xkv: [B, Lk, d]`, with an
    explicit boolean `mask: [Lq, T]` (True = may attend; T = cached + new keys), positions `q_pos: [Lq]`,
    `k_pos: [T]` of every key (already in original-token units) and an optional `KVCache` of the keys/values
    seen before. With `rel_biases`, Transformer-XL relative positions replace RoPE (`unit`: the smallest
    distance step)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, rope: bool = True,
                 rel_biases: RelativeBiases | None = None, unit: int = 1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.rope = RotaryEmbedding(self.head_dim) if rope and rel_biases is None else None
        self.rel = RelativePosition(d_model, n_heads, rel_biases, unit) if rel_biases is not None else None

    def forward(self, xq, xkv, q_pos, k_pos, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, Lq, _ = xq.shape
        Lk = xkv.shape[1]
        q = self.q(xq).view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(xkv).view(B, Lk, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q, q_pos), self.rope(k, k_pos[k_pos.shape[0] - Lk:])
        if cache is not None:
            k, v = cache.append(k, v) if Lk else (cache.k, cache.v)
        dropout = self.dropout if self.training else 0.0
        if self.rel is not None:
            y = self.rel.attend(q, k, v, q_pos, k_pos, mask, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, Lq, -1))


def pooling_mask(first_group: int, n_groups: int, k: int, n_keys: int, device=None) -> torch.Tensor:
    """Shortened query `g` (absolute index) sees every shifted slot of groups `0..g`: slot `s < (g+1)*k`.
    NOT only its own group: this is the causal funnel mask of Trax (`tril` repeated `k` times on keys)."""
    g = torch.arange(first_group, first_group + n_groups, device=device)
    return torch.arange(n_keys, device=device)[None, :] < (g[:, None] + 1) * k


def upsampling_mask(start: int, length: int, k: int, n_groups: int, device=None) -> torch.Tensor:
    """Outer position `j` (absolute) sees shortened tokens `0..floor(j/k)`."""
    j = torch.arange(start, start + length, device=device)
    return torch.arange(n_groups, device=device)[None, :] <= (j[:, None] // k)


# ----------------------------------------------------------------------------------------------- shortening


class AveragePooling(nn.Module):
    """Mean of each group of `k` slots: `[B, G*k, d] -> [B, G, d]`."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def new_cache(self):
        return None

    def forward(self, slots: torch.Tensor, first_group: int = 0, cache=None) -> torch.Tensor:
        B, S, d = slots.shape
        return slots.view(B, S // self.k, self.k, d).mean(dim=2)


class LinearPooling(nn.Module):
    """Concatenate each group of `k` slots and project: `[B, G, k*d] -> Linear -> Dropout -> [B, G, d]`."""

    def __init__(self, k: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(k * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def new_cache(self):
        return None

    def forward(self, slots: torch.Tensor, first_group: int = 0, cache=None) -> torch.Tensor:
        B, S, d = slots.shape
        return self.drop(self.proj(slots.reshape(B, S // self.k, self.k * d)))


class AttentionPooling(nn.Module):
    """Trax `AttentionResampling(is_upsampling=False)`: `h = LN(slots)`; `q = LN(pool(h))`;
    `q = q + Drop(Attn(q, k=v=h))` with shortened query `g` seeing the slots of groups `0..g`;
    `q = q + Drop(FF(LN(q)))`. The cache holds the keys/values of every slot of the completed groups."""

    def __init__(self, k: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, base: str = "average",
                 rope: bool = True, pos_scale: int = 1, rel_biases: RelativeBiases | None = None):
        super().__init__()
        if base not in ("average", "linear"):
            raise ValueError(f"attention_shortening_base must be 'average' or 'linear', got {base!r}")
        self.k, self.pos_scale = k, pos_scale
        self.norm_in, self.norm_q, self.norm_ff = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.pool = AveragePooling(k) if base == "average" else LinearPooling(k, d_model, dropout)
        self.attn = CrossAttention(d_model, n_heads, dropout, rope, rel_biases, pos_scale)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, slots: torch.Tensor, first_group: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        k, dev = self.k, slots.device
        n_groups = slots.shape[1] // k
        first_slot = first_group * k
        if (cache.length if cache is not None else 0) != first_slot:
            raise RuntimeError(f"attention pooling cache holds {cache.length} slots, expected {first_slot}")
        h = self.norm_in(slots)
        q = self.norm_q(self.pool(h))
        q_pos = torch.arange(first_group, first_group + n_groups, device=dev) * k * self.pos_scale
        k_pos = (torch.arange(first_slot + slots.shape[1], device=dev) - (k - 1)) * self.pos_scale
        mask = pooling_mask(first_group, n_groups, k, first_slot + slots.shape[1], dev)
        q = q + self.drop(self.attn(q, h, q_pos, k_pos, mask, cache))
        return q + self.drop(self.ffn(self.norm_ff(q)))


def make_shortening(kind: str, k: int, d_model: int, n_heads: int, d_ff: int, dropout: float, base: str,
                    rope: bool, pos_scale: int, rel_biases: RelativeBiases | None = None) -> nn.Module:
    if kind == "average":
        return AveragePooling(k)
    if kind == "linear":
        return LinearPooling(k, d_model, dropout)
    if kind == "attention":
        return AttentionPooling(k, d_model, n_heads, d_ff, dropout, base, rope, pos_scale, rel_biases)
    raise ValueError(f"shortening must be one of {SHORTENINGS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------- upsampling


@dataclass
class UpsamplingState:
    """What an upsampling layer keeps between decoding calls: how many shortened tokens it has seen, the
    last one (outer positions of its group may still be to come) and, for attention, their keys/values."""

    groups: int = 0
    last: torch.Tensor | None = None
    kv: KVCache | None = field(default=None)


class _Upsampling(nn.Module):
    """Shared bookkeeping: which shortened tokens the outer positions `start .. start+m-1` need."""

    k: int

    def new_cache(self) -> UpsamplingState:
        return UpsamplingState()

    def _groups_for(self, new: torch.Tensor, start: int, length: int, state: UpsamplingState | None):
        """`new: [B, c, d]` the shortened tokens that follow those in `state`. Returns the tokens of groups
        `floor(start/k) .. floor((start+length-1)/k)` and the offset of `start` in their upsampled span."""
        k = self.k
        first = start // k
        if state is None:
            seen, groups = 0, new
        else:
            seen = state.groups
            groups = new if first == seen else torch.cat((state.last, new), dim=1)
            state.groups += new.shape[1]
            state.last = groups[:, -1:]
        if first not in (seen, seen - 1) or (start + length - 1) // k != seen + new.shape[1] - 1:
            raise RuntimeError(f"upsampling got groups {seen}..{seen + new.shape[1] - 1} for positions "
                               f"{start}..{start + length - 1} with k={k}")
        return groups, start - first * k


class _TokenUpsampling(_Upsampling):
    """Upsampling that expands each shortened token on its own into `k` outer tokens (`self.base`)."""

    def forward(self, xs, residual, start: int = 0, state: UpsamplingState | None = None) -> torch.Tensor:
        groups, offset = self._groups_for(xs, start, residual.shape[1], state)
        return self.base(groups)[:, offset: offset + residual.shape[1]]


class RepeatUpsampling(_TokenUpsampling):
    """Repeat each shortened token `k` times."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def base(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.repeat_interleave(self.k, dim=1)


class LinearUpsampling(_TokenUpsampling):
    """`Linear(d, k*d) -> Dropout`, then each token becomes `k` consecutive tokens."""

    def __init__(self, k: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(d_model, k * d_model)
        self.drop = nn.Dropout(dropout)

    def base(self, groups: torch.Tensor) -> torch.Tensor:
        B, G, d = groups.shape
        return self.drop(self.proj(groups)).reshape(B, G * self.k, d)


class AttentionUpsampling(_Upsampling):
    """Trax `AttentionResampling(is_upsampling=True)`: `h = LN(xs)`; `u = LN(upsample(h)) + residual`;
    `u = u + Drop(Attn(u, k=v=h))` with outer position `j` seeing shortened tokens `0..floor(j/k)`;
    `u = u + Drop(FF(LN(u)))`. (The valley then adds `LN(u)` to the residual once more.)"""

    def __init__(self, k: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, base: str = "repeat",
                 rope: bool = True, pos_scale: int = 1, rel_biases: RelativeBiases | None = None):
        super().__init__()
        if base not in ("repeat", "linear"):
            raise ValueError(f"attention_upsampling_base must be 'repeat' or 'linear', got {base!r}")
        self.k, self.pos_scale = k, pos_scale
        self.norm_in, self.norm_up, self.norm_ff = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.up = RepeatUpsampling(k) if base == "repeat" else LinearUpsampling(k, d_model, dropout)
        self.attn = CrossAttention(d_model, n_heads, dropout, rope, rel_biases, pos_scale)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def new_cache(self) -> UpsamplingState:
        return UpsamplingState(kv=KVCache())

    def forward(self, xs, residual, start: int = 0, state: UpsamplingState | None = None) -> torch.Tensor:
        k, m, dev = self.k, residual.shape[1], residual.device
        seen = state.groups if state is not None else 0
        h = self.norm_in(xs)
        groups, offset = self._groups_for(h, start, m, state)
        u = self.norm_up(self.up.base(groups)[:, offset: offset + m]) + residual
        q_pos = torch.arange(start, start + m, device=dev) * self.pos_scale
        k_pos = torch.arange(seen + xs.shape[1], device=dev) * k * self.pos_scale
        mask = upsampling_mask(start, m, k, seen + xs.shape[1], dev)
        u = u + self.drop(self.attn(u, h, q_pos, k_pos, mask, state.kv if state is not None else None))
        return u + self.drop(self.ffn(self.norm_ff(u)))


def make_upsampling(kind: str, k: int, d_model: int, n_heads: int, d_ff: int, dropout: float, base: str,
                    rope: bool, pos_scale: int, rel_biases: RelativeBiases | None = None) -> nn.Module:
    if kind == "repeat":
        return RepeatUpsampling(k)
    if kind == "linear":
        return LinearUpsampling(k, d_model, dropout)
    if kind == "attention":
        return AttentionUpsampling(k, d_model, n_heads, d_ff, dropout, base, rope, pos_scale, rel_biases)
    raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got {kind!r}")
