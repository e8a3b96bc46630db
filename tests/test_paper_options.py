"""The papers' options beside hier_lm's own choices: H-Transformer-1D's attention dropout (`h_attention`'s
`dropout_p`, the model's `attn_dropout`), FLASH's appendix relu^2 scaling (`relu2_scaling="paper"`) and its
learned relative position bias (`rel_pos_bias`, the ops' `bias`). Each: the exact formula, causality, cached ==
uncached, the Triton dispatch rule, a tiny overfit."""

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from hier_lm import generate
from hier_lm.models import FLASH, HTransformer1D
from hier_lm.models.flash import FLASHConfig
from hier_lm.models.h_transformer import HTransformer1DConfig
from hier_lm.models.layers import RotaryEmbedding
from hier_lm.ops import (
    h_attention,
    h_attention_level_masks,
    mixed_chunk_attention,
    naive_mixed_chunk_attention,
    relu2_attention,
    relu2_attention_rows,
)

VOCAB = 32
H_ATTENTION = importlib.import_module("hier_lm.ops.h_attention")  # the package (hier_lm.ops.h_attention: the function)
CHUNK_ATTENTION = importlib.import_module("hier_lm.ops.chunk_attention")


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def overfit_loss(model: torch.nn.Module, steps: int) -> float:
    """The final training loss on 4 random sequences of 24 tokens after `steps` Adam steps."""
    model.train()
    batch = tokens(4, 25, seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def assert_causal(model: torch.nn.Module, length: int, seed_each_call: bool = False) -> None:
    """Perturbing token s leaves every logit before s bit-identical and changes some logit from s on; with
    `seed_each_call` (dropout on) each forward draws the same dropout masks."""
    def forward(x):
        if seed_each_call:
            torch.manual_seed(11)
        return model(x)

    reference_tokens = tokens(2, length)
    reference = forward(reference_tokens)
    for s in (0, 3, 8, 17, length - 1):
        perturbed = reference_tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1) % VOCAB
        out = forward(perturbed)
        assert torch.equal(out[:, :s], reference[:, :s]), f"logits before {s} changed"
        assert not torch.equal(out[:, s:], reference[:, s:]), "the perturbation had no effect at all"


def assert_cache_equals_full_forward(model: torch.nn.Module) -> None:
    """Cached decoding in pieces (one of them a single token) equals the uncached forward, and cached generation
    equals uncached generation."""
    x = tokens(2, 40, seed=2)
    full = model(x)
    cache = model.new_cache()
    pieces = [model(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 23), (23, 40))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    prompt = tokens(2, 5, seed=3)
    cached = generate(model, prompt, 20, use_cache=True, seed=7, temperature=1.0)
    assert torch.equal(cached, generate(model, prompt, 20, use_cache=False, seed=7, temperature=1.0))


# ================================================================== H-Transformer-1D attention dropout: the op


def test_zero_dropout_is_the_plain_operator():
    q, k, v = (random(2, 3, 37, 8, seed=i) for i in range(3))
    torch.testing.assert_close(h_attention(q, k, v, 4, dropout_p=0.0), h_attention(q, k, v, 4), rtol=0, atol=0)


def test_dropout_zeroes_fine_weights_at_rate_p_and_rescales_the_kept_ones():
    """L <= 2 Nr is one level of exact (fine) weights: with v = identity the output row is the weight row. About
    p of the allowed weights are zero (4 x 4 x 136 = 2176 of them: 5 standard deviations = 0.05), the kept ones
    are the undropped weights / (1 - p), and nothing outside the causal triangle appears."""
    p, length = 0.3, 16
    q, k = random(4, 4, length, 8, seed=0), random(4, 4, length, 8, seed=1)
    eye = torch.eye(length, dtype=torch.float64).expand(4, 4, length, length)
    weights = h_attention(q, k, eye, 8)
    torch.manual_seed(0)
    dropped = h_attention(q, k, eye, 8, dropout_p=p)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand_as(weights)
    assert (dropped[~allowed] == 0).all()
    kept = dropped[allowed] != 0
    assert abs((1 - kept.double().mean()).item() - p) < 0.05
    torch.testing.assert_close(dropped[allowed][kept], weights[allowed][kept] / (1 - p), rtol=1e-12, atol=0)


