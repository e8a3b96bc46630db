"""Sampling (temperature, top-k, top-p) over the models' incremental-decoding caches.

Every model exposes `max_len`, `new_cache()` and `model(tokens, cache=cache)` (logits of the new tokens
only). One uniform draw per step from a seeded generator picks the token by inverse CDF, so cached and
uncached decoding, whose logits differ only by float rounding, give the same tokens for a seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


def check_count(name: str, value, minimum: int = 0) -> int:
    """`value` if it is a whole number >= `minimum` (a bool is not), else a one-line ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_sampling(temperature=1.0, top_k=None, top_p=None, max_new_tokens: int = 0) -> None:
    """One-line ValueErrors for sampling settings that would sample nonsense: `temperature` not a finite number
    >= 0, `top_k` not None or a whole number >= 0 (0: no top-k), `top_p` not None or in (0, 1],
    `max_new_tokens` not a whole number >= 0."""
    check_count("max_new_tokens", max_new_tokens)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None:
        check_count("top_k", top_k)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (the probability mass kept; null for all), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the smallest set of mass >= top_p. `[B, V]`. The
    most likely token always stays (`top_p` must be in (0, 1], see `check_sampling`)."""
    check_sampling(top_k=top_k, top_p=top_p)
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
    # Shifted so that the largest is 0 before scaling: a tiny temperature sends the others to -inf, never to nan.
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u.to(cdf.device)).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def prompt_ids(prompt, vocab_size: int) -> torch.Tensor:
    """A prompt as a LongTensor of token ids: integer ids (a tensor or nested sequences) each in
    `[0, vocab_size)`, or for a byte-level model (`vocab_size == 256`) `bytes` or a `str` (its UTF-8 bytes)."""
    if isinstance(prompt, (bytes, bytearray, str)):
        if vocab_size != 256:
            raise ValueError(f"a text prompt ({type(prompt).__name__}) needs a byte-level model (vocab 256); this "
                             f"model has vocab {vocab_size}: give token ids (e.g. from its tokenizer)")
        return torch.tensor(list(prompt.encode("utf-8") if isinstance(prompt, str) else prompt), dtype=torch.long)
    try:
        tokens = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"prompt_tokens must be integer token ids ([T] or [B, T]), got {type(prompt).__name__} "
                         f"({err})") from None
    if tokens.numel() and (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool):
        raise ValueError(f"prompt_tokens must be integer token ids, got {tokens.dtype} values: round or convert them "
                         f"(e.g. .long()) if they are ids")
    tokens = tokens.long()
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab_size):
        raise ValueError(f"prompt_tokens must be ids in [0, {vocab_size}) for this model, got values from "
                         f"{int(tokens.min())} to {int(tokens.max())}")
    return tokens


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
    """Continue `prompt_tokens` (`[T]` or `[B, T]` integer ids below `model.vocab_size`, T >= 1; for a byte-level
    model (vocab 256) also `bytes` or a `str`, taken as UTF-8) by `max_new_tokens` sampled tokens. Settings that
    would sample nonsense are a ValueError (`check_sampling`).

    Returns the prompt followed by the new tokens, `[T + N]` or `[B, T + N]` like the prompt. The model sees
    at most `model.max_len` tokens: when the context would overflow, it restarts from the last
    `max_len // 2` tokens (cached decoding re-fills its cache from them), the same in both modes, so
    `use_cache=True` and `False` give the same tokens for a seed. The model is put in eval mode for the call
    and restored after.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    device = next(model.parameters()).device
    tokens = prompt_ids(prompt_tokens, model.vocab_size).to(device)
    squeeze = tokens.dim() == 1
    tokens = tokens[None] if squeeze else tokens
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [T] or [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be a whole number or None, got {seed!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed)) if seed is not None else generator.seed()
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
