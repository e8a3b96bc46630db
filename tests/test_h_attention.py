"""H-Transformer-1D attention: the vectorised operator against a dense O(L^2) oracle written pair by pair,
the partition probe, full attention for short sequences, causality, gradients, value coarsening modes,
padding, dtypes, input checks and linear memory."""

import math

import pytest
import torch

from benchmarks.common import cpu_allocation_profile
from hier_lm.ops import h_attention, h_attention_level_masks, h_attention_levels, h_attention_num_levels

F64 = torch.float64


def make_qkv(length, batch=2, heads=2, dim=4, scale=2.0, seed=0, requires_grad=False):
    """q, k, v: [B, H, L, D] float64; q, k scaled up so that the softmax is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=F64) for _ in range(3))
    return [x.requires_grad_(requires_grad) for x in (q * scale, k * scale, v)]


def make_rpb(heads, block_size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, 4 * block_size - 1, generator=gen, dtype=F64)


def full_attention(q, k, v, causal):
    """Plain softmax attention with an explicit L x L matrix."""
    length = q.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, -1) @ v


# --------------------------------------------------------------------------------- the dense oracle


def oracle_level_matrix(length, nr, causal):
    """[L, L] long: the level covering each pair, or -1 (not allowed), from the closed form of research
    §1.3 (`h_attention_level_masks`). Asserts the exact partition: every allowed pair (causal: j <= i, else
    all) is covered by exactly one level, no other pair by any."""
    masks = h_attention_level_masks(length, nr, causal)
    allowed = torch.ones(length, length, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    covering = masks.sum(0)
    assert torch.equal(covering, allowed.long()), (covering != allowed.long()).nonzero()[:5].tolist()
    return h_attention_levels(length, nr, causal)


def oracle_coarse_rows(x, level, length, sample_first):
    """Fine-resolution copy of level-`level` coarse tokens: row t = token of t's group [g*2**l, (g+1)*2**l).

    The coarse token is the mean of the group's real tokens (those < L), or its first token (sample_first).
    """
    size = 2**level
    rows = []
    for t in range(length):
        start = (t // size) * size
        if sample_first:
            rows.append(x[..., start, :])
        else:
            rows.append(x[..., start : min(start + size, length), :].mean(-2))
    return torch.stack(rows, dim=-2)


def dense_h_attention(q, k, v, nr, causal, rpb=None):
    """softmax(S_hat) @ v with the piecewise-constant logits of research §1.5 built explicitly:
    S_hat[i, j] = q_l[i >> l] . k_l[j >> l] / sqrt(D) + rpb[(j >> l) - (i >> l) + 2nr - 1] for the level l
    covering (i, j), -inf if no level does. Coarse keys: group means; coarse queries: group means
    (bidirectional) or the group's first token (causal). Each fine key keeps its own value."""
    length, dim = q.shape[-2:]
    matrix = oracle_level_matrix(length, nr, causal)
    s_hat = torch.full((*q.shape[:-2], length, length), float("-inf"), dtype=F64)
    for level in range(h_attention_num_levels(length, nr)):
        covered = matrix == level
        q_rows = oracle_coarse_rows(q, level, length, sample_first=causal)
        k_rows = oracle_coarse_rows(k, level, length, sample_first=False)
        logits = q_rows @ k_rows.transpose(-1, -2) / math.sqrt(dim)
        if rpb is not None:
            coarse = torch.arange(length) >> level
            relative = coarse[None, :] - coarse[:, None]  # key minus query, in level-l tokens
            index = (relative + 2 * nr - 1).clamp(0, 4 * nr - 2)  # clamp only touches uncovered pairs
            logits = logits + rpb[:, index]  # [H, L, L]
        s_hat = torch.where(covered, logits, s_hat)
    return torch.softmax(s_hat, -1) @ v


def test_oracle_equals_full_attention_for_piecewise_constant_inputs():
    """Sanity check of the oracle itself: when q and k are constant over the coarsest groups, every coarse
    logit equals the fine one, so S_hat is the plain logit matrix (bidirectional)."""
    q, k, v = make_qkv(32)
    q, k = (x[..., ::8, :].repeat_interleave(8, -2) for x in (q, k))  # constant over groups of 8
    torch.testing.assert_close(dense_h_attention(q, k, v, 4, causal=False), full_attention(q, k, v, False))


