"""Hourglass: hierarchical Transformer LM (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient
Language Models"), following the official implementation, `HourglassLM` of Google's Trax library.

    tokens -> Embedding -> Dropout -> pre stack -> valley -> post stack -> Linear head
    valley (factor k):  x' = shorten(shift_right(x, k-1), k);  x' = inner stack(s) / deeper valley;
                        x = x + LayerNorm(upsample(x', k, x))

Every stack of pre-LN blocks ends with a LayerNorm (as in Trax; the post stack's is the final norm).
Positions (RoPE, or Transformer-XL relative attention with `u, v` shared by all layers) are in original-token
units: a token of a level shortened `F` times in all stands at `i*F`.

Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` with chunks of any
size. Each level keeps its own block KV caches; a valley keeps the shifted activations of its incomplete group
(at most `k-1`), the state of its shortening (attention pooling: keys/values of every slot of the completed
groups) and of its upsampling (the last shortened token; attention upsampling: keys/values of every shortened
token). A shortened token is computed, and the shortened stack advances, as soon as its group of `k` shifted
slots is complete, i.e. when outer position `g*k` arrives; the outer positions of group `g` only ever need
shortened tokens `0..g`, so everything a cache holds is final when stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hier_lm.models.config import ModelConfig, check_heads
from hier_lm.models.layers import Block, KVCache, init_weights
from hier_lm.models.relative_attention import RelativeBiases, RelativeSelfAttention
from hier_lm.models.resampling import (
    SHORTENINGS,
    UPSAMPLINGS,
    ScaledRotaryEmbedding,
    UpsamplingState,
    make_shortening,
    make_upsampling,
)

_TOKEN = re.compile(r"^([+-]?\d+)@([+-]?\d+)$")


class HierarchyLevel(NamedTuple):
    """One level of the hourglass: `layers_before` blocks, the deeper levels, `layers_after` blocks, all at
    `1/factor` of the full length (`factor` is cumulative). The innermost level has `layers_after == 0`."""

    layers_before: int
    factor: int
    layers_after: int


def parse_hierarchy(spec: str) -> tuple[HierarchyLevel, ...]:
    """Parse an official-style hierarchy such as `"5@1 24@3 5@1"` or `"2@1 2@3 4@9 2@3 2@1"`.

    Space-separated `n@k` tokens: `n >= 1` layers at `1/k` of the full length, `k` cumulative. The string is a
    palindrome with a middle token, the outermost factor is 1 and each factor strictly grows inward and is a
    multiple of the one outside it. Returns one `HierarchyLevel` per level, outermost first.
    """
    example = "write it like '5@1 24@3 5@1' or '2@1 2@3 4@9 2@3 2@1'"
    if not isinstance(spec, str) or not spec.split():
        raise ValueError(f"hierarchy must be a non-empty string of 'n@k' tokens; {example}")
    pairs = []
    for token in spec.split():
        match = _TOKEN.match(token)
        if match is None:
            raise ValueError(f"malformed hierarchy token {token!r} in {spec!r}: expected 'n@k' with integers "
                             f"n (layers) and k (cumulative shortening factor); {example}")
        n, k = int(match.group(1)), int(match.group(2))
        if n <= 0:
            raise ValueError(f"hierarchy token {token!r} in {spec!r} has {n} layers; every level needs >= 1")
        if k <= 0:
            raise ValueError(f"hierarchy token {token!r} in {spec!r} has shortening factor {k}; it must be >= 1")
        pairs.append((n, k))
    if pairs != pairs[::-1]:
        raise ValueError(f"hierarchy {spec!r} is not a palindrome: the tokens after the middle must mirror "
                         f"those before it; {example}")
    if len(pairs) < 3 or len(pairs) % 2 == 0:
        raise ValueError(f"hierarchy {spec!r} needs an odd number (>= 3) of tokens: full-length layers before, "
                         f"at least one shortened middle level, and the same layers after; {example}")
    if pairs[0][1] != 1:
        raise ValueError(f"hierarchy {spec!r} must start and end at full length ('n@1'), got "
                         f"'{pairs[0][0]}@{pairs[0][1]}'; {example}")
    half = pairs[: len(pairs) // 2 + 1]
    for (_, outer), (_, inner) in zip(half, half[1:]):
        if inner % outer:
            raise ValueError(f"hierarchy {spec!r}: factor {inner} is not divisible by the outer factor {outer}; "
                             f"each cumulative factor must be a multiple of the one outside it")
        if inner == outer:
            raise ValueError(f"hierarchy {spec!r}: factor {inner} repeats the outer factor; factors must grow "
                             f"inward (put those layers in the outer token instead)")
    last = len(half) - 1
    return tuple(HierarchyLevel(n, k, 0 if i == last else n) for i, (n, k) in enumerate(half))


class Stack(nn.Module):
    """`n` pre-LN blocks followed by a LayerNorm (Trax `create_decoder_blocks`). Positions are the token
    indices of the level times `pos_scale` (its cumulative shortening factor)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float, pos: str,
                 pos_scale: int, rel_biases: RelativeBiases | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, rope=pos == "rope") for _ in range(n_layers)
        )
        if pos == "rope" and pos_scale != 1:
            for block in self.blocks:
                block.attn.rope = ScaledRotaryEmbedding(block.attn.head_dim, pos_scale)
        if pos == "relative":
            for block in self.blocks:
                block.attn = RelativeSelfAttention(d_model, n_heads, dropout, rel_biases, pos_scale)
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(self, x: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None)
        return self.norm(x)