def test_dropout_drops_each_coarse_weight_as_a_whole_at_rate_p():
    """At level l >= 1 one coarse weight stands for a 2**l x 2**l tile of (query, key) pairs (the official code
    drops the hierarchical weights after the partition): every tile is kept or dropped as a whole, the kept tiles
    are scaled by 1 / (1 - p), and about p of the tiles are dropped."""
    p, length, nr = 0.4, 64, 4
    q, k = random(4, 4, length, 8, seed=2), random(4, 4, length, 8, seed=3)
    eye = torch.eye(length, dtype=torch.float64).expand(4, 4, length, length)
    weights = h_attention(q, k, eye, nr)
    torch.manual_seed(1)
    dropped = h_attention(q, k, eye, nr, dropout_p=p)
    masks = h_attention_level_masks(length, nr)
    tiles = kept_tiles = 0
    for level in range(1, masks.shape[0]):
        size = 2**level
        kept = (dropped != 0).double().unflatten(-1, (-1, size)).unflatten(-3, (-1, size))  # [B, H, a, 2^l, c, 2^l]
        covered = masks[level].unflatten(0, (-1, size)).unflatten(-1, (-1, size))[:, 0, :, 0]  # [a, c]
        tile_mean = kept.mean((-1, -3))[..., covered]  # [B, H, tiles]
        assert ((tile_mean == 0) | (tile_mean == 1)).all(), f"a level-{level} tile was dropped in part"
        tiles, kept_tiles = tiles + tile_mean.numel(), kept_tiles + tile_mean.sum().item()
    assert tiles > 1500 and abs(1 - kept_tiles / tiles - p) < 0.06
    level_of_pair = masks.any(0) & ~masks[0]
    nonzero = dropped[..., level_of_pair] != 0
    torch.testing.assert_close(dropped[..., level_of_pair][nonzero], weights[..., level_of_pair][nonzero] / (1 - p),
                               rtol=1e-12, atol=0)


def test_dropout_keeps_causality_gradients_of_later_inputs_are_zero():
    """One forward with dropout (5 levels at L = 61, Nr = 4): the output at t has zero gradient with respect to
    q, k, v at every position after t, and a non-zero one with respect to its own inputs."""
    q, k, v = (random(2, 2, 61, 4, seed=i).requires_grad_() for i in range(3))
    torch.manual_seed(2)
    out = h_attention(q, k, v, 4, dropout_p=0.5)
    for t in (0, 3, 4, 15, 16, 33, 60):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        for name, grad in zip("qkv", grads):
            assert (grad[:, :, t + 1:] == 0).all(), f"output {t} depends on later {name}"
        assert grads[2][:, :, :t + 1].abs().sum() > 0, f"output {t} ignores its own values"


def test_the_triton_rule_auto_takes_the_reference_and_triton_is_refused(monkeypatch):
    """With dropout_p > 0: 'auto' runs the PyTorch reference even where it would pick the kernels (the same draw
    as attn_impl='torch'), an explicit 'triton' is a one-line error; the model refuses the combination at build."""
    q, k, v = (random(1, 2, 20, 4, seed=i) for i in range(3))
    monkeypatch.setattr(H_ATTENTION, "resolve_impl", lambda impl, tensor: "torch" if impl == "torch" else "triton")
    torch.manual_seed(3)
    auto = h_attention(q, k, v, 4, dropout_p=0.2, attn_impl="auto")
    torch.manual_seed(3)
    torch.testing.assert_close(auto, h_attention(q, k, v, 4, dropout_p=0.2, attn_impl="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no attention dropout"):
        h_attention(q, k, v, 4, dropout_p=0.2, attn_impl="triton")
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\)"):
        h_attention(q, k, v, 4, dropout_p=1.0)
    with pytest.raises(ValueError, match="attn_dropout=0"):
        HTransformer1D(attn_impl="triton", attn_dropout=0.1)
    with pytest.raises(ValueError, match="attn_dropout must be a probability"):
        HTransformer1D(attn_dropout=1.5)


# ================================================================== H-Transformer-1D attention dropout: the model


def h_transformer(**overrides) -> HTransformer1D:
    torch.manual_seed(0)
    return HTransformer1D(dataclasses.replace(HTransformer1DConfig.tiny(), **overrides)).eval()


def test_eval_mode_is_unchanged_and_training_mode_drops():
    """The same weights with attn_dropout 0 and 0.3: equal in eval mode (bit for bit), different in training
    mode (the only dropout of the model is the attention's: dropout=0)."""
    plain, with_dropout = h_transformer(), h_transformer(attn_dropout=0.3)
    x = tokens(2, 45)
    assert torch.equal(plain(x), with_dropout(x))
    assert torch.equal(plain.train()(x), plain(x))
    assert not torch.equal(with_dropout.train()(x), plain(x))


