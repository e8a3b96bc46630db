"""Training through the Hydra config: every recipe, exact resume (`resume=` or `ckpt_path=`), atomic checkpoints,
loggers, callbacks added and removed by overrides, and `main`'s return value."""

import copy
import csv
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import wandb
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import hier_lm
from hier_lm.files import atomic_torch_save
from hier_lm.config import CONFIG_MODULE, compose_train_config, recipe_names
from hier_lm.train import main, train
from tests.helpers import tiny_overrides


def run(recipe: str, overrides: list[str]) -> Path:
    return train(compose_train_config([f"recipe={recipe}", *overrides]), recipe=recipe)


def logged(run_dir: Path, name: str) -> dict[int, float]:
    """`{step: value}` of a metric in the run's metrics.csv."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def train_losses(run_dir: Path) -> dict[int, float]:
    return logged(run_dir, "train/loss")


def metric_names(run_dir: Path) -> list[str]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return csv.DictReader(f).fieldnames


@pytest.mark.slow
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
    assert {"lr-AdamW/pg1", "train/tokens_per_sec", "val/loss"} <= set(metric_names(run_dir))  # the callbacks' too
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


def test_tensorboard_gets_the_metrics_and_text_samples(corpus_dir, tmp_path):
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=4), "logger=[csv,tensorboard]"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert {"train/loss", "val/loss", "train/tokens_per_sec"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/bpc")] == list(logged(run_dir, "val/bpc"))  # beside the CSV
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    written = (run_dir / "samples.txt").read_text().split("===== step ")[1:]
    assert len(written) == len(texts) == 2
    for block in written:  # "<step> =====\n<sample>\n": the same sample, as a Markdown code block
        step, sample = block.split(" =====\n", 1)
        assert texts[int(step)] == textwrap.indent(sample[:-1], "    ", lambda line: True)
        assert sample.startswith("def ")


def test_early_stopping_is_added_by_an_override(corpus_dir, tmp_path):
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=6),
                                 "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                                 "+callbacks.early_stopping.monitor=val/loss",
                                 "+callbacks.early_stopping.stopping_threshold=100"])  # met at the first validation
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and any(name.startswith("EarlyStopping") for name in checkpoint["callbacks"])
    assert sorted(train_losses(run_dir)) == [0, 1]  # stopped after the validation at step 2 of 6


def test_callbacks_are_removed_by_an_override(corpus_dir, tmp_path):
    run_dir = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path), "~callbacks.samples", "~callbacks.lr_monitor"])
    assert not (run_dir / "samples.txt").exists()
    names = metric_names(run_dir)
    assert "train/loss" in names and "val/loss" in names and not any(name.startswith("lr-") for name in names)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_ckpt_path_is_lightnings_name_for_resume(corpus_dir, tmp_path):
    first = run("quickstart", tiny_overrides(corpus_dir, tmp_path, steps=3))
    again = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=5), f"ckpt_path={first}"])
    assert again.resolve() == first.resolve()
    assert torch.load(again / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(train_losses(again)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=re.escape(f"resume=auto and ckpt_path={first} differ")):
        run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=5), "resume=auto", f"ckpt_path={first}"])
    same = run("quickstart", [*tiny_overrides(corpus_dir, tmp_path, steps=5), "resume=auto", "ckpt_path=auto"])
    assert same.resolve() == first.resolve()  # both given, with the same value: fine


@pytest.fixture
def hydra_run():
    """Compose the config as `python -m hier_lm.train <overrides>` does and set Hydra's runtime config (what
    `@hydra.main` does before calling `main`); returns the config `main` gets."""

    def compose_run(overrides: list[str]):
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        task_cfg = copy.deepcopy(cfg)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        return task_cfg

    yield compose_run
    HydraConfig.instance().cfg = None


def test_main_returns_the_optimized_metric(corpus_dir, tmp_path, hydra_run, capsys):
    value = main(hydra_run(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path, steps=4)]))
    run_dir = (tmp_path / "quickstart" / "last").resolve()
    assert value == pytest.approx(logged(run_dir, "val/loss")[3], rel=1e-6)  # the last validation's
    assert f"optimized_metric val/loss: {value}" in capsys.readouterr().out
    no_validation = main(hydra_run(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path, steps=1),
                                    "trainer.limit_val_batches=0"]))
    assert no_validation is None
    bpc = main(hydra_run(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path), "optimized_metric=val/bpc"]))
    assert bpc == pytest.approx(logged((tmp_path / "quickstart" / "last").resolve(), "val/bpc")[1], rel=1e-6)
