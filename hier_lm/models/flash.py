"""FLASH and FLASH-Quad (Hua et al. 2022, "Transformer Quality in Linear Time"): a stack of Gated Attention
Units (GAU), the paper's sections 2-3 and its appendix pseudo-code.

    tokens -> Embedding -> Dropout -> n_layers x [x + Dropout(GAU(Norm(x)))] -> Norm -> Linear head

One GAU (single head, shapes for x: [B, L, d]):

    U, V, Z = split(SiLU(x W_uvz + b))           U, V: [B, L, e] (e = expansion * d), Z: [B, L, s]
    Q_i = RoPE(Z * gamma_i + beta_i)              per-dim scale/offset of the shared Z ("quad"/"lin" q and k)
    O   = (U * attention(Q, K, V)) W_o + b_o      [B, L, d]

* ``mode="quad"`` (FLASH-Quad): ``relu2_attention``: ``relu(q k^T / sqrt(s))**2 / max_len @ V`` over the whole
  causal prefix. The normaliser is the model's ``max_len``, a FIXED constant: never the runtime length, which
  (as in the public ports) would make the outputs at earlier positions depend on how many tokens follow them.
* ``mode="chunk"`` (FLASH): ``mixed_chunk_attention``: relu^2 inside chunks of C tokens (divided by C) plus linear
  attention over strictly earlier chunks, ``q_lin . sum_{h<g} K_h^T V_h / (g * C)`` in chunk g.

The quadratic scaling (``relu2_scaling``), with ``n`` = C (chunk) or ``max_len`` (quad) and ``b`` the optional
relative position bias:
* ``"sqrt_s"`` (default): ``relu(q k / sqrt(s) + b)**2 / n``, J. Su's variant: the logits are scaled like
  softmax attention's, and the total weight of n keys stays O(1) whatever n.
* ``"paper"``: ``relu(q k / n + b)**2``, the appendix pseudo-code (with its ``seq_len`` as the fixed n): an
  effective 1/n^2 on the squared logits, so the weights shrink as C or ``max_len`` grows.
Both run on the ops' one form ``relu(q k / sqrt(s) + B)**2 / n``: ``"paper"`` is that form with q scaled by
``sqrt(s / n)`` and ``B = sqrt(n) * b`` (exactly equal), so the Triton kernels serve both.

Positions: RoPE on every q and k at global token positions. ``rel_pos_bias=True`` adds the paper's learned
relative position bias inside the relu of the quadratic part: a Toeplitz table of ``2n - 1`` entries, one per
offset, N(0, 0.02) (the appendix code's; keys further than n - 1 share the end entries, where the appendix
switches to a RoPE-factored bias past 512 tokens). The paper also adds a scaled sinusoid, not done here; RoPE
alone is reported to work as well by J. Su. The Triton kernels have no bias: with it, ``attn_impl="auto"``
runs the PyTorch reference and ``attn_impl="triton"`` is refused.
Norms: scale-norm (default, the paper's choice) or LayerNorm. Init: N(0, 0.02) for linear and embedding weights
(as the paper), but N(0, 1) for the q/k scales gamma (see `OffsetScale`: a departure from the appendix code).

Incremental decoding, per layer: quad mode keeps every past key and value (single head); chunk mode keeps the
running sum of ``K_h^T V_h`` over finished chunks and the quad keys, linear keys and values of the current chunk
only, so a decoding step costs O(C * (s + e) + s * e) wherever it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hier_lm.models.config import ModelConfig, Probability
from hier_lm.models.layers import RotaryEmbedding, init_weights, padding_mask
from hier_lm.ops import IMPLS, mixed_chunk_attention, relu2_attention, relu2_attention_rows
from hier_lm.ops.chunk_attention import check_kernel_config


class ScaleNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * g` over the last dim, one learned gain `g` (init 1; shape [1], not a 0-dim
    scalar, so that FSDP2 can shard it)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * (torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.g)  # one [B, L, d] product


def make_norm(norm: str, d_model: int) -> nn.Module:
    return ScaleNorm() if norm == "scalenorm" else nn.LayerNorm(d_model)


class OffsetScale(nn.Module):
    """`n` per-dimension affine maps of one `z: [B, L, s]`: returns `[B, n, L, s]`, row i `z * gamma_i + beta_i`.

    gamma ~ N(0, 1), beta = 0. The paper's appendix code draws gamma from N(0, 0.02), but there a learned
    relative bias inside the relu gives the attention a gradient; without it relu(q k)^2 starts at a saddle
    (its gradient scales as gamma^3) and FLASH-Quad never learns to attend (tiny overfit: loss 1.50 vs 0.003;
    150 steps on stdlib bytes: 2.47 vs 2.08)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(n, dim))
        self.beta = nn.Parameter(torch.zeros(n, dim))

    def forward(self, z: Tensor) -> Tensor:
        return torch.addcmul(self.beta[:, None, :], z[..., None, :, :], self.gamma[:, None, :])


