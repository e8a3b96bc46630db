"""The properties every model must have: causality, cached == uncached, overfit, any length up to max; and
the contract of every family's config: the one source of its defaults (the Hydra `model` group included),
one-line errors for bad values and unknown options, old-style dict configs."""

import dataclasses
import typing
from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from hier_lm import generate
from hier_lm.config import CONFIG_MODULE, compose_train_config
from hier_lm.models import MODELS, build_model
from hier_lm.tasks.language_model import model_blocks

# Every family registered in MODELS runs every test below on its `tiny()` config, and on these variants of it.
VARIANTS = {
    "transformer-learned": ("transformer", dict(pos="learned")),
    "hourglass-nested-average-repeat": ("hourglass", dict(hierarchy="1@1 1@2 1@4 1@2 1@1", shortening="average",
                                                          upsampling="repeat")),
    "hourglass-linear": ("hourglass", dict(hierarchy="1@1 2@4 1@1", shortening="linear", upsampling="linear")),
    "hourglass-relative": ("hourglass", dict(hierarchy="1@1 2@3 1@1", shortening="attention", upsampling="repeat",
                                             pos="relative")),
    "flash-quad": ("flash", dict(mode="quad")),
    "h_transformer-rope": ("h_transformer", dict(pos="rope", value_coarsening="mean")),
}
CASES = {**{name: (name, {}) for name in MODELS}, **VARIANTS}


@pytest.fixture(params=sorted(CASES))
def model(request):
    name, overrides = CASES[request.param]
    torch.manual_seed(0)
    return build_model(dataclasses.replace(MODELS[name].config_class.tiny(), **overrides)).eval()


def test_logits_shape_at_any_length(model):
    for length in (1, 2, 7, 33, model.max_len):
        assert model(torch.randint(0, model.vocab_size, (2, length))).shape == (2, length, model.vocab_size)


def test_causality_bit_identical(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (2, 45))
    reference = model(tokens)
    for s in (0, 1, 17, 44):
        perturbed = tokens.clone()
        perturbed[:, s] = (perturbed[:, s] + 1 + torch.randint(0, model.vocab_size - 1, (2,))) % model.vocab_size
        out = model(perturbed)
        assert torch.equal(out[:, :s], reference[:, :s]), f"logits before {s} changed"
        assert not torch.equal(out[:, s:], reference[:, s:]), "the perturbation had no effect at all"


def test_cache_matches_full_forward(model):
    torch.manual_seed(2)
    tokens = torch.randint(0, model.vocab_size, (3, 40))
    full = model(tokens)
    cache = model.new_cache()
    pieces = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 23), (23, 40))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)])