@dataclass
class ValleyCache:
    """Decoding state of one valley (see the module docstring)."""

    pre: list[KVCache]
    post: list[KVCache] | None
    shortening: KVCache | None
    upsampling: UpsamplingState
    inner: ValleyCache | None
    n: int = 0  # outer positions seen
    groups: int = 0  # shortened tokens computed (= ceil(n / k))
    pending: torch.Tensor | None = None  # shifted slots of the incomplete group, [B, < k, d]


class Valley(nn.Module):
    """One level below an outer one: shift by `k-1`, shorten by `k`, the level's stacks (and deeper valley),
    upsample, `x + LayerNorm(upsampled)`."""

    def __init__(self, levels: tuple[HierarchyLevel, ...], index: int, d_model: int, n_heads: int, d_ff: int,
                 dropout: float, shortening: str, shortening_base: str, upsampling: str, upsampling_base: str,
                 pos: str, rel_biases: RelativeBiases | None = None):
        super().__init__()
        level, outer = levels[index], levels[index - 1]
        self.k = level.factor // outer.factor
        rope = pos == "rope"
        common = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, rope=rope,
                      pos_scale=outer.factor, rel_biases=rel_biases)
        self.shorten = make_shortening(shortening, self.k, base=shortening_base, **common)
        stack = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, pos=pos, pos_scale=level.factor,
                     rel_biases=rel_biases)
        self.pre = Stack(level.layers_before, **stack)
        if index + 1 < len(levels):
            self.inner = Valley(levels, index + 1, d_model, n_heads, d_ff, dropout, shortening, shortening_base,
                                upsampling, upsampling_base, pos, rel_biases)
            self.post = Stack(level.layers_after, **stack)
        else:
            self.inner, self.post = None, None
        self.upsample = make_upsampling(upsampling, self.k, base=upsampling_base, **common)
        self.norm = nn.LayerNorm(d_model)

    def new_cache(self) -> ValleyCache:
        return ValleyCache(
            pre=self.pre.new_cache(),
            post=self.post.new_cache() if self.post is not None else None,
            shortening=self.shorten.new_cache(),
            upsampling=self.upsample.new_cache(),
            inner=self.inner.new_cache() if self.inner is not None else None,
        )

    def _middle(self, xs: torch.Tensor, cache: ValleyCache | None) -> torch.Tensor:
        xs = self.pre(xs, cache.pre if cache is not None else None)
        if self.inner is not None:
            xs = self.inner(xs, cache.inner) if cache is not None else self.inner(xs)
            xs = self.post(xs, cache.post if cache is not None else None)
        return xs

    def forward(self, x: torch.Tensor, cache: ValleyCache | None = None) -> torch.Tensor:
        """Without a cache, `x: [B, L, d]` is a whole sequence with `L` a multiple of the factors left.
        With one, `x` holds the outer positions after those already passed through `cache` (any number)."""
        if cache is None:
            shifted = F.pad(x, (0, 0, self.k - 1, 0))[:, : x.shape[1]]
            xs = self._middle(self.shorten(shifted), None)
            return x + self.norm(self.upsample(xs, x))
        return self._step(x, cache)

    def _step(self, x: torch.Tensor, cache: ValleyCache) -> torch.Tensor:
        k, (B, m, d) = self.k, x.shape
        if cache.pending is None:  # the k-1 zeros of the shift
            cache.pending = x.new_zeros(B, k - 1, d)
        slots = torch.cat((cache.pending, x), dim=1)
        n_new = slots.shape[1] // k  # groups completed by this chunk
        cache.pending = slots[:, n_new * k:]
        if n_new:
            xs = self.shorten(slots[:, : n_new * k], cache.groups, cache.shortening)
            xs = self._middle(xs, cache)
        else:
            xs = x.new_zeros(B, 0, d)
        up = self.upsample(xs, x, cache.n, cache.upsampling)
        cache.n += m
        cache.groups += n_new
        return x + self.norm(up)


