"""Sampling filters."""

import torch

from hier_lm.generation import filter_logits, sample_next


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_p=0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # the most likely token survives any top_p
    assert filter_logits(probs.log(), top_p=0.01).isfinite().tolist() == [[True, False, False, False]]


def test_sampling_follows_the_distribution_and_greedy_is_argmax():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(probs.log(), 1.0, None, None, g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 4000
    torch.testing.assert_close(freq, probs[0].double(), atol=0.03, rtol=0)
    assert sample_next(probs.log(), 0.0, None, None, g).item() == 1
