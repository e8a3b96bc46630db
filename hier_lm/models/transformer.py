"""The plain Transformer baseline: pre-LN decoder, SDPA causal attention, RoPE or learned positions."""

from __future__ import annotations

import torch
from torch import nn

from hier_lm.models.layers import Block, KVCache, init_weights


class Transformer(nn.Module):
    """Decoder-only LM. `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`; `logits[:, t]` predicts
    `tokens[:, t+1]` from `tokens[:, :t+1]`.

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the
    logits of the new tokens only, given every token passed before through the same cache.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        d_ff: int | None = None,
        dropout: float = 0.1,
        max_len: int = 2048,
        pos: str = "rope",
        tie_embeddings: bool = False,
    ):
        super().__init__()
        if pos not in ("rope", "learned"):
            raise ValueError(f"pos must be 'rope' or 'learned', got {pos!r}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model) if pos == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff or 4 * d_model, dropout, rope=pos == "rope") for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(init_weights)

    def new_cache(self) -> list[KVCache]:
        """An empty incremental-decoding cache: one KV cache per block."""
        return [KVCache() for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        start = cache[0].length if cache else 0
        if start + tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {start + tokens.shape[1]} tokens exceeds max_len={self.max_len}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache else None)
        return self.head(self.norm(x))

