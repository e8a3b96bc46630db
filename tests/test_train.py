"""Training through the Hydra config: every recipe, exact resume, atomic checkpoints, loggers."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
import wandb
import hier_lm
from hier_lm.files import atomic_torch_save
from hier_lm.config import compose_train_config, recipe_names
from hier_lm.train import train
from tests.helpers import tiny_overrides


def run(recipe: str, overrides: list[str]) -> Path:
    return train(compose_train_config([f"recipe={recipe}", *overrides]), recipe=recipe)


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_runs_two_steps(recipe, corpus_dir, tmp_path):
    run_dir = run(recipe, tiny_overrides(corpus_dir, tmp_path, recipe=recipe))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert (run_dir / "checkpoints" / "step_2.ckpt").is_file()
    assert (run_dir / "config.yaml").read_text().count("max_steps: 2") == 1
    assert checkpoint["hier_lm"]["config"]["trainer"]["max_steps"] == 2
    assert (tmp_path / recipe / "last").resolve() == run_dir.resolve()
    assert set(train_losses(run_dir)) >= {0, 1}
    model = hier_lm.load(run_dir)
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_resume_equals_uninterrupted_run(corpus_dir, tmp_path):
    """A run killed after step 4 of 6 (its step_4 checkpoint is all that is left) and resumed ends exactly
    where the uninterrupted run ends: same weights, same optimizer/schedule state, same losses."""
    overrides = [*tiny_overrides(corpus_dir, tmp_path, steps=6), "model.dropout=0.1"]
    straight = run("quickstart", [*overrides, f"run_dir={tmp_path / 'straight'}"])
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_4.ckpt", killed / "checkpoints" / "last.ckpt")
    resumed = run("quickstart", [*overrides, f"resume={killed}"])
    assert resumed == killed

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in a["optimizer_states"][0]["state"][0].items():
        torch.testing.assert_close(b["optimizer_states"][0]["state"][0][name], tensor, rtol=1e-5, atol=1e-6)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    losses_a, losses_b = train_losses(straight), train_losses(resumed)
    assert sorted(losses_b) == [4, 5]  # the steps after the resume
    for step in (4, 5):
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5)


def test_resume_auto_continues_the_latest_run(corpus_dir, tmp_path):
    first = run("quickstart", tiny_overrides(corpus_dir, tmp_path, steps=3))  # ends between checkpoints
    assert torch.load(first / "checkpoints" / "step_3.ckpt", weights_only=True)["global_step"] == 3
    again = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=5), "resume=auto"])
    assert again == first.resolve()
    assert torch.load(again / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(train_losses(again)) == [0, 1, 2, 3, 4]  # the metrics of both sessions are kept


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hier_lm.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        hier_lm.load(tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a hier_lm checkpoint"):
        hier_lm.load(foreign)
    foreign.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        hier_lm.load(foreign)


def test_wandb_runs_offline_without_credentials(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path), "logger=wandb"])
    wandb.teardown()  # wait for W&B's background service to write everything out
    assert "logging offline" in capsys.readouterr().out
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    event_logs = list(offline_runs[0].glob("run-*.wandb"))
    assert len(event_logs) == 1, "no W&B event log written"
    records = event_logs[0].read_bytes()
    assert b"d_model" in records and b"train/loss" in records  # the config and the metrics, for `wandb sync`
    tables = list((offline_runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    assert tables and '"def ' in tables[0].read_text()  # the text-sample table
    assert (run_dir / "samples.txt").read_text().startswith("===== step 2 =====\ndef ")


def test_unknown_key_is_a_clear_error(corpus_dir, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        run("quickstart", [*tiny_overrides(corpus_dir, tmp_path), "model.no_such_key=1"])


def test_bf16_mixed_precision_trains(corpus_dir, tmp_path):
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path), "trainer.precision=bf16-mixed"])
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses.values())


def test_tensorboard_logger_writes_events(corpus_dir, tmp_path):
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path), "logger=tensorboard"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
