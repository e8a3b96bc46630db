"""FLASH / FLASH-Quad: causality with a padded last chunk, length invariance (the public ports' bug), the
incremental-decoding cache against the full forward and its bounded size, one GAU against a by-hand oracle,
padding without NaN, and argument errors. The shared model contract (generation, overfit, ...) and the config
contract run on the `flash` entries of tests/test_models.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hier_lm.models.flash as flash_module
from hier_lm.models import FLASH
from hier_lm.models.layers import RotaryEmbedding
from hier_lm.ops.chunk_attention import naive_mixed_chunk_attention, relu2_attention

VOCAB, C, MAX_LEN = 32, 8, 64
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, s=16, dropout=0.0, max_len=MAX_LEN)
CONFIGS = {
    "quad": dict(mode="quad"),
    "chunk": dict(mode="chunk", chunk_size=C),
}


def make_model(mode: str, strong: bool = True, **overrides) -> FLASH:
    """A tiny FLASH. `strong`: LeCun-normal weights, so that every path, attention included, moves the logits
    by O(1) (at the N(0, 0.02) init the attention's share of the logits is ~1e-7: too faint to test)."""
    torch.manual_seed(0)
    model = FLASH(**{**BASE, **CONFIGS[mode], **overrides}).eval()
    if strong:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
            model.embed.weight.normal_()
    return model


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_causality_at_length_not_multiple_of_chunk(mode):
    """L = 29 (chunk mode pads the last of 4 chunks of 8): perturbing token s, at chunk ends and starts too,
    leaves every earlier logit bit-identical and changes the logit at s."""
    model = make_model(mode)
    tokens = random_tokens(2, 29)
    reference = model(tokens)
    for s in (0, 7, 8, 15, 16, 23, 24, 28):
        perturbed = tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1) % VOCAB
        out = model(perturbed)
        assert torch.equal(out[:, :s], reference[:, :s]), f"logits before {s} changed"
        assert not torch.allclose(out[:, s], reference[:, s]), f"token {s} had no effect on its own logits"


def _runtime_length_relu2(q, k, v, causal=True, *, norm, attn_impl="auto", bias=None):
    """The public ports' bug: normalise by the runtime length instead of the fixed constant."""
    return relu2_attention(q, k, v, causal=causal, norm=q.shape[-2], attn_impl=attn_impl, bias=bias)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_appending_tokens_does_not_change_earlier_outputs(mode, monkeypatch):
    """The logits of the first 21 tokens are the same whether 0 or 43 tokens follow (normalisers are
    constants, never the runtime length); the runtime-length normaliser fails this very check."""
    model = make_model(mode)
    tokens = random_tokens(2, MAX_LEN)
    short, long = model(tokens[:, :21]), model(tokens)[:, :21]
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)

    if mode == "quad":  # negative control: the check catches the bug it is meant for
        monkeypatch.setattr(flash_module, "relu2_attention", _runtime_length_relu2)
        assert not torch.allclose(model(tokens[:, :21]), model(tokens)[:, :21], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ cache


SPLITS = {
    "one-call": [50],
    "token-by-token": [1] * 50,
    "chunk-aligned": [8, 8, 16, 8, 10],
    "crossing": [3, 10, 17, 1, 19],  # 0-3, 3-13 (crosses 8), 13-30 (crosses 16 and 24), 30-31, 31-50
    "prefill-then-tokens": [13] + [1] * 37,
}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_cache_matches_full_forward(mode, split):
    model = make_model(mode)
    tokens = random_tokens(3, 50, seed=2)
    full = model(tokens)
    cache, pieces, start = model.new_cache(), [], 0
    for size in SPLITS[split]:
        pieces.append(model(tokens[:, start : start + size], cache=cache))
        start += size
    assert start == 50 and cache.n == 50
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_cache_under_bf16_autocast(mode):
    """bf16-mixed: the attention runs in float32 in both paths, so cached and full agree to bf16 rounding."""
    model = make_model(mode)
    tokens = random_tokens(2, 30, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(tokens)
        cache = model.new_cache()
        cached = torch.cat([model(tokens[:, a:b], cache=cache) for a, b in ((0, 11), (11, 12), (12, 30))], 1)
    assert full.dtype == cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), rtol=0.05, atol=0.05)
    assert (cached.float() - full.float()).abs().mean() < 0.005


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_cache_size(mode):
    """Chunk mode holds the current chunk only (61 = 7*8 + 5 tokens: 5 keys) and one [B, s, e] state, so a
    decoding step costs the same at any position; quad mode holds every key and value."""
    model = make_model(mode)
    cache = model.new_cache()
    tokens = random_tokens(2, 61)
    for t in range(61):
        model(tokens[:, t : t + 1], cache=cache)
    for layer in cache.layers:
        if mode == "chunk":
            assert layer.keys.shape == layer.lin_keys.shape == (2, 61 % C, 16)
            assert layer.values.shape == (2, 61 % C, 64)
            assert layer.state.shape == (2, 16, 64)
        else:
            assert layer.keys.shape == (2, 61, 16) and layer.values.shape == (2, 61, 64)
            assert layer.state is None


