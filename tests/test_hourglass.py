"""Hourglass-specific tests: hierarchy parsing, the k-1 shift and causal attention pooling (leak tests that
fail on the known public-port mistakes), every resampling combination, cached decoding at odd chunkings."""

import dataclasses
import itertools
import types

import pytest
import torch
import torch.nn.functional as F

from hier_lm import generate
from hier_lm.models import Hourglass, HourglassConfig, build_model
from hier_lm.models import resampling
from hier_lm.models.hourglass import HierarchyLevel, parse_hierarchy
from hier_lm.models.layers import KVCache

TINY = dataclasses.asdict(HourglassConfig.tiny())  # the tests below give their own hierarchy
VOCAB = TINY["vocab_size"]


def tiny(**kwargs) -> Hourglass:
    torch.manual_seed(0)
    return Hourglass(**{**TINY, **kwargs}).eval()


def perturbed(tokens: torch.Tensor, s: int) -> torch.Tensor:
    out = tokens.clone()
    out[:, s] = (out[:, s] + 1) % VOCAB
    return out


def leaks(model: Hourglass, tokens: torch.Tensor, positions) -> list[int]:
    """The positions s whose perturbation changes some logit before s (a causality leak)."""
    reference = model(tokens)
    return [s for s in positions if not torch.equal(model(perturbed(tokens, s))[:, :s], reference[:, :s])]


# --------------------------------------------------------------------------------------------- hierarchy


def test_official_hierarchies_parse():
    assert parse_hierarchy("5@1 24@3 5@1") == (HierarchyLevel(5, 1, 5), HierarchyLevel(24, 3, 0))
    assert parse_hierarchy("2@1 2@3 4@9 2@3 2@1") == (
        HierarchyLevel(2, 1, 2), HierarchyLevel(2, 3, 2), HierarchyLevel(4, 9, 0))
    model = Hourglass(**{**TINY, "hierarchy": " 1@1  1@2 1@6 1@2 1@1 "})
    assert model.shorten_factors == (2, 3) and model.total_factor == 6


@pytest.mark.parametrize("spec, message", [
    ("5@1 24x3 5@1", "malformed hierarchy token '24x3'"),
    ("5@1 24@ 5@1", "malformed"),
    ("5@1 @3 5@1", "malformed"),
    ("5@1 2.5@3 5@1", "malformed"),
    ("", "non-empty"),
    ("5@1 24@3 4@1", "not a palindrome"),
    ("2@1 2@3 4@9 2@4 2@1", "not a palindrome"),
    ("2@1 2@3 2@3 2@1", "odd number"),
    ("5@1", "odd number"),
    ("2@1 2@3 4@8 2@3 2@1", "not divisible"),
    ("2@1 2@3 2@3 2@3 2@1", "repeats"),
    ("0@1 4@3 0@1", "needs >= 1"),
    ("2@1 -1@3 2@1", "needs >= 1"),
    ("2@1 4@0 2@1", "must be >= 1"),
    ("2@2 4@4 2@2", "must start and end at full length"),
])
def test_malformed_hierarchy_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_hierarchy(spec)
    with pytest.raises(ValueError, match=message):
        build_model({"name": "hourglass", **TINY, "hierarchy": spec})


def test_bad_options_are_clear_errors():
    for kwargs, message in [(dict(shortening="max"), "shortening must be"), (dict(upsampling="nearest"), "upsampling"),
                            (dict(attention_shortening_base="max"), "attention_shortening_base"),
                            (dict(attention_upsampling_base="x"), "attention_upsampling_base"),
                            (dict(pos="learned"), "pos must be one of 'rope', 'relative'; got 'learned'")]:
        with pytest.raises(ValueError, match=message):
            Hourglass(**{**TINY, "hierarchy": "1@1 1@2 1@1", **kwargs})


# ------------------------------------------------------------------------------------------- leak tests


@pytest.mark.parametrize("hierarchy", ["1@1 1@2 1@1", "1@1 1@3 1@1", "1@1 1@4 1@1", "1@1 1@2 1@6 1@2 1@1"])
def test_no_leak_at_any_position_around_group_boundaries(hierarchy):
    model = tiny(hierarchy=hierarchy)
    tokens = torch.randint(0, VOCAB, (1, 26), generator=torch.Generator().manual_seed(1))
    assert leaks(model, tokens, range(26)) == []