@pytest.mark.parametrize("pos", ["hrpb", "rope"])
def test_causality_with_attention_dropout_on(pos):
    assert_causal(h_transformer(attn_dropout=0.3, pos=pos, block_size=2).train(), length=45, seed_each_call=True)


def test_cache_equals_full_forward_in_eval_mode_with_attention_dropout():
    assert_cache_equals_full_forward(h_transformer(attn_dropout=0.3))


@pytest.mark.slow
def test_h_transformer_with_attention_dropout_overfits():
    assert overfit_loss(h_transformer(attn_dropout=0.1), 150) < 0.1


# ================================================================== FLASH: the relative position bias in the ops


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_chunk_bias_equals_the_dense_oracle_forward_and_backward(causal):
    """The chunked reference with a bias table against the dense L x L oracle, gradients of the table included;
    L = 21 with C = 5 pads the last chunk."""
    leaves = [random(2, 21, 8, seed=i).requires_grad_() for i in range(4)] + [random(2, 21, 6, seed=4)]
    bias = random(9, seed=5).requires_grad_()
    leaves[-1].requires_grad_()
    out = mixed_chunk_attention(*leaves, chunk_size=5, causal=causal, bias=bias)
    want = naive_mixed_chunk_attention(*leaves, chunk_size=5, causal=causal, bias=bias)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    cotangent = random(2, 21, 6, seed=6)
    for got, expected in zip(torch.autograd.grad(out, (*leaves, bias), cotangent),
                             torch.autograd.grad(want, (*leaves, bias), cotangent)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out, mixed_chunk_attention(*leaves, chunk_size=5, causal=causal))


def test_relu2_bias_is_the_toeplitz_matrix_inside_the_relu_and_rows_agree():
    """relu(q k / sqrt(S) + b[N - 1 + j - t])^2 / n written out; the decoding rows equal the full rows; keys
    further than N - 1 share the end entries (table of 2 * 8 - 1 at L = 12)."""
    q, k, v = random(2, 12, 8, seed=0), random(2, 12, 8, seed=1), random(2, 12, 3, seed=2)
    bias = random(15, seed=3)
    t = torch.arange(12)
    table = bias[(7 + t[None, :] - t[:, None]).clamp(0, 14)]
    weights = torch.relu(q @ k.transpose(1, 2) / math.sqrt(8) + table).square() / 30.0
    expected = weights.masked_fill(t[None, :] > t[:, None], 0.0) @ v
    full = relu2_attention(q, k, v, norm=30.0, bias=bias)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(relu2_attention_rows(q[:, 7:], k, v, 7, norm=30.0, bias=bias), full[:, 7:],
                               rtol=1e-12, atol=1e-12)


def test_bias_runs_on_the_reference_and_triton_refuses_it(monkeypatch):
    q, k, v = random(1, 10, 4, seed=0), random(1, 10, 4, seed=1), random(1, 10, 4, seed=2)
    bias = random(9, seed=3)
    monkeypatch.setattr(CHUNK_ATTENTION, "resolve_impl", lambda impl, tensor: "torch" if impl == "torch" else "triton")
    auto = mixed_chunk_attention(q, k, q, k, v, chunk_size=5, bias=bias, attn_impl="auto")
    torch.testing.assert_close(auto, naive_mixed_chunk_attention(q, k, q, k, v, chunk_size=5, bias=bias))
    with pytest.raises(ValueError, match="no relative position bias"):
        relu2_attention(q, k, v, norm=10.0, bias=random(19, seed=3), attn_impl="triton")
    with pytest.raises(ValueError, match="odd length"):
        mixed_chunk_attention(q, k, q, k, v, chunk_size=5, bias=random(8, seed=3))
    with pytest.raises(ValueError, match="rel_pos_bias=false"):
        FLASH(rel_pos_bias=True, attn_impl="triton")


# ================================================================== FLASH: relu2_scaling and rel_pos_bias, the model

C, MAX_LEN = 8, 64
OPTIONS = [dict(relu2_scaling="paper"), dict(rel_pos_bias=True), dict(relu2_scaling="paper", rel_pos_bias=True)]
OPTION_IDS = ["paper", "bias", "paper-bias"]


