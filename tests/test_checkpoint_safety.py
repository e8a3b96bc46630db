"""Checkpoints never run code: every read is `torch.load(weights_only=True)` (load, sample, evaluate, resume),
a file that carries code or is damaged is a one-line error; `export` writes the weights without pickle
(safetensors + JSON) and everything that reads a checkpoint reads the export too."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hier_lm
from hier_lm.checkpoint import (AtomicCheckpointIO, FSDP2Strategy, check_resumable, export, is_export, main,
                                read_checkpoint, safe_load)
from hier_lm.config import compose_train_config
from hier_lm.data.lm1b import tokenizer_from_checkpoint, train_tokenizer
from hier_lm.models import MODELS, build_model
from hier_lm.tasks import CHECKPOINT_KEY
from tests.helpers import subprocess_env, tiny_overrides


class RunsCommand:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_config(name: str, **options) -> dict:
    """The model config (as checkpoints store it: `name` and every option) of family `name`'s tiny model."""
    return {"name": name, **dataclasses.asdict(MODELS[name].config_class.tiny()), **options}


def write_checkpoint(path: Path, model_config: dict, seed: int = 0, **extra) -> torch.nn.Module:
    """A checkpoint file as training writes it (the parts `load`, `sample` and `evaluate` read), of a model
    with random weights; returns the model."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    saved = {"model": model_config, "config": {"data": {"seq_len": 16}, "optim": {"lr": 1e-3}}}
    torch.save({"state_dict": state, "global_step": 1, CHECKPOINT_KEY: saved, **extra}, path)
    return model.eval()


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint whose unpickling would create the marker file, the marker file)."""
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"model": tiny_config("transformer"), "config": {}},
                "callbacks": {"x": RunsCommand(marker)}}, path)
    return path, marker


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(evil, tmp_path):
    path, marker = evil
    code = f"{os.system.__module__}.system"
    reads = [lambda: hier_lm.load(path), lambda: read_checkpoint(path), lambda: safe_load(path),
             lambda: AtomicCheckpointIO().load_checkpoint(path),  # Lightning's read when resuming
             lambda: check_resumable(path, {"model": tiny_config("transformer")}), lambda: export(path, tmp_path / "x")]
    for read in reads:
        with pytest.raises(ValueError, match=f"evil.ckpt is not a hier_lm checkpoint or carries code .*{code}") as err:
            read()
        assert "\n" not in str(err.value) and "weights_only=False" in str(err.value)
    sharded = tmp_path / "sharded.ckpt"  # an FSDP checkpoint folder: meta.pt is read before any shard
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(path.read_bytes())
    for read in (hier_lm.load, FSDP2Strategy().load_checkpoint):  # FSDP2Strategy: the resume under trainer=fsdp
        with pytest.raises(ValueError, match="meta.pt is not a hier_lm checkpoint or carries code"):
            read(sharded)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    good = tmp_path / "good.ckpt"
    write_checkpoint(good, tiny_config("transformer"))
    truncated, garbage = tmp_path / "truncated.ckpt", tmp_path / "garbage.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage.write_bytes(os.urandom(1000))
    for path in (truncated, garbage):
        for read in (hier_lm.load, AtomicCheckpointIO().load_checkpoint):
            with pytest.raises(ValueError, match=f"{path.name} is not a readable checkpoint") as err:
                read(path)
            assert "\n" not in str(err.value)


def test_check_resumable_refuses_another_family_or_other_shapes(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(path, tiny_config("transformer"))
    check_resumable(path, {"model": tiny_config("transformer", dropout=0.3, activation_checkpointing=True)})
    check_resumable(path, {"model": {k: v for k, v in tiny_config("transformer").items() if k != "vocab_size"}})
    with pytest.raises(ValueError, match="family 'transformer' but this run's config describes family 'hourglass'"):
        check_resumable(path, {"model": tiny_config("hourglass")})
    with pytest.raises(ValueError, match=r"weights do not fit the model this run's config describes .*\(32, 32\) vs"):
        check_resumable(path, {"model": tiny_config("transformer", d_model=48)})


@pytest.mark.parametrize("name,options", [("transformer", {"tie_embeddings": True}), ("hourglass", {}),
                                          ("flash", {}), ("h_transformer", {})])
def test_export_round_trip_gives_the_same_logits(tmp_path, name, options):
    ckpt, out = tmp_path / "last.ckpt", tmp_path / "export"
    model = write_checkpoint(ckpt, tiny_config(name, **options))
    assert export(ckpt, out) == out and is_export(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == tiny_config(name, **options) and config["config"]["data"] == {"seq_len": 16}
    tokens = torch.randint(0, model.vocab_size, (2, 20))
    exported = hier_lm.load(out)
    assert torch.equal(exported(tokens), model(tokens)) and torch.equal(exported(tokens), hier_lm.load(ckpt)(tokens))
    assert exported.image_size is None


def test_export_stores_tied_weights_once_and_restores_the_tie(tmp_path):
    from safetensors import safe_open

    ckpt = tmp_path / "last.ckpt"
    model = write_checkpoint(ckpt, tiny_config("transformer", tie_embeddings=True))
    state = model.state_dict()
    tied = [(a, b) for a in state for b in state if a < b and state[a].data_ptr() == state[b].data_ptr()]
    assert tied  # the embedding and the head are one tensor
    export(ckpt, tmp_path / "export")
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        stored, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    assert all((a in stored) != (b in stored) for a, b in tied) and aliases
    assert read_checkpoint(tmp_path / "export")[1]["state_dict"].keys() == {f"model.{k}" for k in state}


def test_export_carries_the_tokenizer_of_a_subword_model(tmp_path):
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=270)
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(ckpt, tiny_config("transformer", vocab_size=270),
                     LM1BDataModule={"tokenizer_json": tokenizer.to_str()})
    export(ckpt, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    again = tokenizer_from_checkpoint(read_checkpoint(tmp_path / "export")[1])
    assert again.get_vocab() == tokenizer.get_vocab()


def test_export_is_atomic_and_replaces_only_an_earlier_export(tmp_path, monkeypatch):
    import safetensors.torch

    ckpt, out = tmp_path / "last.ckpt", tmp_path / "export"
    write_checkpoint(ckpt, tiny_config("transformer"), seed=0)

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fails)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no folder, no hidden temporary one
    monkeypatch.undo()
    export(ckpt, out)
    first = (out / "model.safetensors").read_bytes()
    write_checkpoint(ckpt, tiny_config("transformer"), seed=1)
    export(ckpt, out)  # an earlier export is replaced
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.ckpt"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes exists and is not an export: give a new or empty folder"):
        export(ckpt, other)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_a_damaged_export_is_a_one_line_error(tmp_path):
    ckpt, out = tmp_path / "last.ckpt", tmp_path / "export"
    write_checkpoint(ckpt, tiny_config("transformer"))
    export(ckpt, out)
    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        hier_lm.load(out)
    (out / "config.json").write_text(json.dumps({"model": {"name": "transformer"}}))
    with pytest.raises(ValueError, match="config.json is not a hier_lm export config"):
        hier_lm.load(out)


