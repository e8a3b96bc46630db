"""Layers shared by every model: rotary positions, KV cache, causal self-attention, FFN, pre-LN block.

Shapes: B batch, L length, H heads, D head dim, d model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) applied to `x: [B, H, L, D]` at integer `positions: [L]`."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [L, D/2]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class KVCache:
    """Keys and values of the tokens seen so far, `[B, H, T, D]` each, grown in place."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `k, v: [B, H, T_new, D]`; return all keys and values `[B, H, T, D]`."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention`, optional RoPE and KV cache;
    `causal=False` makes it bidirectional (an encoder's), with `lengths` hiding right padding."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, rope: bool = True, causal: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout, self.causal = dropout, causal
        self.rope = RotaryEmbedding(self.head_dim) if rope else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`x: [B, L, d]` -> `[B, L, d]`; with `cache`, `x` holds the tokens after the cached ones. Bidirectional:
        `lengths: [B]` real tokens per right-padded row; no query attends to a padding key."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = cache.length if cache is not None else 0
        if self.rope is not None:
            positions = torch.arange(start, start + L, device=x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        if not self.causal:
            mask = None if lengths is None else padding_mask(lengths, L)[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # new queries see every cached key and the new keys up to themselves
            mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """`Linear(d, d_ff) -> GELU -> Dropout -> Linear(d_ff, d)`."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-LN decoder block: `x + Drop(Attn(LN(x)))`, then `x + Drop(FFN(LN(x)))`."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, rope: bool = True,
                 causal: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, rope, causal)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)  # `lengths` only when given: Hourglass swaps in attentions that take (x, cache)
        x = x + self.drop(self.attn(h, cache) if lengths is None else self.attn(h, cache, lengths))
        return x + self.drop(self.ffn(self.norm2(x)))


def padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """`BoolTensor[B, length]`, True at the real tokens of right-padded rows of `lengths: [B]` real tokens."""
    return torch.arange(length, device=lengths.device) < lengths[:, None]


def mean_pool(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the real tokens of `x: [B, L, d]` -> `[B, d]`; `lengths: [B]` real tokens per right-padded
    row (None: every token is real). A row of no real token pools to zeros."""
    if lengths is None:
        return x.mean(1)
    real = padding_mask(torch.as_tensor(lengths, device=x.device), x.shape[1]).to(x.dtype)
    return (x * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)


def init_weights(module: nn.Module) -> None:
    """GPT-style init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