def flash(mode: str, **overrides) -> FLASH:
    torch.manual_seed(0)
    config = dataclasses.replace(FLASHConfig.tiny(), mode=mode, chunk_size=C, max_len=MAX_LEN, **overrides)
    model = FLASH(config).eval()
    for block in model.blocks:  # a visible bias (its N(0, 0.02) init moves the logits by ~1e-6 only)
        if block.gau.pos_bias is not None:
            with torch.no_grad():
                block.gau.pos_bias.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("mode", ["quad", "chunk"])
@pytest.mark.parametrize("bias", [False, True])
def test_paper_scaling_is_the_appendix_formula(mode, bias):
    """One GAU written out with the appendix's weights relu(q k / n + b)^2 (n = max_len for FLASH-Quad, C inside
    chunks; the chunk mode's linear part unchanged), forward and gradients of the input and every weight."""
    model = flash(mode, relu2_scaling="paper", rel_pos_bias=bias).double()
    gau, length = model.blocks[0].gau, 21
    x = random(2, length, 32, seed=3).requires_grad_()

    u, v, z = F.silu(x @ gau.uvz.weight.T + gau.uvz.bias).split([64, 64, 16], dim=-1)
    rope, t = RotaryEmbedding(16).double(), torch.arange(length)
    qk = [rope(z * gamma + beta, t) for gamma, beta in zip(gau.qk.gamma, gau.qk.beta)]
    n = MAX_LEN if mode == "quad" else C
    relative = gau.pos_bias[(n - 1 + t[None, :] - t[:, None]).clamp(0, 2 * n - 2)] if bias else 0.0
    quad = torch.relu(qk[0] @ qk[1].transpose(1, 2) / n + relative).square()
    if mode == "quad":
        weights = quad * (t[None, :] <= t[:, None])
    else:
        chunk = t // C
        same, earlier = chunk[:, None] == chunk[None, :], chunk[:, None] > chunk[None, :]
        linear = qk[2] @ qk[3].transpose(1, 2) / (chunk[:, None] * C).clamp(min=1)
        weights = quad * (same & (t[None, :] <= t[:, None])) + linear * earlier
    expected = (u * (weights @ v)) @ gau.out.weight.T + gau.out.bias

    out = gau(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs, cotangent = (x, *gau.parameters()), torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, cotangent), torch.autograd.grad(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["quad", "chunk"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_flash_options_are_causal(mode, options):
    assert_causal(flash(mode, **options), length=29)


@pytest.mark.parametrize("mode", ["quad", "chunk"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_flash_options_cache_equals_full_forward(mode, options):
    assert_cache_equals_full_forward(flash(mode, **options))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quad", "chunk"])
@pytest.mark.parametrize("options", OPTIONS[:2], ids=OPTION_IDS[:2])
def test_flash_options_overfit(mode, options):
    """From the default init (the bias at its N(0, 0.02)), as training would start."""
    torch.manual_seed(0)
    model = FLASH(dataclasses.replace(FLASHConfig.tiny(), mode=mode, chunk_size=C, max_len=MAX_LEN, **options))
    assert overfit_loss(model, 200) < 0.1


# ================================================================== the A/B benchmark


@pytest.mark.slow
def test_paper_options_benchmark_trains_every_arm_on_the_same_batches(corpus_dir, tmp_path):
    """The quick run on a small corpus: every arm trained and scored, each compared with its baseline; arms whose
    option is inactive at evaluation (dropout) start from the same weights as their baseline."""
    from benchmarks import paper_options

    results = paper_options.main([*paper_options.QUICK, f"data.paths=[{corpus_dir}/*.py]", "data.num_workers=0",
                                  "--seeds", "0", "1", "--out", str(tmp_path)])
    assert {f"paper_options.{ext}" for ext in ("json", "md", "png")} <= {p.name for p in tmp_path.iterdir()}
    arms = {arm["name"]: arm for arm in results["arms"]}
    assert set(arms) == set(paper_options.ARMS) and len(results["runs"]) == 2 * len(arms)
    for arm in arms.values():
        assert len(arm["seeds_bpc"]) == 2 and all(0 < x < 10 for x in arm["seeds_bpc"])
        assert (arm["baseline"] is None) == ("delta_bpc" not in arm)
    start = {(run["name"], run["seed"]): run["curve"][0]["bpc"] for run in results["runs"]}
    for seed in (0, 1):  # dropout is off in evaluation: the same initial weights, the same first score
        assert start["h_transformer_attn_dropout", seed] == start["h_transformer", seed]
    assert start["h_transformer", 0] != start["h_transformer", 1]