# ------------------------------------------------------------------------------------------ one GAU


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_gau_matches_oracle(mode):
    """One GAU written out from its weights, with the dense attention oracle: relu^2 / max_len over the
    causal prefix (quad), `naive_mixed_chunk_attention` with C = 8 (chunk). Pins the split of the projection,
    which scale/offset row is which q or k, the RoPE positions and the fixed normalisers, forward and gradients
    (of the input and every weight). Float64."""
    model = make_model(mode).double()
    gau = model.blocks[0].gau
    x = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)

    u, v, z = F.silu(x @ gau.uvz.weight.T + gau.uvz.bias).split([64, 64, 16], dim=-1)
    rope, positions = RotaryEmbedding(16).double(), torch.arange(21)
    qk = [rope(z * gamma + beta, positions) for gamma, beta in zip(gau.qk.gamma, gau.qk.beta)]
    if mode == "quad":
        q, k = qk
        weights = torch.relu(q @ k.transpose(1, 2) / math.sqrt(16)).square() / MAX_LEN
        weights = weights * (positions[None, :] <= positions[:, None])
        attended = weights @ v
    else:
        attended = naive_mixed_chunk_attention(*qk, v, chunk_size=C)
    expected = (u * attended) @ gau.out.weight.T + gau.out.bias

    out = gau(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs, cotangent = (x, *gau.parameters()), torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, cotangent), torch.autograd.grad(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_silu_split_backward_matches_silu_then_split():
    """The fused backward of `silu_split`, also when a part is unused (autograd passes it zeros)."""
    h = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    a, b, c = flash_module.silu_split(h, (4, 3, 2))
    ra, rb, rc = F.silu(h).split((4, 3, 2), dim=-1)
    for got, want in zip((a, b, c), (ra, rb, rc)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ga, gc = torch.randn_like(a), torch.randn_like(c)
    (got,) = torch.autograd.grad((a * ga).sum() + (c * gc).sum(), h)
    (want,) = torch.autograd.grad((ra * ga).sum() + (rc * gc).sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert (got[..., 4:7] == 0).all()


# ------------------------------------------------------------------------------------------ padding, options


@pytest.mark.parametrize("length", [1, 7, 8, 9, 17])
def test_padded_chunks_give_finite_logits_and_grads(length):
    model = make_model("chunk").train()
    logits = model(random_tokens(2, length))
    logits.square().mean().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_layernorm_and_expansion_options_overfit(mode):
    """The non-default options (LayerNorm, e = d) still learn from the default init: 4 random sequences."""
    model = make_model(mode, strong=False, norm="layernorm", expansion=1).train()
    assert model.blocks[0].gau.out.in_features == 32 and isinstance(model.norm, torch.nn.LayerNorm)
    batch = random_tokens(4, 25, seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"could not overfit 4 sequences: loss {loss.item():.3f}"


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_bidirectional_sees_the_future_and_has_no_cache(mode):
    model = make_model(mode, causal=False)
    tokens = random_tokens(2, 20)
    perturbed = tokens.clone()
    perturbed[:, 19] = (perturbed[:, 19] + 1) % VOCAB
    assert not torch.allclose(model(tokens)[:, 0], model(perturbed)[:, 0])
    with pytest.raises(ValueError, match="causal=True"):
        model.new_cache()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="linear"), "mode must be one of 'chunk', 'quad'; got 'linear'"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(chunk_size=2.5), "chunk_size must be an integer >= 1"),
        (dict(s=15), "s .* must be an even integer"),
        (dict(norm="rmsnorm"), "norm must be one of 'scalenorm', 'layernorm'; got 'rmsnorm'"),
        (dict(expansion=0), "expansion must be a number > 0"),
        (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (dict(max_len=0), "max_len must be an integer >= 1"),
        (dict(n_layers=0), "n_layers must be an integer >= 1"),
        (dict(d_model=0), "d_model must be an integer >= 1"),
        (dict(causal="yes"), "causal must be true or false"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FLASH(**{**BASE, "mode": "chunk", "chunk_size": C, **kwargs})


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_bad_inputs(mode):
    model = make_model(mode)
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\]"):
        model(torch.zeros(5, dtype=torch.long))
