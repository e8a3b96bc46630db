"""H-Transformer-1D model: cached incremental decoding against the uncached operator and model, its bounded
per-token state and work, causality at deep hierarchies, the bidirectional encoder and classifier (padding,
pooling), argument errors and a tiny classification overfit. The shared LM contract tests (causality,
cache == full, cached == uncached generation, overfit) run on the `h_transformer` cases of tests/test_models.py."""

import math

import pytest
import torch

from hier_lm.models import HTransformer1D, build_model
from hier_lm.ops import h_attention
from hier_lm.ops.h_attention import cache as ht

F64 = torch.float64
VOCAB = 32


def tiny(**kwargs):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, block_size=4,
                  max_len=256, pos="hrpb")
    model = HTransformer1D(**{**config, **kwargs}).eval()
    with torch.no_grad():  # a sizeable h-RPB, so that a wrong relative position in any path shows
        for block in model.blocks:
            if block.attn.rpb is not None:
                block.attn.rpb.normal_(0.0, 1.0)
    return model


def qkv(length, batch=2, heads=3, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=F64) for _ in range(3))
    return 2 * q, 2 * k, v


def decode_in_chunks(q, k, v, chunks, nr, **kwargs):
    cache, outs, start = ht.HAttentionCache(), [], 0
    for size in chunks:
        outs.append(ht.h_attention_decode(q[:, :, start:start + size], k[:, :, start:start + size],
                                          v[:, :, start:start + size], cache, nr, **kwargs))
        start += size
    assert start == q.shape[2] and cache.n == start
    return torch.cat(outs, dim=2), cache


# ------------------------------------------------------------------------------ 1. the decode operator


@pytest.mark.parametrize("value_coarsening", ["sum", "mean"])
@pytest.mark.parametrize("length, nr, chunks", [
    (130, 2, [1] * 130),                  # one token at a time, 7 levels
    (100, 4, [3, 1, 1, 29, 2, 64]),       # chunks straddling groups of every level
    (97, 8, [97]),                        # one chunk = the uncached operator on a fresh cache
    (77, 4, [16, 16, 16, 16, 13]),        # chunks aligned to blocks
])
def test_decode_operator_equals_uncached_h_attention(length, nr, chunks, value_coarsening):
    q, k, v = qkv(length, seed=length)
    rpb = torch.randn(3, 4 * nr - 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    full = h_attention(q, k, v, nr, causal=True, value_coarsening=value_coarsening, rpb=rpb)
    got, _ = decode_in_chunks(q, k, v, chunks, nr, value_coarsening=value_coarsening, rpb=rpb)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_decode_operator_keeps_bounded_state_and_does_bounded_work(monkeypatch):
    """One token at a time up to 300 tokens: every level's buffer holds < 2*Nr groups and one far-field
    row, there are at most log2(T) + 1 levels, and each token scores at most 2*Nr near keys plus Nr far keys
    per level whose group it starts -- nothing grows with T."""
    nr, length = 4, 300
    q, k, v = qkv(length, batch=1, heads=1)
    calls, window_partial = [], ht._window_partial

    def counting(query, keys, values, start, first, allowed, *rest):
        calls.append(tuple(allowed.shape))  # (queries, keys scored per query)
        return window_partial(query, keys, values, start, first, allowed, *rest)

    monkeypatch.setattr(ht, "_window_partial", counting)
    cache = ht.HAttentionCache()
    for t in range(length):
        calls.clear()
        ht.h_attention_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache, nr)
        n = t + 1
        assert len(cache.keys) <= math.floor(math.log2(n)) + 1
        assert all(x.shape[2] < 2 * nr for x in (*cache.keys, *cache.values)), [x.shape for x in cache.keys]
        assert all(p.numerator.shape[2] == 1 for p in cache.partials.values())
        starts_group = [level for level in range(1, len(cache.keys)) if t % 2**level == 0 and t >> level >= nr]
        assert calls[-1] == (1, 2 * nr)  # the near field
        assert sorted(calls[:-1]) == [(1, nr)] * len(starts_group), (t, calls)
    assert len(cache.keys) == 9  # levels 0..8 exist at T = 300, and yet every buffer stayed small


# ------------------------------------------------------------------------------ 2. the model's cache


@pytest.mark.parametrize("pos, value_coarsening, nr", [("hrpb", "sum", 2), ("rope", "mean", 4), ("rope", "sum", 2),
                                                       ("hrpb", "mean", 8)])
