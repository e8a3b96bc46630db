"""Config plumbing: recipe registry and free-text command-line values."""

import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hier_lm.config import hydra_quote_escape, quote_free_text_args, recipe_names


@pytest.mark.parametrize("text", ["def main(", "it's", "a\\nb", "ends with \\", "\\'", "[1, 2]", "a=b", "", "x'y\\"])
def test_free_text_reaches_hydra_literally(text, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", f"prompt={text}", "seed=1"])
    quote_free_text_args(("prompt",))
    parser = OverridesParser.create()
    assert parser.parse_override(sys.argv[1]).value() == text
    assert sys.argv[2] == "seed=1"
    assert parser.parse_override(f"prompt='{hydra_quote_escape(text)}'").value() == text


def test_recipes_are_listed():
    assert "quickstart" in recipe_names()