# --------------------------------------------------------------------------------- 1. dense oracle


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("nr", [2, 4, 8, 16])
@pytest.mark.parametrize("length", [1, 5, 33, 64, 100, 130])
def test_matches_dense_oracle(length, nr, causal):
    q, k, v = make_qkv(length, seed=length + nr)
    got = h_attention(q, k, v, nr, causal=causal)
    torch.testing.assert_close(got, dense_h_attention(q, k, v, nr, causal), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("length, nr", [(37, 2), (64, 4), (100, 8)])
def test_relative_position_bias_matches_dense_oracle(length, nr, causal):
    q, k, v = make_qkv(length, heads=3)
    rpb = make_rpb(3, nr)
    got = h_attention(q, k, v, nr, causal=causal, rpb=rpb)
    torch.testing.assert_close(got, dense_h_attention(q, k, v, nr, causal, rpb), rtol=1e-10, atol=1e-12)
    # a [4*Nr - 1] table is shared by all heads
    shared = h_attention(q, k, v, nr, causal=causal, rpb=rpb[0])
    torch.testing.assert_close(shared, h_attention(q, k, v, nr, causal=causal, rpb=rpb[:1].expand(3, -1)))


# --------------------------------------------------------------------------------- 2. partition probe


@pytest.mark.parametrize("value_coarsening", ["sum", "mean"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("length, nr", [(1, 2), (7, 2), (32, 4), (64, 4), (100, 2), (128, 2), (130, 8), (256, 16)])
def test_every_allowed_pair_counted_exactly_once(length, nr, causal, value_coarsening):
    """q = k = 0, v = I: all logits are equal, so row i must be uniform over its allowed keys."""
    q = torch.zeros(1, 1, length, 3, dtype=F64)
    v = torch.eye(length, dtype=F64)[None, None]
    got = h_attention(q, q, v, nr, causal=causal, value_coarsening=value_coarsening)[0, 0]
    allowed = torch.ones(length, length, dtype=F64)
    if causal:
        allowed = allowed.tril()
    torch.testing.assert_close(got, allowed / allowed.sum(-1, keepdim=True), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------- 3. short = full attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("length, nr", [(1, 2), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (16, 8), (32, 16)])
def test_short_sequences_are_full_attention(length, nr, causal):
    q, k, v = make_qkv(length, dim=5)
    torch.testing.assert_close(h_attention(q, k, v, nr, causal=causal), full_attention(q, k, v, causal))


def test_piecewise_constant_inputs_give_full_attention():
    """When q, k are constant over the coarsest groups, coarse logits are exact (bidirectional)."""
    q, k, v = make_qkv(64)
    q, k = (x[..., ::16, :].repeat_interleave(16, -2) for x in (q, k))  # Nr=4: levels 0..3, groups <= 8
    torch.testing.assert_close(h_attention(q, k, v, 4, causal=False), full_attention(q, k, v, False))


# --------------------------------------------------------------------------------- 4. causality


@pytest.mark.parametrize("length, nr", [(37, 4), (64, 2), (100, 8)])
def test_causal_outputs_ignore_later_positions(length, nr):
    q, k, v = make_qkv(length)
    rpb = make_rpb(2, nr)
    base = h_attention(q, k, v, nr, causal=True, rpb=rpb)
    gen = torch.Generator().manual_seed(5)
    for s in (0, 1, nr - 1, nr, length // 2, length - 1):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[..., s, :] += 10 * torch.randn(x[..., s, :].shape, generator=gen, dtype=F64)
        out = h_attention(q2, k2, v2, nr, causal=True, rpb=rpb)
        assert torch.equal(out[..., :s, :], base[..., :s, :]), f"position {s} leaks into earlier outputs"
        assert not torch.equal(out[..., s:, :], base[..., s:, :])


def test_bidirectional_outputs_see_later_positions():
    q, k, v = make_qkv(40)
    base = h_attention(q, k, v, 4, causal=False)
    v2 = v.clone()
    v2[..., -1, :] += 1.0
    assert not torch.equal(h_attention(q, k, v2, 4, causal=False)[..., 0, :], base[..., 0, :])


# --------------------------------------------------------------------------------- 5. gradients


@pytest.mark.slow
@pytest.mark.parametrize("value_coarsening", ["sum", "mean"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradcheck(causal, value_coarsening):
    q, k, v = make_qkv(11, batch=1, heads=2, dim=3, scale=1.0, requires_grad=True)  # L_pad 16, 3 levels
    rpb = make_rpb(2, 2).requires_grad_(True)

    def fn(q, k, v, rpb):
        return h_attention(q, k, v, 2, causal=causal, value_coarsening=value_coarsening, rpb=rpb)

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


# --------------------------------------------------------------------------------- 6. modes, padding, dtypes


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("length, nr", [(33, 2), (100, 4), (64, 8)])
def test_sum_and_mean_value_coarsening_agree(length, nr, causal):
    q, k, v = make_qkv(length)
    total = h_attention(q, k, v, nr, causal=causal, value_coarsening="sum")
    mean = h_attention(q, k, v, nr, causal=causal, value_coarsening="mean")
    torch.testing.assert_close(total, mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padding_never_gives_nan(causal):
    """L = 17 with Nr = 4 pads to 32: the last blocks and groups are (partly) all padding."""
    q, k, v = make_qkv(17, requires_grad=True)
    for mode in ("sum", "mean"):
        out = h_attention(q, k, v, 4, causal=causal, value_coarsening=mode, rpb=make_rpb(2, 4))
        assert out.shape == v.shape and torch.isfinite(out).all()
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_huge_logits_stay_finite():
    """Logits of very different size in different levels: the per-row merge must not overflow."""
    q, k, v = make_qkv(64, scale=30.0)
    for causal in (True, False):
        out = h_attention(q.float(), k.float(), v.float(), 4, causal=causal)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), dense_h_attention(q, k, v, 4, causal), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_lower_precision_matches_float64(causal):
    q, k, v = make_qkv(50)
    ref = h_attention(q, k, v, 4, causal=causal)
    out32 = h_attention(q.float(), k.float(), v.float(), 4, causal=causal)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    out16 = h_attention(qb, kb, vb, 4, causal=causal)
    assert out16.dtype == torch.bfloat16
    ref16 = h_attention(qb.double(), kb.double(), vb.double(), 4, causal=causal)  # same rounded inputs
    torch.testing.assert_close(out16.double(), ref16, rtol=2e-2, atol=2e-2)
    # a float32 rpb parameter does not change the output dtype; autocast does not lower the inner precision
    assert h_attention(qb, kb, vb, 4, causal=causal, rpb=make_rpb(2, 4).float()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(h_attention(q.float(), k.float(), v.float(), 4, causal=causal), out32)


def test_value_dim_may_differ_and_empty_sequence():
    q, k, _ = make_qkv(20, dim=4)
    v = torch.randn(2, 2, 20, 7, dtype=F64)
    assert h_attention(q, k, v, 4).shape == (2, 2, 20, 7)
    empty = torch.zeros(1, 2, 0, 4)
    assert h_attention(empty, empty, empty, 4).shape == (1, 2, 0, 4)


@pytest.mark.parametrize("block_size", [0, 1, 3, 5, -2, 2.0, True, "4"])
def test_bad_block_size(block_size):
    q, k, v = make_qkv(8)
    with pytest.raises(ValueError, match="block_size"):
        h_attention(q, k, v, block_size)


def test_bad_inputs():
    q, k, v = make_qkv(8)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        h_attention(q[0], k[0], v[0], 2)
    with pytest.raises(ValueError, match="shape of q"):
        h_attention(q, k[..., :3], v, 2)
    with pytest.raises(ValueError, match="v must be"):
        h_attention(q, k, v[..., :5, :], 2)
    with pytest.raises(TypeError, match="floating-point"):
        h_attention(q, k, v.long(), 2)
    with pytest.raises(ValueError, match="value_coarsening"):
        h_attention(q, k, v, 2, value_coarsening="max")
    with pytest.raises(ValueError, match="rpb"):
        h_attention(q, k, v, 2, rpb=torch.zeros(2, 8, dtype=F64))  # needs 4*2-1 = 7
    with pytest.raises(ValueError, match="rpb"):
        h_attention(q, k, v, 2, rpb=torch.zeros(3, 7, dtype=F64))  # 3 heads, input has 2


# --------------------------------------------------------------------------------- 7. linear memory


def test_memory_is_linear_in_length():
    """L = 8192: one L x L float32 matrix would be 256 MiB; the largest allocation and the peak of live
    allocations (forward; forward + backward) stay far below it (measured: 1 MiB, ~9 MiB, ~17 MiB)."""
    length, nr, dim = 8192, 16, 16
    square_bytes = length * length * 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, length, dim, generator=gen) for _ in range(3))

    # the measurement itself sees an L x L matrix
    largest, peak = cpu_allocation_profile(lambda: torch.softmax(q[0, 0] @ k[0, 0].T, -1))
    assert largest >= square_bytes and peak >= square_bytes

    for causal in (True, False):
        largest, peak = cpu_allocation_profile(lambda: h_attention(q, k, v, nr, causal=causal))
        assert 0 < largest < square_bytes / 64, largest
        assert 0 < peak < square_bytes / 8, peak

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    _, peak = cpu_allocation_profile(lambda: h_attention(*leaves, nr, causal=False).sum().backward())
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert 0 < peak < square_bytes / 4, peak