@pytest.mark.slow
def test_model_cache_equals_full_forward(pos, value_coarsening, nr):
    model = tiny(pos=pos, value_coarsening=value_coarsening, block_size=nr)
    tokens = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    odd = 2 * nr + 1  # chunks of 2Nr + 1 tokens, then the rest and an empty chunk
    for chunks in ([1] * 150, [5, 1, 17, 40, 3, 84], [odd] * (150 // odd) + [150 % odd, 0]):
        cache, pieces, start = model.new_cache(), [], 0
        for size in chunks:
            pieces.append(model(tokens[:, start:start + size], cache=cache))
            start += size
        assert cache.n == 150
        assert all(x.shape[2] < 2 * nr for layer in cache.layers for x in (*layer.keys, *layer.values))
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos", ["hrpb", "rope"])
def test_causality_bit_identical_at_deep_hierarchies(pos):
    """L = 83 with Nr = 2 has 6 levels; perturbations at group starts and inside groups of every level."""
    model = tiny(pos=pos, block_size=2)
    tokens = torch.randint(0, VOCAB, (2, 83), generator=torch.Generator().manual_seed(3))
    reference = model(tokens)
    for s in (0, 3, 4, 31, 32, 64, 65, 82):
        perturbed = tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1) % VOCAB
        out = model(perturbed)
        assert torch.equal(out[:, :s], reference[:, :s]), f"position {s} leaks into earlier logits"
        assert not torch.equal(out[:, s:], reference[:, s:])


def test_padding_of_the_uncached_path_never_leaks():
    """The logits of a prefix are those of the longer sequence, whatever the internal padding of each."""
    model = tiny(block_size=4)
    tokens = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(4))
    full = model(tokens)
    for length in (1, 9, 33, 64, 65):
        torch.testing.assert_close(model(tokens[:, :length]), full[:, :length], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ 3. encoder and classifier


def test_bidirectional_encoder_sees_every_token():
    model = tiny(causal=False, block_size=4)
    tokens = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(5))
    reference = model(tokens)
    assert reference.shape == (1, 45, VOCAB)
    for s in (0, 7, 22, 44):
        perturbed = tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1) % VOCAB
        changed = (model(perturbed) != reference).any(-1)[0]
        assert changed.all(), f"changing token {s} leaves positions {(~changed).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_h_attention_lengths_equal_each_row_alone(causal):
    q, k, v = qkv(37, batch=3)
    lengths = torch.tensor([37, 20, 0])
    q[1, :, 20:], k[1, :, 20:], v[1, :, 20:] = 1e4, -1e4, float("nan")  # garbage in the padding
    rpb = torch.randn(4 * 4 - 1, dtype=F64)
    out = h_attention(q, k, v, 4, causal=causal, rpb=rpb, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = h_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], 4, causal=causal, rpb=rpb)
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[b, :, n:], torch.zeros_like(out[b, :, n:]))
    with pytest.raises(ValueError, match="lengths"):
        h_attention(q, k, v, 4, lengths=torch.tensor([38, 1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        h_attention(q, k, v, 4, lengths=torch.tensor([3, 1]))


def test_classifier_pools_the_real_tokens_only():
    model = tiny(causal=False, num_classes=5, block_size=4)
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([40, 23, 1])
    logits = model(tokens, lengths=lengths)
    assert logits.shape == (3, 5)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[b], model(tokens[b:b + 1, :n])[0], rtol=1e-5, atol=1e-6)
    garbage = tokens.clone()
    garbage[1, 23:] = (garbage[1, 23:] + 3) % VOCAB
    torch.testing.assert_close(model(garbage, lengths=lengths), logits, rtol=1e-5, atol=1e-6)
    assert model(tokens).shape == (3, 5)  # no lengths: all tokens are real


def test_classifier_overfits_a_tiny_task():
    model = tiny(causal=False, num_classes=3, block_size=4, pos="rope").train()
    gen = torch.Generator().manual_seed(7)
    tokens, labels = torch.randint(0, VOCAB, (8, 24), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    lengths = torch.tensor([24, 20, 17, 24, 9, 13, 24, 5])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(tokens, lengths=lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"could not fit 8 labelled sequences: loss {loss.item():.3f}"


# ------------------------------------------------------------------------------ 4. errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(pos="learned"), "pos must be one of"),
    (dict(value_coarsening="max"), "value_coarsening"),
    (dict(block_size=3), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(d_model=12, n_heads=4, pos="rope"), "even head dim"),
    (dict(num_classes=3), "causal=False"),
    (dict(num_classes=0, causal=False), "num_classes"),
    (dict(max_len=0), "max_len"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HTransformer1D(**{**dict(vocab_size=VOCAB, d_model=32, n_heads=4), **kwargs})


def test_bad_calls_are_clear_errors():
    model = tiny(max_len=20)
    cache = model.new_cache()
    model(torch.zeros(1, 15, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="causal=True"):
        tiny(causal=False).new_cache()
    with pytest.raises(ValueError, match="HTransformer1DConfig has no option 'n_levels'"):
        build_model(dict(name="h_transformer", n_levels=3))