def _valley_without_shift(self, x, cache=None):
    xs = self._middle(self.shorten(x), None)
    return x + self.norm(self.upsample(xs, x))


@pytest.mark.parametrize("hierarchy, broken", [("1@1 1@2 1@1", 0), ("1@1 1@3 1@1", 0), ("1@1 1@4 1@1", 0),
                                               ("1@1 1@2 1@6 1@2 1@1", 1)])
@pytest.mark.parametrize("shortening", ["average", "attention"])
def test_leak_test_catches_a_missing_shift(hierarchy, broken, shortening):
    """Without the k-1 shift, group g carries tokens up to g*k+k-1 into position g*k: the test must see it
    (`broken` is the valley whose shift is removed; 1 = the inner one of a nested model)."""
    model = tiny(hierarchy=hierarchy, shortening=shortening, upsampling="repeat")
    valley = model.valley.inner if broken else model.valley
    valley.forward = types.MethodType(_valley_without_shift, valley)
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    found = leaks(model, tokens, range(24))
    assert found, "the leak test did not notice a missing shift"
    if not broken:  # exactly the positions that are not the first of their group leak
        assert found == [s for s in range(24) if s % valley.k]


def test_attention_pooling_query_sees_every_earlier_group_causally():
    """Shortened query g attends to every shifted slot of groups 0..g (not only its own group, the bug of the
    public port), and to nothing after: checked against an explicit loop and by perturbation."""
    torch.manual_seed(0)
    k, d = 3, 16
    pool = resampling.AttentionPooling(k, d, n_heads=2, d_ff=32, pos_scale=2).eval()
    slots = torch.randn(1, 5 * k, d)
    out = pool(slots)
    # explicit reference: one query at a time over the slots it may see
    attn = pool.attn
    h = pool.norm_in(slots)
    q_in = pool.norm_q(h.view(1, 5, k, d).mean(2))
    for g in range(5):
        visible = (g + 1) * k
        q = attn.rope(attn.q(q_in[:, g: g + 1]).view(1, 1, 2, 8).transpose(1, 2), torch.tensor([g * k * 2]))
        kk, v = attn.kv(h[:, :visible]).view(1, visible, 2, 2, 8).permute(2, 0, 3, 1, 4)
        kk = attn.rope(kk, (torch.arange(visible) - (k - 1)) * 2)
        y = torch.softmax(q @ kk.transpose(-1, -2) / 8 ** 0.5, -1) @ v
        ref = q_in[:, g: g + 1] + attn.out(y.transpose(1, 2).reshape(1, 1, d))
        ref = ref + pool.ffn(pool.norm_ff(ref))
        torch.testing.assert_close(out[:, g: g + 1], ref, rtol=1e-5, atol=1e-5)
    # query 3 depends on a slot of group 0, and not on any slot of group 4
    changed = slots.clone()
    changed[:, 1] += torch.randn(d)  # (not a constant: the LayerNorm would cancel it)
    assert not torch.allclose(pool(changed)[:, 3], out[:, 3])
    changed = slots.clone()
    changed[:, 4 * k] += torch.randn(d)
    assert torch.equal(pool(changed)[:, :4], out[:, :4])
    # the mask itself: query 3 sees the 12 slots of groups 0..3 (a bucket-only mask would see 3 of them)
    assert resampling.pooling_mask(3, 1, k, 5 * k)[0].tolist() == [True] * 12 + [False] * 3


def test_attention_upsampling_position_sees_groups_up_to_its_own():
    mask = resampling.upsampling_mask(0, 9, 3, 3)
    assert mask.tolist() == [[True, False, False]] * 3 + [[True, True, False]] * 3 + [[True, True, True]] * 3
    torch.manual_seed(0)
    up = resampling.AttentionUpsampling(3, 16, n_heads=2, d_ff=32).eval()
    xs, res = torch.randn(1, 3, 16), torch.randn(1, 9, 16)
    out = up(xs, res)
    changed = xs.clone()
    changed[:, 2] += torch.randn(16)
    assert torch.equal(up(changed, res)[:, :6], out[:, :6]) and not torch.allclose(up(changed, res)[:, 6:], out[:, 6:])


def test_shortened_layers_use_positions_in_original_token_units():
    model = tiny(hierarchy="1@1 1@2 1@6 1@2 1@1")
    assert model.valley.pre.blocks[0].attn.rope.scale == 2
    assert model.valley.inner.pre.blocks[0].attn.rope.scale == 6
    assert model.valley.shorten.pos_scale == 1 and model.valley.inner.shorten.pos_scale == 2


