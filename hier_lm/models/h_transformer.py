"""H-Transformer-1D (Zhu & Soricut 2021, "H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for
Sequences"): pre-LN blocks whose self-attention is `hier_lm.ops.h_attention` (the official level structure,
with an exact per-row log-sum-exp merge of the levels).

    tokens -> Embedding -> Dropout -> n_layers x [x + Drop(HAttn(LN(x))), x + Drop(FFN(LN(x)))] -> LN -> head

Attention dropout (`attn_dropout`, the official code's, which uses the model's dropout rate): the hierarchical
attention weights are dropped at each level's resolution after the softmax partition (see `h_attention`'s
`dropout_p`); only in training. The Triton kernels have none: `attn_impl="auto"` then trains on the PyTorch
reference, and `attn_impl="triton"` with `attn_dropout > 0` is refused.

Positions: `pos="hrpb"` (the official model: a learned hierarchical relative position bias per layer, a
`[H, 4*Nr - 1]` table shared by all levels, no absolute positions) or `pos="rope"` (RoPE on q and k at the
fine token positions; coarse keys are means of rotated keys).

Incremental decoding (causal only; the official code has none): `hier_lm.ops.h_attention_decode` (in
`ops/h_attention_cache.py`), one `HAttentionCache` per layer, a per-token cost of O(Nr * D) per level.

Encoder: `causal=False` is bidirectional h-attention; `num_classes` adds a classification head over the mean
of the final states of the real tokens (`lengths` = real tokens per right-padded row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hier_lm.models.config import ModelConfig, Probability, check_heads
from hier_lm.models.layers import FeedForward, RotaryEmbedding, init_weights, mean_pool
from hier_lm.ops import (
    IMPLS,
    VALUE_COARSENINGS,
    HAttentionCache,
    check_block_size,
    h_attention,
    h_attention_decode,
)
from hier_lm.ops.h_attention import check_kernel_fits


@dataclass
class HTransformerCache:
    """Incremental-decoding state of a whole `HTransformer1D`: one `HAttentionCache` per layer."""

    layers: list[HAttentionCache]
    n: int = 0


class HAttention(nn.Module):
    """Multi-head h-attention: `x: [B, L, d] -> [B, L, d]`; with `cache` (causal only), `x` holds the tokens
    after the cached ones."""

    def __init__(self, d_model: int, n_heads: int, block_size: int, causal: bool, value_coarsening: str,
                 pos: str, attn_impl: str = "auto", attn_dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.block_size, self.causal, self.value_coarsening = block_size, causal, value_coarsening
        self.attn_impl, self.attn_dropout = attn_impl, attn_dropout
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
                            rpb=self.rpb, lengths=lengths, attn_impl=self.attn_impl,
                            dropout_p=self.attn_dropout if self.training else 0.0)
        else:  # cached decoding (generation, no attention dropout): always the PyTorch reference
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


@dataclass(frozen=True)
class HTransformer1DConfig(ModelConfig):
    """The options of `HTransformer1D` (and the shared ones of `ModelConfig`), each with its default."""

    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int | None = None  # the FFN width; None: 4 * d_model
    block_size: int = 16  # Nr, the level-0 block size (even); the paper's LM1B models use 16
    pos: Literal["hrpb", "rope"] = "hrpb"  # hrpb: the official hierarchical relative position bias
    value_coarsening: Literal[VALUE_COARSENINGS] = "sum"  # sum (official) or mean: the same function
    causal: bool = True  # False: a bidirectional encoder (not a language model)
    num_classes: int | None = None  # encoder only: a mean-pooled classification head instead of the LM head
    attn_impl: Literal[IMPLS] = "auto"  # auto: Triton kernels on CUDA, the PyTorch reference elsewhere
    # dropout on the hierarchical attention weights in training (the official code: the model's dropout rate, 0.1
    # in its Flax attention default); 0 keeps the Triton kernels, which have none, in training on CUDA
    attn_dropout: Probability = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_block_size(self.block_size)
        if self.attn_dropout > 0 and self.attn_impl == "triton":
            raise ValueError("the h-attention Triton kernels have no attention dropout: set attn_impl='auto' (the "
                             "PyTorch reference in training) or attn_dropout=0")
        check_heads(self.d_model, self.n_heads, rope=self.pos == "rope")
        if self.attn_impl != "torch":  # a head dim no GPU's shared memory can tile: refused here, not at a step
            check_kernel_fits(self.block_size, self.d_model // self.n_heads)
        if self.num_classes is not None and self.causal:
            raise ValueError("a classifier (num_classes set) is an encoder: set causal=False")

    @classmethod
    def tiny(cls) -> HTransformer1DConfig:
        return cls(vocab_size=32, max_len=64, dropout=0.0, d_model=32, n_layers=2, n_heads=4, d_ff=64, block_size=4)


class HTransformer1D(nn.Module):
    """H-Transformer-1D. Decoder (`causal=True`): `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`,
    `logits[:, t]` predicts `tokens[:, t+1]` from `tokens[:, :t+1]`; any `L` (positions are relative). Built from an
    `HTransformer1DConfig` or its options as keywords.

    `block_size` is Nr, the level-0 block size (even); `pos`: `"hrpb"` (official hierarchical relative
    position bias) or `"rope"`; `value_coarsening`: `"sum"` or `"mean"` (the same function, see
    `h_attention`); `attn_impl`: `"auto"` (Triton kernels on CUDA, the PyTorch reference on CPU), `"torch"`
    or `"triton"` for the uncached forward (cached decoding always runs the reference); `attn_dropout`: dropout
    on the hierarchical attention weights in training (the reference only: `"auto"` trains on it when > 0).

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the logits
    of the new tokens only, for chunks of any size; equal to the uncached forward up to float rounding, at a
    per-token cost independent of the number of tokens before it (apart from `log2` of it in levels).

    Encoder (`causal=False`): bidirectional; `model(tokens, lengths=...)` with `lengths: [B]` real tokens per
    right-padded row (padding is then invisible to the real tokens). With `num_classes`, the model is a
    classifier: it returns `[B, num_classes]` from the mean of the final states of the real tokens.
    """

    config_class = HTransformer1DConfig
    block_types: tuple[type[nn.Module], ...] = (HBlock,)  # the residual blocks: units of sharding and checkpointing
    max_context: int | None = None  # the longest input: any length (positions are relative or rotary)

    def __init__(self, config: HTransformer1DConfig | None = None, **options):
        super().__init__()
        self.config = config = HTransformer1DConfig.from_options(config, **options)
        self.vocab_size, self.max_len, self.causal = config.vocab_size, config.max_len, config.causal
        self.num_classes, self.block_size = config.num_classes, config.block_size
        d_model = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d_model)
        self.drop = nn.Dropout(config.dropout)
        attention = dict(block_size=config.block_size, causal=config.causal, value_coarsening=config.value_coarsening,
                         pos=config.pos, attn_impl=config.attn_impl, attn_dropout=config.attn_dropout)
        self.blocks = nn.ModuleList(
            HBlock(d_model, config.n_heads, config.d_ff or 4 * d_model, config.dropout, **attention)
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, config.num_classes or config.vocab_size, bias=False)
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
        x = self.encode(tokens, cache, lengths)
        return self.head(x if self.num_classes is None else mean_pool(x, lengths))

    def encode(self, tokens: Tensor, cache: HTransformerCache | None = None, lengths: Tensor | None = None) -> Tensor:
        """`tokens: [B, L]` -> the final normalised states `[B, L, d_model]` (before the head); `lengths: [B]`
        real tokens per right-padded row."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        L = tokens.shape[1]
        if cache is not None and lengths is not None:
            raise ValueError("lengths (padding) is for whole sequences; decode with a cache without it")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device)
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, lengths)
        if cache is not None:
            cache.n += L
        return self.norm(x)
