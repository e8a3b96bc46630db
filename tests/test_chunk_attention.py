"""FLASH / GAU attention cores: the vectorised chunked path against the dense O(L^2) oracle, an explicit
per-pair loop against the oracle, causality, length invariance, padding, dtypes and input checks."""

import math

import pytest
import torch

from hier_lm.ops.chunk_attention import (
    mixed_chunk_attention,
    naive_mixed_chunk_attention,
    reference,
    relu2_attention,
    relu2_attention_rows,
)

S, E = 8, 6  # shared q/k dim and value dim (different on purpose)


def make_inputs(length, batch=2, heads=None, dtype=torch.float64, seed=0, requires_grad=False):
    """q_quad, k_quad, q_lin, k_lin: [B, (H,) L, S]; v: [B, (H,) L, E]."""
    gen = torch.Generator().manual_seed(seed)
    lead = (batch,) if heads is None else (batch, heads)
    tensors = [torch.randn(*lead, length, d, generator=gen, dtype=torch.float64) for d in (S, S, S, S, E)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in tensors]


def forward_and_grads(fn, inputs, grad_out_seed=1, **kwargs):
    out = fn(*inputs, **kwargs)
    gen = torch.Generator().manual_seed(grad_out_seed)
    # bfloat16-representable values, so that every dtype gets exactly the same upstream gradient
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).bfloat16().to(out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def err_ratio(ref, got):
    """RMS error relative to the reference's RMS (fla's get_err_ratio)."""
    ref, got = ref.double(), got.double()
    return ((ref - got).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-8)).item()


# --------------------------------------------------------------------------------- the oracle itself


def loop_mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size, causal):
    """Per-pair Python loop of the documented definition (independent of both implementations)."""
    batch, length, s = q_quad.shape
    out = torch.zeros(batch, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            g = t // chunk_size
            for j in range(length):
                h = j // chunk_size
                w = 0.0
                if h == g and (j <= t or not causal):
                    w += max(float(q_quad[b, t] @ k_quad[b, j]) / math.sqrt(s), 0.0) ** 2 / chunk_size
                if causal and h < g:
                    w += float(q_lin[b, t] @ k_lin[b, j]) / (g * chunk_size)
                if not causal:
                    w += float(q_lin[b, t] @ k_lin[b, j]) / length
                out[b, t] += w * v[b, j]
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_naive_matches_per_pair_loop(causal):
    inputs = make_inputs(11, batch=1)
    expected = loop_mixed_chunk_attention(*inputs, chunk_size=4, causal=causal)
    torch.testing.assert_close(naive_mixed_chunk_attention(*inputs, chunk_size=4, causal=causal), expected)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_relu2_attention_matches_per_pair_loop(causal):
    q, k, _, _, v = make_inputs(9, batch=1)
    expected = torch.zeros(1, 9, E, dtype=torch.float64)
    for t in range(9):
        for j in range(9 if not causal else t + 1):
            expected[0, t] += max(float(q[0, t] @ k[0, j]) / math.sqrt(S), 0.0) ** 2 / 50 * v[0, j]
    torch.testing.assert_close(relu2_attention(q, k, v, causal=causal, norm=50), expected)


def test_single_chunk_is_relu2_attention_with_norm_c():
    """Causal, L <= C: one chunk, no earlier chunks, so FLASH reduces to FLASH-Quad with n = C."""
    qq, kq, ql, kl, v = make_inputs(13)
    torch.testing.assert_close(
        mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=16), relu2_attention(qq, kq, v, norm=16)
    )


