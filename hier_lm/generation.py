"""Sampling (temperature, top-k, top-p) over the models' incremental-decoding caches.

Every model exposes `max_len`, `new_cache()` and `model(tokens, cache=cache)` (logits of the new tokens
only). One uniform draw per step from a seeded generator picks the token by inverse CDF, so cached and
uncached decoding, whose logits differ only by float rounding, give the same tokens for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the smallest set of mass >= top_p. `[B, V]`."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # the most likely token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """Pick one token per row of `logits: [B, V]` -> `[B]`; temperature 0 is greedy."""
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u.to(cdf.device)).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_tokens: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Continue `prompt_tokens` (`[T]` or `[B, T]`, T >= 1) by `max_new_tokens` sampled tokens.

    Returns the prompt followed by the new tokens, `[T + N]` or `[B, T + N]` like the prompt. The model sees
    at most `model.max_len` tokens: when the context would overflow, it restarts from the last
    `max_len // 2` tokens (cached decoding re-fills its cache from them), the same in both modes, so
    `use_cache=True` and `False` give the same tokens for a seed. The model is put in eval mode for the call
    and restored after.
    """
    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt_tokens, dtype=torch.long, device=device)
    squeeze = tokens.dim() == 1
    tokens = tokens[None] if squeeze else tokens
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [T] or [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    generator = torch.Generator()
    generator.manual_seed(seed) if seed is not None else generator.seed()
    was_training = model.training
    model.eval()
    try:
        window_start = 0 if tokens.shape[1] <= model.max_len else tokens.shape[1] - model.max_len // 2
        cache, new_input = (model.new_cache() if use_cache else None), tokens[:, window_start:]
        for _ in tqdm(range(max_new_tokens), disable=not progress, desc="sampling", unit="tok"):
            if tokens.shape[1] - window_start > model.max_len:  # the context would overflow: restart it
                window_start = tokens.shape[1] - model.max_len // 2
                cache, new_input = (model.new_cache() if use_cache else None), tokens[:, window_start:]
            context = new_input if use_cache else tokens[:, window_start:]
            logits = model(context, cache=cache)[:, -1]
            next_token = sample_next(logits, temperature, top_k, top_p, generator)[:, None]
            tokens = torch.cat((tokens, next_token), dim=1)
            new_input = next_token
    finally:
        model.train(was_training)
    return tokens[0] if squeeze else tokens
