"""Transformer-XL relative positional attention (Dai et al. 2019), as the Hourglass Trax code uses it:

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_r r(p_i - p_j)) / sqrt(D)

with sinusoidal `r`, the content/position biases `u, v` shared by every layer of the model, and positions `p`
in original-token units (a level shortened `F` times in all measures distances in multiples of `F`). Keys
and values carry no position, so a KV cache holds them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hier_lm.models.layers import KVCache


class RelativeBiases(nn.Module):
    """The global content bias `u` and position bias `v`, `[H, D]` each, shared by all attention layers."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.v = nn.Parameter(torch.zeros(n_heads, head_dim))


def sinusoid(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    """`[U]` distances -> `[U, d_model]`: `[sin(p * f), cos(p * f)]`, `f = 10000^(-2i/d)`."""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, device=distances.device, dtype=torch.float32) / d_model)
    angles = distances.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class RelativePosition(nn.Module):
    """The position term of one attention layer: projection `W_r` and a reference to the shared biases."""

    def __init__(self, d_model: int, n_heads: int, biases: RelativeBiases, unit: int):
        super().__init__()
        self.n_heads, self.head_dim, self.unit = n_heads, d_model // n_heads, unit
        self.r = nn.Linear(d_model, d_model, bias=False)
        self.biases = biases  # shared module: registered here and in every other layer, one set of parameters

    def attend(self, q, k, v, q_pos, k_pos, mask, dropout: float) -> torch.Tensor:
        """`q: [B, H, Lq, D]`, `k, v: [B, H, T, D]`, positions `[Lq]`, `[T]` (multiples of `unit`, original
        units), boolean `mask: [Lq, T]` (True = may attend; every allowed distance is >= 0)."""
        distance = q_pos[:, None] - k_pos[None, :]
        index = torch.where(mask, distance, torch.zeros_like(distance)) // self.unit  # masked: any valid row
        n_dist = int(index.max()) + 1 if index.numel() else 1
        rel = self.r(sinusoid(torch.arange(n_dist, device=q.device) * self.unit, self.r.in_features).to(q.dtype))
        rel = rel.view(n_dist, self.n_heads, self.head_dim).transpose(0, 1)  # [H, U, D]
        scale = self.head_dim ** -0.5
        pos_scores = (q + self.biases.v[:, None, :]) @ rel.transpose(-1, -2)  # [B, H, Lq, U]
        pos_scores = pos_scores.gather(-1, index.expand(*pos_scores.shape[:2], -1, -1))  # [B, H, Lq, T]
        bias = (pos_scores * scale).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q + self.biases.u[:, None, :], k, v, attn_mask=bias,
                                              dropout_p=dropout, scale=scale)


class RelativeSelfAttention(nn.Module):
    """Causal self-attention with relative positions; the same interface as `CausalSelfAttention`
    (`forward(x, cache=None)`), token `i` of the level standing at `i * unit`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, biases: RelativeBiases, unit: int = 1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rel = RelativePosition(d_model, n_heads, biases, unit)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        q_idx = torch.arange(start, start + L, device=x.device)
        k_idx = torch.arange(start + L, device=x.device)
        mask = k_idx[None, :] <= q_idx[:, None]
        unit = self.rel.unit
        y = self.rel.attend(q, k, v, q_idx * unit, k_idx * unit, mask, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, -1))
