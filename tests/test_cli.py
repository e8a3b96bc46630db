"""The command lines as a user runs them: train -> sample -> evaluate, sweeps, errors, and a non-editable install;
evaluation through Trainer.test against the plain loss."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from hier_lm.config import CONFIG_MODULE, compose_train_config
from hier_lm.data import ByteCorpus, resolve_paths
from hier_lm.evaluate import evaluate
from hier_lm.train import train
from tests.helpers import plain_validation_loss, subprocess_env, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, check: bool = True, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                            env=subprocess_env(**env), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def entry_config(name: str, *overrides: str):
    """The config `python -m hier_lm.<name> <overrides>` composes (`sample` or `evaluate`)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow
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


def test_evaluate_runs_trainer_test_and_equals_the_plain_loss(corpus_dir, tmp_path):
    """`evaluate` (Lightning's Trainer.test on the split's loader) gives the loss of the plain loop over the same
    loader, `scored_next_token_loss` batch by batch, and counts exactly its tokens; bf16-mixed on CPU is close."""
    run_dir = train(compose_train_config(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path)]), "quickstart")
    mean, tokens, data = plain_validation_loss(run_dir)
    assert tokens == data.num_eval_tokens("valid")

    results = evaluate(entry_config("evaluate", f"ckpt={run_dir}", "split=valid", f"out={tmp_path / 'valid.json'}"))
    assert results["loss"] == pytest.approx(mean, rel=1e-6) and results["tokens"] == tokens
    assert results["bpc"] == pytest.approx(results["loss"] / math.log(2), rel=1e-6)
    assert json.loads((tmp_path / "valid.json").read_text()) == {k: v for k, v in results.items() if k != "out"}
    bf16 = evaluate(entry_config("evaluate", f"ckpt={run_dir}", "split=valid", "precision=bf16-mixed", "device=cpu",
                                 f"out={tmp_path / 'bf16.json'}"))
    assert bf16["loss"] == pytest.approx(mean, rel=0.02) and bf16["tokens"] == tokens


@pytest.mark.slow
def test_a_sweep_runs_each_job_in_its_own_run_folder(corpus_dir, tmp_path):
    runs = tmp_path / "runs"
    swept = cli("hier_lm.train", "-m", "recipe=quickstart", "optim.lr=1e-3,2e-3", *tiny_overrides(corpus_dir, runs),
                cwd=tmp_path)
    folders = sorted(p for p in (runs / "quickstart").iterdir() if p.name != "last")
    assert len(folders) == 2 and (runs / "quickstart" / "last").resolve() == folders[1]
    assert [OmegaConf.load(folder / "config.yaml").optim.lr for folder in folders] == [1e-3, 2e-3]
    assert all(torch.load(f / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 for f in folders)
    objectives = [line for line in swept.stdout.splitlines() if line.startswith("optimized_metric val/loss: ")]
    assert len(objectives) == 2 and all(0 < float(line.split(": ")[1]) < 10 for line in objectives)
    assert [p.name for p in (runs / "multirun").iterdir()]  # the sweep's own folder, under runs_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written to the working directory


@pytest.mark.slow
def test_an_optuna_sweep_minimises_what_main_returns(corpus_dir, tmp_path):
    runs = tmp_path / "runs"
    cli("hier_lm.train", "-m", "recipe=quickstart", *tiny_overrides(corpus_dir, runs), "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=0",
        "optim.lr=interval(1e-4,1e-2)", cwd=tmp_path)
    folders = sorted(p for p in (runs / "quickstart").iterdir() if p.name != "last")
    losses = {}  # each trial's learning rate -> its last val/loss
    for folder in folders:
        with open(folder / "logs" / "metrics.csv", newline="") as f:
            val_losses = [float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"]]
        losses[OmegaConf.load(folder / "config.yaml").optim.lr] = val_losses[-1]
    (sweep,) = (runs / "multirun").iterdir()
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert len(losses) == 2 and all(1e-4 <= lr <= 1e-2 for lr in losses)  # two trials drawn from the interval
    assert best.best_value == pytest.approx(min(losses.values()), rel=1e-6)  # main's return value, minimised
    assert best.best_params["optim.lr"] == min(losses, key=losses.get)


@pytest.mark.slow
@pytest.mark.parametrize("several", [["trainer=ddp"], ["trainer.devices=2"]], ids=["ddp", "devices"])
def test_a_sweep_on_several_processes_is_a_clear_error(several, corpus_dir, tmp_path):
    result = cli("hier_lm.train", "-m", "recipe=quickstart", "optim.lr=1e-3,2e-3",
                 *tiny_overrides(corpus_dir, tmp_path / "runs"), *several, check=False, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: a sweep (-m) runs its jobs in one process")
    assert not (tmp_path / "runs" / "quickstart").exists()


@pytest.mark.slow
def test_unknown_recipe_lists_the_available_ones(tmp_path):
    result = cli("hier_lm.train", "recipe=no_such_recipe", check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert "Available options in 'recipe'" in result.stderr and "quickstart" in result.stderr


@pytest.mark.slow
def test_bad_checkpoint_is_one_clear_line(tmp_path):
    result = cli("hier_lm.sample", f"ckpt={tmp_path / 'missing'}", check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert f"checkpoint not found: {tmp_path / 'missing'}" in result.stderr


@pytest.mark.slow
def test_non_editable_install_finds_its_recipes(tmp_path):
    # Built from a copy of the sources: setuptools' build/ folder in the checkout may hold files of an older layout.
    source, target = tmp_path / "source", tmp_path / "site"
    scratch = {".git", ".venv", "build", "data", "runs", "outputs", "wandb", "lightning_logs"}
    shutil.copytree(REPO, source, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == REPO and n in scratch) or n == "__pycache__" or n.endswith(".egg-info")])
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    assert (target / "hier_lm" / "recipes" / "recipe" / "quickstart.yaml").is_file()
    where = cli("hier_lm.train", "recipe=quickstart", "--cfg", "job", cwd=tmp_path, PYTHONPATH=str(target))
    assert "d_model: 128" in where.stdout and "max_steps: 700" in where.stdout  # read from the wheel
    origin = subprocess.run([sys.executable, "-c", "import hier_lm; print(hier_lm.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(target)))
    assert origin.stdout.startswith(str(target))