class _SiLUSplit(torch.autograd.Function):
    """`silu(h).split(sizes, -1)` whose backward writes each part's gradient straight into its slice of one
    `grad_h` buffer, instead of concatenating the parts' gradients and then applying `silu_backward` to the
    result: one fewer `[B, L, sum(sizes)]` tensor per GAU layer (the widest activation of the model)."""

    @staticmethod
    def forward(ctx, h: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        ctx.save_for_backward(h)
        ctx.sizes = sizes
        return F.silu(h).split(sizes, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None]:  # an unused part's gradient arrives as zeros
        (h,) = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        for grad, part, out in zip(grads, h.split(ctx.sizes, dim=-1), grad_h.split(ctx.sizes, dim=-1)):
            torch.ops.aten.silu_backward.grad_input(grad, part, grad_input=out)
        return grad_h, None


def silu_split(h: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """`F.silu(h).split(sizes, dim=-1)` (`h: [..., sum(sizes)]`), with a backward that needs one buffer less."""
    return _SiLUSplit.apply(h, sizes)


@dataclass
class GAUCache:
    """Decoding state of one GAU layer (`T` tokens seen; tensors are created on the first call).

    quad:  `keys: [B, T, s]`, `values: [B, T, e]`, every past token (after RoPE).
    chunk: `keys`, `lin_keys: [B, r, s]`, `values: [B, r, e]` of the `r = T % C` tokens of the current chunk,
           and `state: [B, s, e]` (float32 at least) = sum over finished chunks of `K_lin^T V`.
    """

    n: int = 0
    keys: Tensor | None = None
    lin_keys: Tensor | None = None
    values: Tensor | None = None
    state: Tensor | None = None


def _append(old: Tensor | None, new: Tensor) -> Tensor:
    return new if old is None else torch.cat((old, new), dim=-2)


class GAU(nn.Module):
    """Gated Attention Unit (no norm, no residual): `x: [B, L, d] -> [B, L, d]` (see the module docstring).

    `norm_const` is the fixed quadratic normaliser: the model's `max_len` in quad mode (chunk mode divides by
    `chunk_size` inside chunks). `relu2_scaling` and `rel_pos_bias` as in the module docstring. With `cache`,
    `x` holds the tokens after those already passed through it. `attn_impl` picks the attention of the uncached
    forward (`auto|torch|triton`); decoding keeps the reference.
    """

    def __init__(self, d_model: int, expansion_dim: int, s: int, mode: str, chunk_size: int, causal: bool,
                 norm_const: int, attn_impl: str = "auto", relu2_scaling: str = "sqrt_s", rel_pos_bias: bool = False):
        super().__init__()
        self.e, self.s, self.mode, self.chunk_size = expansion_dim, s, mode, chunk_size
        self.causal, self.norm_const, self.attn_impl = causal, norm_const, attn_impl
        self.uvz = nn.Linear(d_model, 2 * expansion_dim + s)
        self.qk = OffsetScale(s, 2 if mode == "quad" else 4)  # quad: q, k; chunk: q_quad, k_quad, q_lin, k_lin
        self.rope = RotaryEmbedding(s)
        self.out = nn.Linear(expansion_dim, d_model)
        n = chunk_size if mode == "chunk" else norm_const  # the quadratic part's fixed normaliser
        paper = relu2_scaling == "paper"  # the op's relu(q k / sqrt(s) + B)^2 / n with q, B rescaled (module doc)
        self.query_scale, self.bias_scale = (math.sqrt(s / n), math.sqrt(n)) if paper else (1.0, 1.0)
        self.pos_bias = nn.Parameter(0.02 * torch.randn(2 * n - 1)) if rel_pos_bias else None  # offset j - t + n - 1

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """`x: [B, L, d]` at positions `start..` -> `u, v: [B, L, e]` and the q/k tuple, each `[B, L, s]`
        after RoPE (quad: q, k; chunk: q_quad, k_quad, q_lin, k_lin), the quadratic query scaled for
        `relu2_scaling`."""
        u, v, z = silu_split(self.uvz(x), (self.e, self.e, self.s))
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        qk = self.rope(self.qk(z), positions).unbind(-3)  # RoPE on all n at once: [B, n, L, s]
        if self.query_scale != 1.0:
            qk = (qk[0] * self.query_scale, *qk[1:])
        return u, v, qk

    def bias(self) -> Tensor | None:
        """The relative position bias table as the ops take it (`[2n - 1]`, scaled for `relu2_scaling`), or None."""
        if self.pos_bias is None or self.bias_scale == 1.0:
            return self.pos_bias
        return self.pos_bias * self.bias_scale

    def forward(self, x: Tensor, cache: GAUCache | None = None, lengths: Tensor | None = None) -> Tensor:
        u, v, qk = self.project(x, cache.n if cache is not None else 0)
        if lengths is not None:
            v, qk = self._hide_padding(v, qk, lengths)
        if cache is not None:
            attended = self._quad_step(*qk, v, cache) if self.mode == "quad" else self._chunk_step(*qk, v, cache)
            cache.n += x.shape[1]
        elif self.mode == "quad":
            attended = relu2_attention(qk[0], qk[1], v, causal=self.causal, norm=self.norm_const,
                                       attn_impl=self.attn_impl, bias=self.bias())
        else:
            attended = mixed_chunk_attention(*qk, v, chunk_size=self.chunk_size, causal=self.causal,
                                             attn_impl=self.attn_impl, bias=self.bias())
        return self.out(u * attended)

    def _hide_padding(self, v: Tensor, qk: tuple[Tensor, ...], lengths: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Bidirectional attention over right-padded rows (`lengths: [B]` real tokens): zero values at the
        padding, so that a padding key adds exactly 0 to every output; in chunk mode, also scale the linear keys
        by `L / lengths`, so that the global part averages over the real tokens (the op divides by `L`)."""
        real = padding_mask(lengths, v.shape[1])[..., None]  # [B, L, 1]
        v = v * real.to(v.dtype)
        if self.mode == "chunk":
            q_quad, k_quad, q_lin, k_lin = qk
            scale = v.shape[1] / lengths.clamp(min=1).to(k_lin.dtype)
            qk = (q_quad, k_quad, q_lin, k_lin * scale[:, None, None])
        return v, qk

    def _quad_step(self, q: Tensor, k: Tensor, v: Tensor, cache: GAUCache) -> Tensor:
        cache.keys, cache.values = _append(cache.keys, k), _append(cache.values, v)
        return relu2_attention_rows(q, cache.keys, cache.values, cache.n, norm=self.norm_const,
                                    bias=self.bias()).to(v.dtype)

    def _chunk_step(self, q_quad: Tensor, k_quad: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor,
                    cache: GAUCache) -> Tensor:
        """Chunk segment by chunk segment: a token in chunk g sees its own chunk's earlier tokens (relu^2 / C)
        and `q_lin . state / (g * C)`, the state holding chunks < g only; a finished chunk joins the state."""
        c, n, outputs, i, bias = self.chunk_size, cache.n, [], 0, self.bias()
        while i < v.shape[1]:
            g, r = divmod(n, c)
            j = i + min(c - r, v.shape[1] - i)  # this segment: new tokens i..j-1, all in chunk g
            cache.keys = _append(cache.keys, k_quad[:, i:j])
            cache.lin_keys = _append(cache.lin_keys, k_lin[:, i:j])
            cache.values = _append(cache.values, v[:, i:j])
            out = relu2_attention_rows(q_quad[:, i:j], cache.keys, cache.values, r, norm=c, bias=bias)  # fp32+
            with torch.autocast(device_type=v.device.type, enabled=False):
                if g > 0:
                    out = out + q_lin[:, i:j].to(out.dtype) @ (cache.state / (g * c))
                if r + j - i == c:  # the chunk is complete: fold it into the state, start a new one
                    kv = cache.lin_keys.to(out.dtype).transpose(-1, -2) @ cache.values.to(out.dtype)
                    cache.state = kv if cache.state is None else cache.state + kv
                    cache.keys = cache.lin_keys = cache.values = None
            outputs.append(out.to(v.dtype))
            n, i = n + j - i, j
        return torch.cat(outputs, dim=1) if outputs else v.new_zeros(v.shape)


class FLASHBlock(nn.Module):
    """Pre-norm residual GAU: `x + Dropout(GAU(Norm(x)))`."""

    def __init__(self, d_model: int, norm: str, dropout: float, **gau):
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.gau = GAU(d_model, **gau)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: GAUCache | None = None, lengths: Tensor | None = None) -> Tensor:
        return x + self.drop(self.gau(self.norm(x), cache, lengths))


@dataclass
class FLASHCache:
    """Incremental-decoding state of a whole `FLASH` model: one `GAUCache` per layer."""

    layers: list[GAUCache] = field(default_factory=list)
    n: int = 0


@dataclass(frozen=True)
class FLASHConfig(ModelConfig):
    """The options of `FLASH` (and the shared ones of `ModelConfig`), each with its default (the paper's GAU
    settings: e = 2d, s = 128, C = 256, scale-norm)."""

    d_model: int = 512
    n_layers: int = 24
    expansion: float = 2  # e = expansion * d_model, the width of U and V
    s: int = 128  # the shared q/k width (even: RoPE)
    mode: Literal["chunk", "quad"] = "chunk"  # chunk: FLASH (mixed chunk attention); quad: FLASH-Quad
    chunk_size: int = 256  # C; mode="chunk" only
    causal: bool = True  # False: a bidirectional encoder (no cache)
    dropout: Probability = 0.0
    norm: Literal["scalenorm", "layernorm"] = "scalenorm"
    attn_impl: Literal[IMPLS] = "auto"  # auto: Triton kernels on CUDA, the PyTorch reference elsewhere
    # the quadratic weights, n = chunk_size (chunk) or max_len (quad): "sqrt_s" relu(qk / sqrt(s) + b)^2 / n
    # (default: the weights of n keys sum to O(1) whatever n, as softmax's do, and J. Su measured it slightly
    # better) or "paper" relu(qk / n + b)^2 (the appendix code: the weights shrink as 1/n with n)
    relu2_scaling: Literal["sqrt_s", "paper"] = "sqrt_s"
    rel_pos_bias: bool = False  # the paper's learned relative position bias b beside RoPE (PyTorch path only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.s % 2:
            raise ValueError(f"s (the q/k width) must be an even integer >= 2 for RoPE; got {self.s!r}")
        if self.expansion <= 0 or round(self.expansion * self.d_model) < 1:
            raise ValueError(f"expansion must be a number > 0 with expansion * d_model >= 1 (paper: 2); "
                             f"got {self.expansion!r}")
        if self.rel_pos_bias and self.attn_impl == "triton":
            raise ValueError("the FLASH Triton kernels have no relative position bias: set attn_impl='auto' (the "
                             "PyTorch reference with the bias) or rel_pos_bias=false")

    @classmethod
    def tiny(cls) -> FLASHConfig:
        return cls(vocab_size=32, max_len=64, d_model=32, n_layers=2, s=16, chunk_size=8)


class FLASH(nn.Module):
    """FLASH / FLASH-Quad LM. `model(tokens: [B, L]) -> logits: [B, L, vocab_size]`, `logits[:, t]` predicts
    `tokens[:, t+1]` from `tokens[:, :t+1]` (with `causal=True`); any `L` (chunk mode pads the last
    chunk internally; padding is in every real token's future and adds exactly zero). Built from a `FLASHConfig`
    or its options as keywords. Beyond `max_len` (the training length) RoPE and chunk mode's mean over earlier
    chunks hold as they are; FLASH-Quad still divides by `max_len`, so a query there sums more keys than in training.

    `mode="chunk"` is FLASH (mixed chunk attention, chunk `chunk_size`, paper default 256), `mode="quad"` is
    FLASH-Quad (full relu^2 attention divided by `max_len`). `expansion * d_model` is the width e of U and V
    (paper: 2), `s` the shared q/k width (paper: 128). Two GAU layers have about the parameters of one
    Transformer block (12 d^2), so use twice the layers for a like-for-like comparison.
    `norm`: `"scalenorm"` (paper) or `"layernorm"`. `causal=False` gives a bidirectional encoder (no cache);
    `model(tokens, lengths=...)` with `lengths: [B]` real tokens per right-padded row then hides the padding
    from the real tokens, and `encode` gives the final states.
    `attn_impl`: `"auto"` (the Triton kernels of `hier_lm.ops` on CUDA, the PyTorch reference elsewhere),
    `"torch"` or `"triton"`; the cached decoding path always runs the reference. `relu2_scaling`: `"sqrt_s"`
    (default) or `"paper"`, and `rel_pos_bias`: the paper's learned relative bias (module docstring).

    Incremental decoding: `cache = model.new_cache()`, then `model(new_tokens, cache=cache)` returns the logits of
    the new tokens only, for chunks of any size; equal to the uncached forward up to float rounding.
    """

    config_class = FLASHConfig
    block_types: tuple[type[nn.Module], ...] = (FLASHBlock,)  # residual blocks: units of sharding, checkpointing

    def __init__(self, config: FLASHConfig | None = None, **options):
        super().__init__()
        self.config = config = FLASHConfig.from_options(config, **options)
        self.vocab_size, self.max_len = config.vocab_size, config.max_len
        # The longest input: any length, but FLASH-Quad's relative bias table spans distances < max_len only.
        self.max_context = config.max_len if config.mode == "quad" and config.rel_pos_bias else None
        self.mode, self.causal = config.mode, config.causal
        if config.attn_impl != "torch":  # a configuration no GPU's shared memory can tile fails here, not at a step
            check_kernel_config(config.s, round(config.expansion * config.d_model),
                                config.chunk_size if config.mode == "chunk" else config.max_len)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        gau = dict(expansion_dim=round(config.expansion * config.d_model), s=config.s, mode=config.mode,
                   chunk_size=config.chunk_size, causal=config.causal, norm_const=config.max_len,
                   attn_impl=config.attn_impl, relu2_scaling=config.relu2_scaling, rel_pos_bias=config.rel_pos_bias)
        self.blocks = nn.ModuleList(
            FLASHBlock(config.d_model, config.norm, config.dropout, **gau) for _ in range(config.n_layers)
        )
        self.norm = make_norm(config.norm, config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)

    def new_cache(self) -> FLASHCache:
        """An empty incremental-decoding cache (one state per layer)."""
        if not self.causal:
            raise ValueError("a bidirectional FLASH (causal=False) cannot decode incrementally; build it with "
                             "causal=True")
        return FLASHCache(layers=[GAUCache() for _ in self.blocks])

    def forward(self, tokens: Tensor, cache: FLASHCache | None = None, lengths: Tensor | None = None) -> Tensor:
        """`tokens: [B, L]` -> logits `[B, L, vocab_size]` (see the class docstring)."""
        return self.head(self.encode(tokens, cache, lengths))

    def encode(self, tokens: Tensor, cache: FLASHCache | None = None, lengths: Tensor | None = None) -> Tensor:
        """`tokens: [B, L]` -> the final normalised states `[B, L, d_model]` (before the head); `lengths: [B]`
        real tokens per right-padded row (encoder only)."""
        if lengths is not None and self.causal:
            raise ValueError("lengths (padding) is for the bidirectional encoder: build it with causal=False")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        end = (cache.n if cache is not None else 0) + tokens.shape[1]
        if self.max_context is not None and end > self.max_context:
            raise ValueError(f"sequence of {end} tokens exceeds max_len={self.max_len}, the reach of FLASH-Quad's "
                             f"relative position bias (rel_pos_bias=true; without it any length works)")
        lengths = None if lengths is None else torch.as_tensor(lengths, device=tokens.device)
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, lengths)
        if cache is not None:
            cache.n += tokens.shape[1]
        return self.norm(x)