# ------------------------------------------------------------------------- every resampling combination

SHORTENINGS = [dict(shortening="average"), dict(shortening="linear"),
               dict(shortening="attention", attention_shortening_base="average"),
               dict(shortening="attention", attention_shortening_base="linear")]
UPSAMPLINGS = [dict(upsampling="repeat"), dict(upsampling="linear"),
               dict(upsampling="attention", attention_upsampling_base="repeat"),
               dict(upsampling="attention", attention_upsampling_base="linear")]
COMBOS = [{**a, **b} for a, b in itertools.product(SHORTENINGS, UPSAMPLINGS)]


def _name(combo):
    return "-".join(str(v) for v in combo.values())


@pytest.mark.parametrize("combo", COMBOS, ids=_name)
def test_every_combination_is_causal_and_caches_exactly(combo):
    model = tiny(hierarchy="1@1 1@3 1@1", **combo)
    tokens = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))  # 23: not a multiple
    assert leaks(model, tokens, (0, 2, 3, 4, 11, 12, 22)) == []
    full = model(tokens)
    for chunks in ((1, 2, 5, 3, 7, 4, 1), (23,), (4, 19)):
        cache, pieces, a = model.new_cache(), [], 0
        for c in chunks:
            pieces.append(model(tokens[:, a: a + c], cache=cache))
            a += c
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(hierarchy="1@1 1@2 1@4 1@2 1@1", shortening="attention", upsampling="attention"),
    dict(hierarchy="1@1 1@2 1@6 1@2 1@1", shortening="linear", upsampling="attention",
         attention_upsampling_base="linear"),
    dict(hierarchy="1@1 1@3 2@9 1@3 1@1", shortening="attention", attention_shortening_base="linear",
         upsampling="linear"),
], ids=["k2x2", "k2x3", "k3x3"])
def test_nested_cache_matches_full_forward_and_generation(kwargs):
    model = tiny(**kwargs)
    tokens = torch.randint(0, VOCAB, (2, 47), generator=torch.Generator().manual_seed(3))
    full = model(tokens)
    for chunks in ((1,) * 47, (2, 1, 5, 3, 7, 11, 13, 5), (9, 1, 1, 36)):
        cache, pieces, a = model.new_cache(), [], 0
        for c in chunks:
            pieces.append(model(tokens[:, a: a + c], cache=cache))
            a += c
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert leaks(model, tokens[:1], (0, 1, 5, 6, 17, 18, 36, 46)) == []
    prompt = tokens[:, :7]
    cached = generate(model, prompt, 30, use_cache=True, seed=5, temperature=0.9)
    assert torch.equal(cached, generate(model, prompt, 30, use_cache=False, seed=5, temperature=0.9))


def test_training_mode_with_dropout_runs_and_backpropagates():
    model = tiny(hierarchy="1@1 1@2 1@4 1@2 1@1", dropout=0.2).train()
    tokens = torch.randint(0, VOCAB, (2, 21))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------- paper configuration


def test_enwik8_paper_config_parameter_count():
    """`5@1 24@3 5@1`, d 512, 8 heads, d_ff 2048, attention pooling (average) + attention upsampling (repeat)."""
    with torch.device("meta"):  # constructed, never run: no memory, no init cost
        model = Hourglass(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, dropout=0.2, hierarchy="5@1 24@3 5@1",
                          shortening="attention", attention_shortening_base="average", upsampling="attention",
                          attention_upsampling_base="repeat", max_len=2048)
    n = sum(p.numel() for p in model.parameters())
    d, ff, V = 512, 2048, 256
    ln = 2 * d
    block = 4 * d * d + 2 * d * ff + ff + d + 2 * ln  # qkv + out, FFN with biases, two LayerNorms
    resampling_block = 4 * d * d + 2 * d * ff + ff + d + 3 * ln  # q, kv, out, FFN, three LayerNorms
    expected = 2 * V * d + 34 * block + 2 * resampling_block + 3 * ln + ln  # 3 stack norms + valley norm
    print(f"\nHourglass enwik8 config (5@1 24@3 5@1, RoPE): {n:,} parameters")
    assert n == expected
    assert 100e6 < n < 115e6


# ------------------------------------------------------------------------------------ relative attention


