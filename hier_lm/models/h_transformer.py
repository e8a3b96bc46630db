"""H-Transformer-1D (Zhu & Soricut 2021, "H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for
Sequences"): pre-LN blocks whose self-attention is `hier_lm.ops.h_attention` (the official semantics with an
exact per-row log-sum-exp merge; research/h_transformer_1d.md §1).

    tokens -> Embedding -> Dropout -> n_layers x [x + Drop(HAttn(LN(x))), x + Drop(FFN(LN(x)))] -> LN -> head

Positions: `pos="hrpb"` (the official model: a learned hierarchical relative position bias per layer, a
`[H, 4*Nr - 1]` table shared by all levels, no absolute positions) or `pos="rope"` (RoPE on q and k at the
fine token positions; coarse keys are means of rotated keys).

Incremental decoding (causal only; the official code has none): `hier_lm.ops.h_attention_decode` (in
`ops/h_attention_cache.py`), one `HAttentionCache` per layer, a per-token cost of O(Nr * D) per level.

Encoder: `causal=False` is bidirectional h-attention; `num_classes` adds a classification head over the mean
of the final states of the real tokens (`lengths` = real tokens per right-padded row).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hier_lm.models.layers import FeedForward, RotaryEmbedding, init_weights
from hier_lm.ops import (
    IMPLS,
    VALUE_COARSENINGS,
    HAttentionCache,
    check_block_size,
    h_attention,
    h_attention_decode,
)

POSITIONS = ("hrpb", "rope")


@dataclass
class HTransformerCache:
    """Incremental-decoding state of a whole `HTransformer1D`: one `HAttentionCache` per layer."""

    layers: list[HAttentionCache]
    n: int = 0


class HAttention(nn.Module):
    """Multi-head h-attention: `x: [B, L, d] -> [B, L, d]`; with `cache` (causal only), `x` holds the tokens
    after the cached ones."""

    def __init__(self, d_model: int, n_heads: int, block_size: int, causal: bool, value_coarsening: str,
                 pos: str, attn_impl: str = "auto"):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.block_size, self.causal, self.value_coarsening = block_size, causal, value_coarsening
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim) if pos == "rope" else None
        self.rpb = nn.Parameter(0.02 * torch.randn(n_heads, 4 * block_size - 1)) if pos == "hrpb" else None

    def forward(self, x: Tensor, cache: HAttentionCache | None = None, lengths: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = cache.n if cache is not None else 0
        if self.rope is not None:
            positions = torch.arange(start, start + L, device=x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is None:
            y = h_attention(q, k, v, self.block_size, causal=self.causal, value_coarsening=self.value_coarsening,
                            rpb=self.rpb, lengths=lengths, attn_impl=self.attn_impl)
        else:  # cached decoding: always the PyTorch reference (a few rows per step)
            y = h_attention_decode(q, k, v, cache, self.block_size, self.value_coarsening, self.rpb)
        return self.out(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class HBlock(nn.Module):
    """Pre-LN block with h-attention: `x + Drop(HAttn(LN(x)))`, then `x + Drop(FFN(LN(x)))`."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, **attention):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = HAttention(d_model, n_heads, **attention)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: HAttentionCache | None = None, lengths: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, lengths))
        return x + self.drop(self.ffn(self.norm2(x)))


class HTransformer1D(nn.Module):
    """H-Transformer-1D. Decoder (`causal=True`): `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`,
    `logits[:, t]` predicts `tokens[:, t+1]` from `tokens[:, :t+1]`; any `L <= max_len`.

    `block_size` is Nr, the level-0 block size (even); `pos`: `"hrpb"` (official hierarchical relative
    position bias) or `"rope"`; `value_coarsening`: `"sum"` or `"mean"` (the same function, see
    `h_attention`); `attn_impl`: `"auto"` (Triton kernels on CUDA, the PyTorch reference on CPU), `"torch"`
    or `"triton"` for the uncached forward (cached decoding always runs the reference).

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the logits
    of the new tokens only, for chunks of any size; equal to the uncached forward up to float rounding, at a
    per-token cost independent of the number of tokens before it (apart from `log2` of it in levels).

    Encoder (`causal=False`): bidirectional; `model(tokens, lengths=...)` with `lengths: [B]` real tokens per
    right-padded row (padding is then invisible to the real tokens). With `num_classes`, the model is a
    classifier: it returns `[B, num_classes]` from the mean of the final states of the real tokens.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        d_ff: int | None = None,
        dropout: float = 0.1,
        block_size: int = 16,
        max_len: int = 2048,
        pos: str = "hrpb",
        value_coarsening: str = "sum",
        causal: bool = True,
        num_classes: int | None = None,
        attn_impl: str = "auto",
    ):
        super().__init__()
        if attn_impl not in IMPLS:
            raise ValueError(f"attn_impl must be one of {IMPLS}, got {attn_impl!r}")
        if pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
        if value_coarsening not in VALUE_COARSENINGS:
            raise ValueError(f"value_coarsening must be one of {VALUE_COARSENINGS}, got {value_coarsening!r}")
        block_size = check_block_size(block_size)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if pos == "rope" and (d_model // n_heads) % 2:
            raise ValueError(f"pos='rope' needs an even head dim, got d_model/n_heads = {d_model // n_heads}; "
                             f"change n_heads or use pos='hrpb'")
        if not isinstance(max_len, numbers.Integral) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if num_classes is not None:
            if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
            if causal:
                raise ValueError("a classifier (num_classes set) is an encoder: set causal=False")
        self.vocab_size, self.max_len, self.causal, self.num_classes = vocab_size, max_len, causal, num_classes
        self.block_size = block_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        attention = dict(block_size=block_size, causal=causal, value_coarsening=value_coarsening, pos=pos,
                         attn_impl=attn_impl)
        self.blocks = nn.ModuleList(
            HBlock(d_model, n_heads, d_ff or 4 * d_model, dropout, **attention) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes or vocab_size, bias=False)
        self.apply(init_weights)

    def new_cache(self) -> HTransformerCache:
        """An empty incremental-decoding cache: one `HAttentionCache` per block (causal models only)."""
        if not self.causal or self.num_classes is not None:
            raise ValueError("incremental decoding needs a causal language model; this HTransformer1D was built "
                             "with causal=False (bidirectional encoder): build it with causal=True to decode")
        return HTransformerCache([HAttentionCache() for _ in self.blocks])

    def forward(self, tokens: Tensor, cache: HTransformerCache | None = None,
                lengths: Tensor | None = None) -> Tensor:
        """`tokens: [B, L]` -> logits `[B, L, vocab_size]` (classifier: `[B, num_classes]`). With `cache`,
        `tokens` follow those already passed through it and the logits are those of `tokens` only."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        if cache is not None and lengths is not None:
            raise ValueError("lengths (padding) is for whole sequences; decode with a cache without it")
        start = cache.n if cache is not None else 0
        if start + L > self.max_len:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_len={self.max_len}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device)
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, lengths)
        if cache is not None:
            cache.n += L
        x = self.norm(x)
        if self.num_classes is None:
            return self.head(x)
        if lengths is None:
            return self.head(x.mean(1))
        real = (torch.arange(L, device=x.device) < lengths[:, None]).to(x.dtype)  # [B, L]
        pooled = (x * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)
