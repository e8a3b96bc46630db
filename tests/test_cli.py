"""The command lines as a user runs them: train -> sample -> evaluate, errors, and a non-editable install."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hier_lm.data import ByteCorpus, resolve_paths
from tests.helpers import subprocess_env, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, check: bool = True, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                            env=subprocess_env(**env), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_train_sample_evaluate(corpus_dir, tmp_path):
    trained = cli("hier_lm.train", "recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path / "runs", steps=4))
    assert "max_steps: 4" in trained.stdout  # the composed config is printed at start
    run_dir = tmp_path / "runs" / "quickstart" / "last"

    sample = cli("hier_lm.sample", f"ckpt={run_dir}", "prompt=def main(", "max_new_tokens=30", "seed=0",
                 f"out={tmp_path / 'sample.txt'}")
    assert sample.stdout.startswith("def main(")
    assert (tmp_path / "sample.txt").read_text().startswith("def main(")
    again = cli("hier_lm.sample", f"ckpt={run_dir}", "prompt=def main(", "max_new_tokens=30", "seed=0",
                "use_cache=false")
    assert again.stdout == sample.stdout

    evaluated = cli("hier_lm.evaluate", f"ckpt={run_dir}", "split=test", "limit_batches=3")
    results = json.loads((run_dir / "eval_test.json").read_text())
    assert results["tokens"] == 3 * 4 * 32 and results["split"] == "test"
    assert results["bpc"] == pytest.approx(results["loss"] / 0.6931471805599453)
    assert 0 < results["unigram_entropy_bits"] < 8
    assert "bpc" in evaluated.stdout and "unigram entropy" in evaluated.stdout

    cli("hier_lm.evaluate", f"ckpt={run_dir}", "split=valid", "eval_context=24", f"out={tmp_path / 'ctx.json'}")
    with_context = json.loads((tmp_path / "ctx.json").read_text())
    valid = ByteCorpus.build(resolve_paths([f"{corpus_dir}/*.py"])).split("valid")
    assert with_context["tokens"] == len(valid) - 1  # every byte after the first scored exactly once


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    result = cli("hier_lm.train", "recipe=no_such_recipe", check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert "Available options in 'recipe'" in result.stderr and "quickstart" in result.stderr


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    result = cli("hier_lm.sample", f"ckpt={tmp_path / 'missing'}", check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert f"checkpoint not found: {tmp_path / 'missing'}" in result.stderr


def test_non_editable_install_finds_its_recipes(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    assert (target / "hier_lm" / "recipes" / "recipe" / "quickstart.yaml").is_file()
    where = cli("hier_lm.train", "recipe=quickstart", "--cfg", "job", cwd=tmp_path, PYTHONPATH=str(target))
    assert "d_model: 128" in where.stdout and "max_steps: 700" in where.stdout  # read from the wheel
    origin = subprocess.run([sys.executable, "-c", "import hier_lm; print(hier_lm.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(target)))
    assert origin.stdout.startswith(str(target))