# --------------------------------------------------------------------------------- chunked == naive


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_chunked_matches_naive_forward_and_grads(causal, length, chunk_size):
    inputs = make_inputs(length, seed=length + chunk_size, requires_grad=True)
    out, grads = forward_and_grads(mixed_chunk_attention, inputs, chunk_size=chunk_size, causal=causal)
    ref, ref_grads = forward_and_grads(naive_mixed_chunk_attention, inputs, chunk_size=chunk_size, causal=causal)
    assert out.shape == (2, length, E)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, g, rg in zip(("q_quad", "k_quad", "q_lin", "k_lin", "v"), grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("block", [1, 2, 5, 25, 26])
def test_prefix_blocks_are_invisible(block, monkeypatch):
    """The causal prefix of chunk states runs in blocks of PREFIX_BLOCK chunks with a carry between them; any
    block size (one chunk, a partial last block, exactly G, more than G) gives the oracle's output and grads."""
    monkeypatch.setattr(reference, "PREFIX_BLOCK", block)
    inputs = make_inputs(100, heads=2, seed=block, requires_grad=True)  # C = 4: G = 25 chunks
    out, grads = forward_and_grads(mixed_chunk_attention, inputs, chunk_size=4)
    ref, ref_grads = forward_and_grads(naive_mixed_chunk_attention, inputs, chunk_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_head_dim_is_independent_heads(causal):
    inputs = make_inputs(19, heads=3)
    out = mixed_chunk_attention(*inputs, chunk_size=4, causal=causal)
    assert out.shape == (2, 3, 19, E)
    for h in range(3):
        per_head = [x[:, h] for x in inputs]
        torch.testing.assert_close(out[:, h], naive_mixed_chunk_attention(*per_head, chunk_size=4, causal=causal))
        torch.testing.assert_close(
            relu2_attention(inputs[0], inputs[1], inputs[4], causal=causal, norm=19)[:, h],
            relu2_attention(per_head[0], per_head[1], per_head[4], causal=causal, norm=19),
        )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradcheck(causal):
    inputs = make_inputs(7, batch=1, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *x: mixed_chunk_attention(*x, chunk_size=3, causal=causal), inputs, eps=1e-6, atol=1e-5
    )
    q, k, _, _, v = inputs
    assert torch.autograd.gradcheck(
        lambda q, k, v: relu2_attention(q, k, v, causal=causal, norm=7), (q, k, v), eps=1e-6, atol=1e-5
    )


# --------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("position", [0, 3, 4, 5, 12, 16, 22])
def test_causal_perturbation_changes_no_earlier_output(position):
    """L = 23, C = 4 (padded last chunk): perturbing every input at `position` leaves outputs before it
    bit-identical and changes the output at it."""
    inputs = make_inputs(23)
    perturbed = [x.clone() for x in inputs]
    for x in perturbed:
        x[:, position] += torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)
    for fn, kwargs in (
        (mixed_chunk_attention, dict(chunk_size=4)),
        (naive_mixed_chunk_attention, dict(chunk_size=4)),
        (lambda qq, kq, ql, kl, v, **kw: relu2_attention(qq, kq, v, **kw), dict(norm=32)),
    ):
        before, after = fn(*inputs, **kwargs), fn(*perturbed, **kwargs)
        assert torch.equal(before[:, :position], after[:, :position])
        assert not torch.allclose(before[:, position], after[:, position])


def test_length_invariance():
    """Causal outputs for positions < L1 do not depend on how many tokens follow (norm is a constant)."""
    long_inputs = make_inputs(64)
    short_inputs = [x[:, :37] for x in long_inputs]
    for kwargs in (dict(chunk_size=8), dict(chunk_size=5)):
        short = mixed_chunk_attention(*short_inputs, **kwargs)
        long = mixed_chunk_attention(*long_inputs, **kwargs)
        torch.testing.assert_close(short, long[:, :37], rtol=1e-12, atol=1e-12)

    qs, ks, _, _, vs = short_inputs
    ql, kl, _, _, vl = long_inputs
    torch.testing.assert_close(
        relu2_attention(qs, ks, vs, norm=128), relu2_attention(ql, kl, vl, norm=128)[:, :37], rtol=1e-12, atol=1e-12
    )
    # Negative control: the public ports' runtime-length normaliser fails this very check.
    assert not torch.allclose(relu2_attention(qs, ks, vs, norm=37), relu2_attention(ql, kl, vl, norm=64)[:, :37])


# --------------------------------------------------------------------------------- padding / normalisers


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_linear_part_normaliser_counts_real_tokens_only(causal):
    """With q_quad = 0 the local part vanishes (relu(0) = 0), leaving only the global term: the mean of
    k_lin^T v over earlier whole chunks (causal) or over the L real tokens (bidirectional, padded to 12)."""
    qq, kq, ql, kl, v = make_inputs(10)
    out = mixed_chunk_attention(torch.zeros_like(qq), kq, ql, kl, v, chunk_size=4, causal=causal)
    expected = torch.zeros_like(out)
    for t in range(10):
        start = (t // 4) * 4
        if causal and start > 0:
            expected[:, t] = torch.einsum("bs,bjs,bje->be", ql[:, t], kl[:, :start], v[:, :start]) / start
        elif not causal:
            expected[:, t] = torch.einsum("bs,bjs,bje->be", ql[:, t], kl, v) / 10
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("length", [1, 3, 5, 9])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_no_nan_with_zero_inputs_first_chunk_and_padding(length, causal):
    zeros = [torch.zeros_like(x).requires_grad_() for x in make_inputs(length)]
    out, grads = forward_and_grads(mixed_chunk_attention, zeros, chunk_size=4, causal=causal)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.isfinite(g).all() for g in grads)

    inputs = make_inputs(length, requires_grad=True)
    out, grads = forward_and_grads(mixed_chunk_attention, inputs, chunk_size=4, causal=causal)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if causal:  # chunk 0 has no earlier chunk: no linear term at all (no 0/0)
        first = min(length, 4)
        expected = relu2_attention(inputs[0][:, :first], inputs[1][:, :first], inputs[4][:, :first], norm=4)
        torch.testing.assert_close(out[:, :first], expected)


def test_empty_sequence():
    inputs = make_inputs(0)
    for causal in (True, False):
        assert mixed_chunk_attention(*inputs, chunk_size=4, causal=causal).shape == (2, 0, E)
        assert naive_mixed_chunk_attention(*inputs, chunk_size=4, causal=causal).shape == (2, 0, E)
    assert relu2_attention(inputs[0], inputs[1], inputs[4], norm=4).shape == (2, 0, E)


# --------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_low_precision_close_to_float64(dtype, causal):
    """Same (rounded) values in float64 as the reference, so only the computation's error is measured.
    bfloat16 is computed in float32 inside: outputs and gradients are the float64 result rounded once to
    bfloat16 (a bfloat16 computation matches only about half of them)."""
    low = make_inputs(50, dtype=dtype, requires_grad=True)
    high = [x.detach().double().requires_grad_() for x in low]
    out, grads = forward_and_grads(mixed_chunk_attention, low, chunk_size=16, causal=causal)
    ref, ref_grads = forward_and_grads(mixed_chunk_attention, high, chunk_size=16, causal=causal)
    q, k, _, _, v = low
    quad = relu2_attention(q, k, v, causal=causal, norm=50)
    quad_ref = relu2_attention(*(x.detach().double() for x in (q, k, v)), causal=causal, norm=50)

    assert out.dtype == quad.dtype == dtype and all(g.dtype == dtype for g in grads)
    for ref_x, x in zip((ref, quad_ref, *ref_grads), (out, quad, *grads)):
        if dtype == torch.bfloat16:
            assert (x == ref_x.to(dtype)).double().mean() > 0.98
            assert err_ratio(ref_x, x) < 3e-3
        else:
            assert err_ratio(ref_x, x) < 1e-5


def test_autocast_does_not_lower_the_compute_precision():
    inputs = make_inputs(20, dtype=torch.float32)
    expected = mixed_chunk_attention(*inputs, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixed_chunk_attention(*inputs, chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, None])
def test_bad_chunk_size(chunk_size):
    for fn in (mixed_chunk_attention, naive_mixed_chunk_attention):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
            fn(*make_inputs(8), chunk_size=chunk_size)


@pytest.mark.parametrize("norm", [0, -1.0, float("nan"), float("inf"), "64", None])
def test_bad_norm(norm):
    q, k, _, _, v = make_inputs(8)
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        relu2_attention(q, k, v, norm=norm)


def test_norm_is_required_and_keyword_only():
    """No default (a forgotten constant would silently be 1) and not positional (no swap with `causal`)."""
    q, k, _, _, v = make_inputs(8)
    with pytest.raises(TypeError, match="norm"):
        relu2_attention(q, k, v)
    with pytest.raises(TypeError):
        relu2_attention(q, k, v, True, 8)


def test_bad_shapes():
    qq, kq, ql, kl, v = make_inputs(8)
    cases = [
        ((qq[0], kq, ql, kl, v), r"q_quad must be \[B, L, D\] or \[B, H, L, D\]"),
        ((qq, kq[..., :4], ql, kl, v), "k_quad must have the shape of q_quad"),
        ((qq, kq, ql, kl[:, :7], v), "k_lin must have the shape of q_quad"),
        ((qq, kq, ql, kl, v[:, :7]), "v must share the leading dims and length of q_quad"),
        ((qq, kq, ql, kl, v.long()), "v must be a floating-point tensor"),
    ]
    for args, message in cases:
        for fn in (mixed_chunk_attention, naive_mixed_chunk_attention):
            with pytest.raises((ValueError, TypeError), match=message):
                fn(*args, chunk_size=4)
    with pytest.raises(ValueError, match="v must share the leading dims and length of q"):
        relu2_attention(qq, kq, v[:1], norm=8)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        relu2_attention(qq, kq[:, :, :3], v, norm=8)


@pytest.mark.parametrize("query_start", [0, 1, 6])
def test_relu2_attention_rows_are_the_rows_of_the_causal_attention(query_start):
    """Incremental decoding: new queries at positions query_start.. over every key so far."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 9, 8, generator=g, dtype=torch.float64), torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    full = relu2_attention(q, k, v, causal=True, norm=9)
    end = query_start + 3
    rows = relu2_attention_rows(q[:, query_start:end], k[:, :end], v[:, :end], query_start, norm=9)
    torch.testing.assert_close(rows, full[:, query_start:end], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="keys and values"):
        relu2_attention_rows(q[:, query_start:end], k[:, : end - 1], v[:, : end - 1], query_start, norm=9)
