"""Learning-rate schedules."""

import math

import pytest

from hier_lm.tasks.optim import lr_factor


def test_warmup_then_cosine_to_the_floor():
    assert lr_factor(0, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, "cosine", 0.1) == pytest.approx(0.1)


def test_a_longer_cosine_cycle_is_truncated_like_the_hourglass_enwik8_run():
    """Trax: 4.1e-4 * warmup(4000) * cosine(cycle 350k), stopped at 263k steps: ends at ~0.16 of the peak."""
    end = lr_factor(263000, 4000, 263000, "cosine", 0.0, cycle_steps=350000)
    assert end == pytest.approx(0.5 * (1 + math.cos(math.pi * 259000 / 350000)))
    assert 0.15 < end < 0.17


def test_rsqrt_and_constant():
    assert lr_factor(399, 100, 1000, "rsqrt", 0.0) == pytest.approx(0.5)
    assert lr_factor(5000, 100, 1000, "constant", 0.0) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 1, 1, "linear", 0.0)
