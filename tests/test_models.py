"""The properties every model must have: causality, cached == uncached, overfit, any length up to max."""

import pytest
import torch

from hier_lm import generate
from hier_lm.models import build_model

VOCAB = 32
# One tiny config per model family; every test below runs on each of them.
TINY = {
    "transformer-rope": dict(name="transformer", d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                             max_len=64, pos="rope"),
    "transformer-learned": dict(name="transformer", d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                                max_len=64, pos="learned"),
    "hourglass-attention": dict(name="hourglass", d_model=32, n_heads=4, d_ff=64, dropout=0.0, max_len=64,
                                hierarchy="2@1 2@3 2@1", shortening="attention", upsampling="attention",
                                pos="rope"),
    "hourglass-nested-average-repeat": dict(name="hourglass", d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                                            max_len=64, hierarchy="1@1 1@2 1@4 1@2 1@1", shortening="average",
                                            upsampling="repeat"),
    "hourglass-linear": dict(name="hourglass", d_model=32, n_heads=4, d_ff=64, dropout=0.0, max_len=64,
                             hierarchy="1@1 2@4 1@1", shortening="linear", upsampling="linear"),
    "hourglass-relative": dict(name="hourglass", d_model=32, n_heads=4, d_ff=64, dropout=0.0, max_len=64,
                               hierarchy="1@1 2@3 1@1", shortening="attention", upsampling="repeat",
                               pos="relative"),
    "flash-quad": dict(name="flash", d_model=32, n_layers=2, s=16, dropout=0.0, max_len=64, mode="quad"),
    "flash-chunk": dict(name="flash", d_model=32, n_layers=2, s=16, dropout=0.0, max_len=64, mode="chunk",
                        chunk_size=8),
    "h_transformer-hrpb": dict(name="h_transformer", d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                               block_size=4, max_len=64, pos="hrpb"),
    "h_transformer-rope": dict(name="h_transformer", d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                               block_size=4, max_len=64, pos="rope", value_coarsening="mean"),
}


@pytest.fixture(params=sorted(TINY))
def model(request):
    torch.manual_seed(0)
    return build_model({**TINY[request.param], "vocab_size": VOCAB}).eval()


def test_logits_shape_at_any_length(model):
    for length in (1, 2, 7, 33, model.max_len):
        assert model(torch.randint(0, VOCAB, (2, length))).shape == (2, length, VOCAB)


def test_causality_bit_identical(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 45))
    reference = model(tokens)
    for s in (0, 1, 17, 44):
        perturbed = tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1 + torch.randint(0, VOCAB - 1, (2,))) % VOCAB
        out = model(perturbed)
        assert torch.equal(out[:, :s], reference[:, :s]), f"logits before {s} changed"
        assert not torch.equal(out[:, s:], reference[:, s:]), "the perturbation had no effect at all"


def test_cache_matches_full_forward(model):
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (3, 40))
    full = model(tokens)
    cache = model.new_cache()
    pieces = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 23), (23, 40))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)])
def test_generation_cached_equals_uncached(model, sampling):
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 30, use_cache=True, seed=7, **sampling)
    uncached = generate(model, prompt, 30, use_cache=False, seed=7, **sampling)
    assert cached.shape == (2, 35)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


def test_generation_is_seeded(model):
    a = generate(model, [1, 2, 3], 20, seed=1)
    assert torch.equal(a, generate(model, [1, 2, 3], 20, seed=1))
    assert not torch.equal(a, generate(model, [1, 2, 3], 20, seed=2))
    with pytest.raises(ValueError, match="T >= 1"):
        generate(model, [], 3, seed=0)


@pytest.mark.parametrize("prompt_len", [3, 100])
def test_generation_beyond_max_len_restarts_the_context_in_both_modes(model, prompt_len):
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(5))
    n = 2 * model.max_len + 7
    cached = generate(model, prompt, n, use_cache=True, seed=3)
    assert cached.shape == (prompt_len + n,)
    assert torch.equal(cached, generate(model, prompt, n, use_cache=False, seed=3))


def test_overfits_a_tiny_batch(model):
    torch.manual_seed(4)
    model.train()
    batch = torch.randint(0, VOCAB, (4, 33))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"could not overfit 4 sequences: loss {loss.item():.3f}"