def test_generation_cached_equals_uncached(model, sampling):
    prompt = torch.randint(0, model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
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


@pytest.mark.slow
@pytest.mark.parametrize("prompt_len", [3, 100])
def test_generation_beyond_max_len_restarts_the_context_in_both_modes(model, prompt_len):
    prompt = torch.randint(0, model.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(5))
    n = 2 * model.max_len + 7
    cached = generate(model, prompt, n, use_cache=True, seed=3)
    assert cached.shape == (prompt_len + n,)
    assert torch.equal(cached, generate(model, prompt, n, use_cache=False, seed=3))


@pytest.mark.slow
def test_overfits_a_tiny_batch(model):
    torch.manual_seed(4)
    model.train()
    batch = torch.randint(0, model.vocab_size, (4, 33))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"could not overfit 4 sequences: loss {loss.item():.3f}"


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_model_config_group_takes_its_defaults_from_the_dataclass(name):
    cfg = compose_train_config([f"model={name}"])
    defaults = dataclasses.asdict(MODELS[name].config_class())
    del defaults["vocab_size"]  # set from the data: not a key of the group
    assert OmegaConf.to_container(cfg.model, resolve=True) == {"name": name, **defaults, "max_len": cfg.data.seq_len}
    assert not resources.files(CONFIG_MODULE).joinpath("model").is_dir()  # no config file repeats a default
    assert compose_train_config([f"model={name}", "model.max_len=null"]).model.max_len is None  # images: from data
    assert compose_train_config([f"model={name}", "data=synthetic_images"]).model.max_len is None  # no seq_len there


@pytest.mark.parametrize("name", sorted(MODELS))
def test_options_as_keywords_as_a_mapping_or_as_a_config_build_the_same_model(name):
    config = MODELS[name].config_class.tiny()
    options = dataclasses.asdict(config)
    for model in (MODELS[name](**options), MODELS[name](config), build_model({"name": name, **options}),
                  build_model(config)):
        assert type(model) is MODELS[name] and model.config == config
    with pytest.raises(TypeError, match="keyword options, not"):
        MODELS[name](config, d_model=64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_values_are_one_line_errors_naming_the_option_the_value_and_what_is_allowed(name):
    config_class = MODELS[name].config_class
    tiny = config_class.tiny()
    hints = typing.get_type_hints(config_class)
    literal = next(key for key, hint in hints.items() if typing.get_origin(hint) is typing.Literal)
    allowed = ", ".join(map(repr, typing.get_args(hints[literal])))
    for key, value, message in [
        (literal, "bogus", f"{literal} must be one of {allowed}; got 'bogus'"),
        ("d_model", "abc", "d_model must be an integer >= 1; got 'abc'"),
        ("d_model", 0, "d_model must be an integer >= 1; got 0"),
        ("max_len", True, "max_len must be an integer >= 1; got True"),
        ("dropout", 1.0, r"dropout must be a probability in \[0, 1\); got 1.0"),
        ("activation_checkpointing", "yes", "activation_checkpointing must be true or false; got 'yes'"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            dataclasses.replace(tiny, **{key: value})
        with pytest.raises(ValueError, match=f"^{message}$"):
            build_model({"name": name, **dataclasses.asdict(tiny), key: value})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unknown_options_and_models_are_clear_errors(name):
    with pytest.raises(ValueError, match=rf"^{MODELS[name].config_class.__name__} has no option 'n_levels'; "
                                         r"its options: vocab_size, max_len, dropout, "):
        build_model({"name": name, "n_levels": 3})
    with pytest.raises(ValueError, match="has no option 'n_levels'"):
        MODELS[name](n_levels=3)
    with pytest.raises(ValueError, match="unknown model 'nope'; available: flash, h_transformer, hourglass"):
        build_model({"name": "nope"})


# The model configs of checkpoints written before the typed configs: every key of the group's old YAML, floats
# that YAML wrote as ints, no activation_checkpointing (the task never stored it).
OLD_CHECKPOINT_CONFIGS = [
    dict(name="transformer", d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0, max_len=32, pos="rope",
         tie_embeddings=False, vocab_size=256),
    dict(name="hourglass", d_model=32, n_heads=2, d_ff=64, dropout=0.1, hierarchy="1@1 1@2 1@1",
         shortening="attention", attention_shortening_base="average", upsampling="attention",
         attention_upsampling_base="repeat", pos="rope", max_len=32, vocab_size=256),
    dict(name="h_transformer", d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.1, block_size=4, max_len=32,
         pos="hrpb", value_coarsening="sum", causal=True, num_classes=None, attn_impl="auto", vocab_size=256),
    dict(name="flash", d_model=32, n_layers=2, expansion=2, s=16, mode="chunk", chunk_size=8, causal=True, dropout=0,
         max_len=32, norm="scalenorm", attn_impl="auto", vocab_size=256),
]


@pytest.mark.parametrize("old", OLD_CHECKPOINT_CONFIGS, ids=lambda config: config["name"])
def test_old_style_dict_configs_build(old):
    model = build_model(old)
    options = {key: value for key, value in old.items() if key != "name"}
    assert type(model) is MODELS[old["name"]] and dataclasses.asdict(model.config) == {
        **dataclasses.asdict(MODELS[old["name"]].config_class()), **options}
    assert model(torch.zeros(1, 32, dtype=torch.long)).shape == (1, 32, 256)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_family_declares_its_residual_block_types(name):
    model = build_model(MODELS[name].config_class.tiny())
    assert {type(block) for block in model_blocks(model)} == set(MODELS[name].block_types)