@dataclass
class HourglassCache:
    """Incremental-decoding state of a whole `Hourglass`: full-length stacks and the valley's state."""

    pre: list[KVCache]
    post: list[KVCache]
    valley: ValleyCache
    n: int = 0


@dataclass(frozen=True)
class HourglassConfig(ModelConfig):
    """The options of `Hourglass` (and the shared ones of `ModelConfig`), each with its default (the paper's
    enwik8 model, with RoPE)."""

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    hierarchy: str = "5@1 24@3 5@1"  # the official notation: `n@k` = n layers at 1/k of the length (k cumulative)
    shortening: Literal[SHORTENINGS] = "attention"
    attention_shortening_base: Literal["average", "linear"] = "average"  # what attention pooling's queries start from
    upsampling: Literal[UPSAMPLINGS] = "attention"
    attention_upsampling_base: Literal["repeat", "linear"] = "repeat"  # what attention upsampling starts from
    pos: Literal["rope", "relative"] = "rope"  # relative: Transformer-XL, as the paper

    def __post_init__(self) -> None:
        super().__post_init__()
        check_heads(self.d_model, self.n_heads, rope=self.pos == "rope")
        parse_hierarchy(self.hierarchy)  # a malformed hierarchy is a ValueError that says how to write it

    @classmethod
    def tiny(cls) -> HourglassConfig:
        return cls(vocab_size=32, max_len=64, dropout=0.0, d_model=32, n_heads=4, d_ff=64, hierarchy="2@1 2@3 2@1")


class Hourglass(nn.Module):
    """Hourglass LM. `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`, `logits[:, t]` predicts
    `tokens[:, t+1]` from `tokens[:, :t+1]`; any `L`, beyond `max_len` too (positions are relative or rotary;
    padded internally at the end to a multiple of the total shortening factor). Built from an `HourglassConfig`
    or its options as keywords.

    `hierarchy` is the official notation, e.g. `"5@1 24@3 5@1"` (paper enwik8) or `"2@1 2@3 4@9 2@3 2@1"`.
    `shortening`: `"attention"` (Trax attention pooling, over `attention_shortening_base`), `"average"` or
    `"linear"`; `upsampling`: `"attention"` (over `attention_upsampling_base`), `"repeat"` or `"linear"`.
    `pos`: `"rope"` or `"relative"` (Transformer-XL, biases `u, v` shared by all layers), both in
    original-token units at every level.

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the logits
    of the new tokens only, for chunks of any size; equal to the uncached forward up to float rounding.
    """

    config_class = HourglassConfig
    block_types: tuple[type[nn.Module], ...] = (Block,)  # the residual blocks: units of sharding and checkpointing
    max_context: int | None = None  # the longest input: any length (positions are relative or rotary)

    def __init__(self, config: HourglassConfig | None = None, **options):
        super().__init__()
        self.config = config = HourglassConfig.from_options(config, **options)
        d_model, n_heads, d_ff, dropout, pos = config.d_model, config.n_heads, config.d_ff, config.dropout, config.pos
        self.levels = parse_hierarchy(config.hierarchy)
        self.hierarchy = config.hierarchy
        self.shorten_factors = tuple(b.factor // a.factor for a, b in zip(self.levels, self.levels[1:]))
        self.total_factor = self.levels[-1].factor
        self.vocab_size, self.max_len = config.vocab_size, config.max_len
        self.embed = nn.Embedding(config.vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.rel_biases = RelativeBiases(n_heads, d_model // n_heads) if pos == "relative" else None
        stack = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, pos=pos, pos_scale=1,
                     rel_biases=self.rel_biases)
        self.pre = Stack(self.levels[0].layers_before, **stack)
        self.valley = Valley(self.levels, 1, d_model, n_heads, d_ff, dropout, config.shortening,
                             config.attention_shortening_base, config.upsampling, config.attention_upsampling_base,
                             pos, self.rel_biases)
        self.post = Stack(self.levels[0].layers_after, **stack)  # its LayerNorm is the final norm
        self.head = nn.Linear(d_model, config.vocab_size, bias=False)
        self.apply(init_weights)

    def new_cache(self) -> HourglassCache:
        """An empty incremental-decoding cache (one state per level)."""
        return HourglassCache(pre=self.pre.new_cache(), post=self.post.new_cache(), valley=self.valley.new_cache())

    def forward(self, tokens: torch.Tensor, cache: HourglassCache | None = None) -> torch.Tensor:
        B, L = tokens.shape
        if cache is None:  # pad at the end: the padding is in the future of every real token
            tokens = F.pad(tokens, (0, -L % self.total_factor))
        x = self.drop(self.embed(tokens))
        x = self.pre(x, cache.pre if cache is not None else None)
        x = self.valley(x, cache.valley if cache is not None else None)
        x = self.post(x, cache.post if cache is not None else None)
        if cache is not None:
            cache.n += L
        return self.head(x[:, :L])
