"""Sampling settings and prompts that would sample nonsense are one-line errors: in `generate` (a ValueError)
and at `python -m hier_lm.sample` (exit 2, `error: ...`, nothing written)."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import hier_lm.sample as sample_cli
from hier_lm import generate
from hier_lm.generation import filter_logits, sample_next
from hier_lm.image_sampling import sample_images
from hier_lm.models import Transformer, TransformerConfig
from hier_lm.tasks import CHECKPOINT_KEY, image_length
from tests.helpers import subprocess_env
from tests.test_cli import entry_config


@pytest.fixture(scope="module")
def byte_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(TransformerConfig.tiny(), vocab_size=256)).eval()


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, byte_model):
    """A byte-level text model's checkpoint file."""
    path = tmp_path_factory.mktemp("text") / "last.ckpt"
    model = {"name": "transformer", **dataclasses.asdict(byte_model.config)}
    torch.save({"state_dict": {f"model.{k}": v for k, v in byte_model.state_dict().items()},
                CHECKPOINT_KEY: {"model": model, "config": {}}}, path)
    return path


@pytest.mark.parametrize("settings,message", [
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": -0.5}, "top_p must be"), ({"top_p": 1.5}, "top_p must"),
    ({"top_p": math.nan}, "top_p must"), ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"temperature": math.inf}, "temperature must"), ({"temperature": -1.0}, "temperature must"),
    ({"temperature": "hot"}, "temperature must"), ({"top_k": -1}, "top_k must be a whole number >= 0"),
    ({"max_new_tokens": -5}, "max_new_tokens must be a whole number >= 0, got -5"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
    ({"max_new_tokens": "abc"}, "max_new_tokens must be a whole number >= 0, got 'abc'"),
    ({"seed": 1.5}, "seed must be a whole number"),
])
def test_generate_refuses_settings_that_sample_nonsense(byte_model, settings, message):
    arguments = {"max_new_tokens": 4, **settings}
    with pytest.raises(ValueError, match=message) as err:
        generate(byte_model, [1, 2, 3], **arguments)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prompt,message", [
    (torch.tensor([1.0, 2.0]), "prompt_tokens must be integer token ids, got torch.float32"),
    ([1.5, 2.0], "prompt_tokens must be integer token ids"),
    (torch.tensor([True, False]), "prompt_tokens must be integer token ids, got torch.bool"),
    ([3, 256], r"prompt_tokens must be ids in \[0, 256\) for this model, got values from 3 to 256"),
    (torch.tensor([[-1, 4]]), r"ids in \[0, 256\)"),
    ([[1, 2], [3]], "prompt_tokens must be integer token ids"),
])
def test_generate_refuses_prompts_that_are_not_token_ids(byte_model, prompt, message):
    with pytest.raises(ValueError, match=message):
        generate(byte_model, prompt, 4, seed=0)


def test_a_byte_model_takes_bytes_and_text_prompts(byte_model):
    expected = generate(byte_model, list(b"def"), 6, seed=0)
    assert torch.equal(generate(byte_model, b"def", 6, seed=0), expected)
    assert torch.equal(generate(byte_model, "def", 6, seed=0), expected)
    subword = Transformer(TransformerConfig.tiny())  # vocab 32
    with pytest.raises(ValueError, match="a text prompt .* needs a byte-level model .* give token ids"):
        generate(subword, "def", 3, seed=0)


def test_no_setting_drops_every_logit():
    logits = torch.tensor([[1.0, 5.0, 2.0, 3.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for top_p in (1e-9, 0.5, 1.0):  # the most likely token always stays
        assert filter_logits(logits, top_p=top_p)[0, 1].isfinite()
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(logits, top_p=0.0)
    # A temperature this small overflowed the scaled logits to nan, which sampled the last token every time.
    assert [sample_next(logits, 1e-310, None, 0.9, g).item() for _ in range(5)] == [1] * 5


def test_sample_images_refuses_bad_counts_before_sampling():
    model = Transformer(dataclasses.replace(TransformerConfig.tiny(), vocab_size=256, max_len=image_length(2)))
    for kwargs, message in (({"num_images": 0}, "num_images must be a whole number >= 1, got 0"),
                            ({"num_images": "four"}, "num_images must be a whole number >= 1"),
                            ({"num_images": 2, "batch_size": 0}, "batch_size must be a whole number >= 1"),
                            ({"num_images": 2, "top_p": 2.0}, "top_p must be in")):
        with pytest.raises(ValueError, match=message):
            sample_images(model, 2, **kwargs)


@pytest.mark.parametrize("override,message", [
    ("max_new_tokens=abc", "max_new_tokens must be a whole number >= 0, got 'abc'"),
    ("max_new_tokens=-5", "max_new_tokens must be a whole number >= 0, got -5"),
    ("num_samples=0", "num_samples must be a whole number >= 1, got 0"),
    ("top_p=1.5", r"top_p must be in (0, 1]"), ("top_p=0", r"top_p must be in (0, 1]"),
    ("temperature=nan", "temperature must be a finite number >= 0"),
    ("num_images=4", "is a text model: num_images=, prompt_images= and save_each= are for image models"),
])
def test_sample_command_refuses_bad_settings(text_ckpt, tmp_path, capsys, override, message):
    out, length = tmp_path / "samples.txt", [] if override.startswith("max_new_tokens") else ["max_new_tokens=4"]
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(entry_config("sample", f"ckpt={text_ckpt}", override, f"out={out}", *length))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not out.exists()


def test_a_text_model_writes_no_image(text_ckpt, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(entry_config("sample", f"ckpt={text_ckpt}", "num_images=4", f"out={grid}"))
    assert exit_info.value.code == 2 and "is a text model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an image file name alone is refused too: the samples are text
        sample_cli.main(entry_config("sample", f"ckpt={text_ckpt}", f"out={grid}", "max_new_tokens=4"))
    assert "it writes text, not an image to out=" in capsys.readouterr().err and not grid.exists()
    sample_cli.main(entry_config("sample", f"ckpt={text_ckpt}", f"out={tmp_path / 's.txt'}", "max_new_tokens=4"))
    assert (tmp_path / "s.txt").read_text() == capsys.readouterr().out


def test_an_image_model_writes_only_png_grids(tmp_path, capsys):
    model = Transformer(dataclasses.replace(TransformerConfig.tiny(), vocab_size=256, max_len=image_length(2)))
    ckpt = tmp_path / "image.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                CHECKPOINT_KEY: {"model": {"name": "transformer", **dataclasses.asdict(model.config)}, "config": {},
                                 "image_size": 2}}, ckpt)
    grid = f"out={tmp_path / 'grid.png'}"
    for overrides, message in (([f"out={tmp_path / 'grid.txt'}"], "image samples are written as a PNG grid"),
                               (["num_images=0", grid], "num_images must be a whole number >= 1, got 0"),
                               (["top_p=0", grid], "top_p must be in (0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            sample_cli.main(entry_config("sample", f"ckpt={ckpt}", *overrides))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.ckpt"]
    sample_cli.main(entry_config("sample", f"ckpt={ckpt}", "num_images=2", grid, "seed=0"))
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.slow
def test_max_new_tokens_abc_at_the_command_line_is_one_line(text_ckpt, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hier_lm.sample", f"ckpt={text_ckpt}", "max_new_tokens=abc",
                             f"out={tmp_path / 'out.txt'}"], capture_output=True, text=True, env=subprocess_env(),
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: max_new_tokens must be a whole number >= 0, got 'abc'"
    assert not (tmp_path / "out.txt").exists()
