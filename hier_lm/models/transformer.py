"""The plain Transformer baseline: pre-LN decoder, SDPA causal attention, RoPE or learned positions; with
`causal=False`, the bidirectional encoder baseline (right padding hidden by `lengths`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hier_lm.models.config import ModelConfig, check_heads
from hier_lm.models.layers import Block, KVCache, init_weights


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """The options of `Transformer` (and the shared ones of `ModelConfig`), each with its default."""

    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int | None = None  # the FFN width; None: 4 * d_model
    pos: Literal["rope", "learned"] = "rope"  # RoPE in every attention layer, or learned absolute embeddings
    tie_embeddings: bool = False  # the output head shares the token embedding matrix
    causal: bool = True  # False: a bidirectional encoder (not a language model; no cache)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_heads(self.d_model, self.n_heads, rope=self.pos == "rope")

    @classmethod
    def tiny(cls) -> TransformerConfig:
        return cls(vocab_size=32, max_len=64, dropout=0.0, d_model=32, n_layers=2, n_heads=2, d_ff=64)


class Transformer(nn.Module):
    """Decoder-only LM. `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`; `logits[:, t]` predicts
    `tokens[:, t+1]` from `tokens[:, :t+1]`. Built from a `TransformerConfig` or its options as keywords:
    `Transformer(vocab_size=256, d_model=256)`.

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the
    logits of the new tokens only, given every token passed before through the same cache.

    Encoder (`causal=False`): bidirectional attention; `model(tokens, lengths=...)` with `lengths: [B]` real
    tokens per right-padded row hides the padding from the real tokens. `encode` gives the final states.
    """

    config_class = TransformerConfig
    block_types: tuple[type[nn.Module], ...] = (Block,)  # the residual blocks: units of sharding and checkpointing

    def __init__(self, config: TransformerConfig | None = None, **options):
        super().__init__()
        self.config = config = TransformerConfig.from_options(config, **options)
        self.vocab_size, self.max_len, self.causal = config.vocab_size, config.max_len, config.causal
        d_model, rope = config.d_model, config.pos == "rope"
        self.max_context = None if rope else config.max_len  # the longest input: learned positions end at max_len
        self.embed = nn.Embedding(config.vocab_size, d_model)
        self.pos_embed = nn.Embedding(config.max_len, d_model) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, config.n_heads, config.d_ff or 4 * d_model, config.dropout, rope=rope, causal=config.causal)
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(init_weights)

    def new_cache(self) -> list[KVCache]:
        """An empty incremental-decoding cache: one KV cache per block (causal models only)."""
        if not self.causal:
            raise ValueError("a bidirectional Transformer (causal=False) cannot decode incrementally; build it with "
                             "causal=True")
        return [KVCache() for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens: [B, L]` -> logits `[B, L, vocab_size]` (see the class docstring)."""
        return self.head(self.encode(tokens, cache, lengths))

    def encode(self, tokens: torch.Tensor, cache: list[KVCache] | None = None,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens: [B, L]` -> the final normalised states `[B, L, d_model]` (before the head); `lengths: [B]`
        real tokens per right-padded row (encoder only)."""
        if lengths is not None and self.causal:
            raise ValueError("lengths (padding) is for the bidirectional encoder: build it with causal=False")
        start = cache[0].length if cache else 0
        if self.max_context is not None and start + tokens.shape[1] > self.max_context:
            raise ValueError(f"sequence of {start + tokens.shape[1]} tokens exceeds max_len={self.max_len}, the end of "
                             f"the learned position table (pos=learned; pos=rope reads any length)")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        x = self.drop(x)
        lengths = None if lengths is None else torch.as_tensor(lengths, device=tokens.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache else None, lengths)
        return self.norm(x)