def test_relative_self_attention_matches_the_transformer_xl_formula():
    from hier_lm.models.relative_attention import RelativeBiases, RelativeSelfAttention, sinusoid

    torch.manual_seed(0)
    H, D, unit, L = 2, 8, 3, 7
    biases = RelativeBiases(H, D)
    torch.nn.init.normal_(biases.u)
    torch.nn.init.normal_(biases.v)
    attn = RelativeSelfAttention(H * D, H, 0.0, biases, unit).eval()
    x = torch.randn(1, L, H * D)
    q, k, v = attn.qkv(x).view(1, L, 3, H, D).permute(2, 0, 3, 1, 4)
    ref = torch.empty(1, H, L, D)
    for i in range(L):
        r = attn.rel.r(sinusoid(torch.arange(i, -1, -1) * unit, H * D)).view(i + 1, H, D).transpose(0, 1)
        scores = ((q[0, :, i:i + 1] + biases.u[:, None]) @ k[0, :, : i + 1].transpose(-1, -2)
                  + ((q[0, :, i:i + 1] + biases.v[:, None]) * r).sum(-1)[:, None]) / D ** 0.5
        ref[0, :, i] = (scores.softmax(-1) @ v[0, :, : i + 1])[:, 0]
    expected = attn.out(ref.transpose(1, 2).reshape(1, L, H * D))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    cache = KVCache()
    stepped = torch.cat([attn(x[:, :3], cache), attn(x[:, 3:4], cache), attn(x[:, 4:], cache)], 1)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


def tiny_relative(**kwargs) -> Hourglass:
    model = tiny(pos="relative", **kwargs)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero shared biases, so that the tests exercise them
        model.rel_biases.u.normal_()
        model.rel_biases.v.normal_()
    return model


def test_relative_biases_are_shared_and_distances_are_in_original_units():
    model = tiny_relative(hierarchy="1@1 1@2 1@6 1@2 1@1")
    rels = [m for m in model.modules() if type(m).__name__ == "RelativePosition"]
    assert len(rels) == 2 + 2 + 1 + 2 * 2  # full-length blocks, level-2 blocks, level-6 block, 2 x (pool + up)
    assert all(r.biases is model.rel_biases for r in rels)
    assert sum(p is model.rel_biases.u for p in model.parameters()) == 1
    assert model.valley.pre.blocks[0].attn.rel.unit == 2 and model.valley.inner.pre.blocks[0].attn.rel.unit == 6
    assert model.valley.shorten.attn.rel.unit == 1 and model.valley.inner.upsample.attn.rel.unit == 2


@pytest.mark.parametrize("kwargs, thorough", [
    (dict(hierarchy="1@1 1@2 1@6 1@2 1@1"), True),
    (dict(hierarchy="1@1 2@3 1@1", shortening="attention", attention_shortening_base="linear",
          upsampling="attention", attention_upsampling_base="linear"), False),
    (dict(hierarchy="1@1 1@2 1@4 1@2 1@1", shortening="average", upsampling="linear"), False),
], ids=["attention-nested", "attention-linear", "average-linear"])
def test_relative_is_causal_and_caches_exactly(kwargs, thorough):
    model = tiny_relative(**kwargs)
    tokens = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(4))
    assert leaks(model, tokens, (0, 1, 2, 3, 5, 6, 12, 13, 28)) == []
    full = model(tokens)
    for chunks in ((1,) * 29, (2, 5, 3, 7, 1, 11)) if thorough else ((2, 5, 3, 7, 1, 11),):
        cache, pieces, a = model.new_cache(), [], 0
        for c in chunks:
            pieces.append(model(tokens[:, a: a + c], cache=cache))
            a += c
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    if thorough:
        prompt = tokens[:, :4]
        cached = generate(model, prompt, 16, use_cache=True, seed=6)
        assert torch.equal(cached, generate(model, prompt, 16, use_cache=False, seed=6))


def test_enwik8_paper_config_parameter_count_with_relative_attention():
    with torch.device("meta"):
        model = Hourglass(vocab_size=256, d_model=512, n_heads=8, d_ff=2048, dropout=0.2, hierarchy="5@1 24@3 5@1",
                          pos="relative", max_len=2048)
    n = sum(p.numel() for p in model.parameters())
    print(f"\nHourglass enwik8 config (5@1 24@3 5@1, relative, as in the paper): {n:,} parameters")
    assert n == 113_680_384 + 36 * 512 * 512 + 2 * 512  # + W_r per attention layer + shared u, v