def test_export_command(tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(ckpt, tiny_config("transformer"))
    main(["export", str(ckpt), str(tmp_path / "export")])
    assert capsys.readouterr().out.strip() == f"written: {tmp_path / 'export'}"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "other")])
    assert exit_info.value.code == 2 and "error: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)


@pytest.mark.slow
def test_commands_refuse_bad_checkpoints_and_read_exports(corpus_dir, tmp_path, evil):
    """Training writes only plain values; sample, evaluate and resume refuse a checkpoint that carries code,
    a damaged one and (resume) one of another model family with exit 2 and one line; they read an export."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from hier_lm.evaluate import evaluate
    from hier_lm.sample import sample_text
    from hier_lm.train import train
    from tests.test_cli import entry_config

    run_dir = train(compose_train_config(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path / "runs")]))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert get_unsafe_globals_in_checkpoint(last) == []  # torch's own allow-list reads it: nothing to add
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(last.read_bytes()[:5000])
    other = tmp_path / "other" / "last.ckpt"
    other.parent.mkdir()
    write_checkpoint(other, tiny_config("transformer", vocab_size=256, max_len=32))
    path, marker = evil
    overrides = tiny_overrides(corpus_dir, tmp_path / "runs")
    cases = [(("hier_lm.sample", f"ckpt={path}"), "carries code"),
             (("hier_lm.evaluate", f"ckpt={path}"), "carries code"),
             (("hier_lm.train", "recipe=quickstart", *overrides, f"resume={path}"), "carries code"),
             (("hier_lm.train", "recipe=quickstart", *overrides, f"resume={damaged}"), "not a readable checkpoint"),
             (("hier_lm.train", "recipe=quickstart", *overrides, f"resume={other}"), "transformer")]
    for args, message in cases:
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2, f"{args[0]}: {result.stderr[-2000:]}"
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error and "Traceback" not in result.stderr, result.stderr
    assert not marker.exists()

    export(run_dir, tmp_path / "export")
    tokens = torch.randint(0, 256, (1, 24))
    assert torch.equal(hier_lm.load(tmp_path / "export")(tokens), hier_lm.load(run_dir)(tokens))
    sampled = [sample_text(entry_config("sample", f"ckpt={ckpt}", "prompt=def", "max_new_tokens=12", "seed=0"))
               for ckpt in (run_dir, tmp_path / "export")]
    assert sampled[0] == sampled[1] and sampled[0][0].startswith("def")
    scores = [evaluate(entry_config("evaluate", f"ckpt={ckpt}", "split=valid", "limit_batches=2",
                                    f"out={tmp_path / f'eval{i}.json'}"))
              for i, ckpt in enumerate((run_dir, tmp_path / "export"))]
    assert scores[0]["loss"] == scores[1]["loss"] and scores[0]["tokens"] == scores[1]["tokens"]


@pytest.mark.slow
def test_checkpoint_io_benchmark_quick_run(tmp_path):
    from benchmarks import checkpoint_io

    results = checkpoint_io.main([*checkpoint_io.QUICK, "--out", str(tmp_path)])
    (run,) = results["runs"]
    assert set(run["seconds"]) == {op for row in checkpoint_io.OPERATIONS for op in row[1:] if op}
    assert all(s > 0 for s in run["seconds"].values())
    assert run["export_mb"] < run["checkpoint_mb"] / 2  # the weights only: no optimizer states
    assert json.loads((tmp_path / "checkpoint_io.json").read_text())["runs"][0]["recipe"] == "quickstart"
    assert "| quickstart (1.6M" in (tmp_path / "checkpoint_io.md").read_text()
    assert (tmp_path / "checkpoint_io.png").is_file()
