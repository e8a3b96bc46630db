"""Scale-out training: 2-process DDP and FSDP2 through the real CLI (gloo on CPU) with an interruption and a
resume, against one process with the doubled batch; sharded checkpoints (atomic publishing, consolidation,
`hier_lm.load`); evaluation that scores every window once on any number of ranks; gradient accumulation;
activation checkpointing; torch.compile and its fallback; bf16-mixed; throughput and MFU; `hier_lm.evaluate` on
two processes."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hier_lm
import hier_lm.checkpoint as checkpoint_module
from hier_lm.callbacks import model_flops_per_token
from hier_lm.checkpoint import (consolidate, existing_checkpoint, is_sharded, publish_folder, read_checkpoint,
                                resolve_checkpoint)
from hier_lm.config import compose_train_config
from hier_lm.data import TextFilesDataModule
from hier_lm.data.base import EvalShard
from hier_lm.evaluate import evaluate
from hier_lm.models import build_model
from hier_lm.tasks import scored_next_token_loss
from hier_lm.tasks.language_model import shard_model
from hier_lm.train import RUN_ENV, train
from tests.helpers import subprocess_env, tiny_overrides
from tests.test_cli import cli, entry_config

RECIPE = "quickstart_transformer"
STEPS, HALF = 6, 3  # interrupted after HALF steps (its step_3 checkpoint is what is left), resumed to STEPS


def overrides(corpus_dir: Path, runs_dir: Path, batch_size: int) -> list[str]:
    """A tiny 2-block Transformer, seq_len 16, validation (the whole valid split) and checkpoints every HALF steps."""
    return [*tiny_overrides(corpus_dir, runs_dir, steps=STEPS, recipe=RECIPE), "model.n_layers=2", "model.dropout=0.0",
            "data.seq_len=16", f"data.batch_size={batch_size}", "data.eval_batch_size=128",
            f"trainer.val_check_interval={HALF}", "trainer.limit_val_batches=1.0", f"checkpoint.every_n_steps={HALF}"]


NO_VALIDATION = "trainer.limit_val_batches=0"


def run(overrides_: list[str]) -> Path:
    return train(compose_train_config([f"recipe={RECIPE}", *overrides_]), recipe=RECIPE)


def launch(strategy: str, args: list[str], log: Path) -> subprocess.Popen:
    """`python -m hier_lm.train ... trainer=<strategy> trainer.devices=2` on CPU (gloo), output to `log`."""
    command = [sys.executable, "-m", "hier_lm.train", f"recipe={RECIPE}", *args, f"trainer={strategy}",
               "trainer.devices=2", "trainer.accelerator=cpu"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop(RUN_ENV, None)
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parent.parent, start_new_session=True)


def wait(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a launch; on a timeout, kill its process group (rank 0 and the rank it started)."""
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def state_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return hier_lm.load(run_dir).state_dict()


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """The runs the tests compare, made once: 2-process DDP and FSDP runs of STEPS steps with batch 2 per device
    (launched together; DDP into a new timestamped run folder, FSDP into an explicit run_dir) and meanwhile the
    1-process reference with batch 4; then each 2-process run resumed from a copy of its step_3 checkpoint, as
    if it had been killed after step 3 (both resumes together)."""
    tmp = tmp_path_factory.mktemp("distributed")
    base = overrides(corpus_dir, tmp / "runs", batch_size=2)
    procs = {"ddp": launch("ddp", base, tmp / "ddp.log"),
             "fsdp": launch("fsdp", [*base, f"run_dir={tmp / 'fsdp'}"], tmp / "fsdp.log")}
    reference = run([*overrides(corpus_dir, tmp / "reference-runs", batch_size=4), f"run_dir={tmp / 'reference'}"])
    logs = {name: wait(proc, tmp / f"{name}.log") for name, proc in procs.items()}
    group = tmp / "runs" / RECIPE
    assert len([p for p in group.iterdir() if p.name != "last"]) == 1  # rank 1 wrote into rank 0's new folder
    dirs = {"reference": reference, "ddp": (group / "last").resolve(), "fsdp": tmp / "fsdp"}

    for name in ("ddp", "fsdp"):
        killed = dirs[f"{name}_killed"] = tmp / f"{name}_killed"
        (killed / "checkpoints").mkdir(parents=True)
        source, target = dirs[name] / "checkpoints" / "step_3.ckpt", killed / "checkpoints" / "last.ckpt"
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    procs = {name: launch(name, [*base, f"resume={dirs[f'{name}_killed']}"], tmp / f"{name}_resumed.log")
             for name in ("ddp", "fsdp")}
    logs.update({f"{name}_resumed": wait(proc, tmp / f"{name}_resumed.log") for name, proc in procs.items()})
    return {**dirs, "logs": logs}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_interrupted_and_resumed_equal_one_process(runs, strategy):
    reference, straight, resumed = runs["reference"], runs[strategy], runs[f"{strategy}_killed"]
    want = metrics(reference, "train/loss")
    assert_same_curve(metrics(straight, "train/loss"), want, range(STEPS))
    assert_same_curve(metrics(resumed, "train/loss"), want, range(HALF, STEPS))  # the steps after the resume
    # Every window of the valid split scored once, by either rank: the same bpc as one process.
    assert_same_curve(metrics(straight, "val/bpc"), metrics(reference, "val/bpc"), [HALF - 1, STEPS - 1])
    assert_same_curve(metrics(resumed, "val/bpc"), metrics(reference, "val/bpc"), [STEPS - 1])
    for run_dir in (straight, resumed):
        got, want_state = state_of(run_dir), state_of(reference)
        for name, tensor in want_state.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    _, step_3 = read_checkpoint(straight / "checkpoints" / "step_3.ckpt", model_only=True)  # a file or shards
    assert len(step_3["callbacks"]["RNGState"]["ranks"]) == 2  # each rank's RNG states, restored per rank
    for log in (runs["logs"][strategy], runs["logs"][f"{strategy}_resumed"]):
        assert "batch: 2 device(s) x 2 sequences x 1 accumulated = global batch of 4 x 16 = 64 tokens" in log
        assert log.count("run folder:") == 1  # rank 0 only
    assert f"(resuming from {resumed / 'checkpoints' / 'last.ckpt'})" in runs["logs"][f"{strategy}_resumed"]


@pytest.mark.slow
def test_evaluate_on_two_processes_scores_every_window_once(runs, tmp_path):
    """`python -m hier_lm.evaluate devices=2` (Trainer.test in two processes, gloo): each rank scores its shard of
    the split, and the exact token count and the loss are those of one process."""
    one = evaluate(entry_config("evaluate", f"ckpt={runs['reference']}", "split=valid", f"out={tmp_path / 'one.json'}"))
    two = cli("hier_lm.evaluate", f"ckpt={runs['reference']}", "split=valid", "devices=2", "accelerator=cpu",
              f"out={tmp_path / 'two.json'}", OMP_NUM_THREADS="1")
    results = json.loads((tmp_path / "two.json").read_text())
    assert results["tokens"] == one["tokens"] and results["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert results["bpc"] == pytest.approx(one["bpc"], rel=1e-5)
    assert two.stdout.count("valid: loss") == 1  # rank 0 reports


# Resuming the consolidated copy in another folder: Lightning notes that the ModelCheckpoint folder changed.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_consolidate_to_one_loadable_file(runs, corpus_dir, tmp_path, capsys):
    checkpoints = runs["fsdp_killed"] / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert is_sharded(last) and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoints.glob(".*"))  # no temp or aside folder left behind
    assert resolve_checkpoint(runs["fsdp_killed"]) == last

    sharded = hier_lm.load(runs["fsdp_killed"])  # read directly from the shards
    checkpoint_module.main(["consolidate", str(last)])
    file = checkpoints / "last.consolidated.ckpt"
    assert f"written: {file}" in capsys.readouterr().out
    assert file.is_file()
    single = torch.load(file, weights_only=True)
    assert single["global_step"] == STEPS and single["hier_lm"]["model"]["n_layers"] == 2
    model = hier_lm.load(file)
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    tokens = hier_lm.generate(model, list(b"def "), 12, seed=0)
    assert tokens.shape == (16,) and torch.equal(tokens, hier_lm.generate(sharded, list(b"def "), 12, seed=0))
    with pytest.raises(ValueError, match="nothing to consolidate"):
        consolidate(runs["reference"])

    # The consolidated step_3 (optimizer states in torch's format) resumes in one process like the sharded one.
    killed = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert consolidate(runs["fsdp"] / "checkpoints" / "step_3.ckpt", killed) == killed and killed.is_file()
    resumed = run([*overrides(corpus_dir, tmp_path / "runs", batch_size=4), NO_VALIDATION,
                   f"resume={tmp_path / 'killed'}"])
    assert_same_curve(metrics(resumed, "train/loss"), metrics(runs["reference"], "train/loss"), range(HALF, STEPS))


def test_interrupted_sharded_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    def folder(name: str, step: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        torch.save({"global_step": step}, path / "meta.pt")
        return path

    last = tmp_path / "last.ckpt"
    publish_folder(folder(".last.ckpt.tmp", 1), last)  # a new name: one rename
    assert existing_checkpoint(last) == last
    renames, real_rename = [], os.rename

    def killed_between_renames(src, dst):
        renames.append(Path(dst).name)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(folder(".last.ckpt.tmp", 2), last)
    monkeypatch.undo()
    assert renames == [".last.ckpt.old", "last.ckpt"] and not last.exists()
    found = resolve_checkpoint(tmp_path)  # the previous version, aside
    assert found == tmp_path / ".last.ckpt.old" and torch.load(found / "meta.pt")["global_step"] == 1
    shutil.rmtree(tmp_path / ".last.ckpt.tmp")  # what FSDP2Strategy does with a leftover before saving
    publish_folder(folder(".last.ckpt.tmp", 3), last)
    assert torch.load(last / "meta.pt")["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_eval_shards_score_every_window_once(corpus_dir, tmp_path):
    dm = TextFilesDataModule(paths=[f"{corpus_dir}/*.py"], root=tmp_path, seq_len=16, eval_context=4)
    dm.prepare_data()
    dm.setup("validate")
    windows = dm._eval_windows("valid")
    world = next(w for w in (3, 4, 5, 7) if len(windows) % w)  # so that some ranks need padding
    shards = [EvalShard(windows, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-len(windows) // world)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    collate = torch.utils.data.default_collate
    loss, count = scored_next_token_loss(model, collate([windows[i] for i in range(len(windows))]))
    parts = [scored_next_token_loss(model, collate([s[j] for j in range(len(s))])) for s in shards]
    assert sum(n for _, n in parts) == count == dm.num_eval_tokens("valid")  # padding items score nothing
    assert sum(part.item() * n for part, n in parts) / count == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(runs, corpus_dir, tmp_path):
    accumulated = run([*overrides(corpus_dir, tmp_path, batch_size=2), "trainer.accumulate_grad_batches=2",
                       NO_VALIDATION, f"run_dir={tmp_path / 'accumulated'}"])
    assert_same_curve(metrics(accumulated, "train/loss"), metrics(runs["reference"], "train/loss"), range(STEPS))


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_training_and_samples(runs, corpus_dir, tmp_path):
    checkpointed = run([*overrides(corpus_dir, tmp_path, batch_size=4), "model.activation_checkpointing=true",
                        f"run_dir={tmp_path / 'checkpointed'}"])
    assert_same_curve(metrics(checkpointed, "train/loss"), metrics(runs["reference"], "train/loss"), range(STEPS))
    saved = torch.load(checkpointed / "checkpoints" / "last.ckpt", weights_only=True)
    assert "activation_checkpointing" not in saved["hier_lm"]["model"]  # never a model constructor argument
    assert not any("checkpoint_wrapped" in name for name in saved["state_dict"])
    # Sampling after each validation went through the wrapped blocks with the KV cache, as without them.
    assert (checkpointed / "samples.txt").read_text() == (runs["reference"] / "samples.txt").read_text()


@pytest.mark.slow
def test_compile_trains_compiled_or_says_it_falls_back(runs, corpus_dir, tmp_path, capsys, monkeypatch):
    # aot_eager: Dynamo + AOTAutograd without code generation (seconds on CPU; inductor takes minutes cold).
    short = [*overrides(corpus_dir, tmp_path, batch_size=4), "trainer.max_steps=2", NO_VALIDATION]
    compiled = run([*short, "compile=aot_eager", f"run_dir={tmp_path / 'compiled'}"])
    assert "compile=aot_eager: the training forward runs compiled (torch.compile)" in capsys.readouterr().out
    want = metrics(runs["reference"], "train/loss")
    assert_same_curve(metrics(compiled, "train/loss"), {s: want[s] for s in (0, 1)}, [0, 1])

    def unsupported(module, **kwargs):  # what a machine without a C++ compiler gets on the first call
        def fail(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore details")
        return fail

    monkeypatch.setattr(torch, "compile", unsupported)
    eager = run([*short, "compile=true", f"run_dir={tmp_path / 'eager'}"])
    out = capsys.readouterr().out
    assert out.count("compile=true: torch.compile does not work here (RuntimeError: InductorError: no working C++ "
                     "compiler found); training eagerly") == 1
    assert_same_curve(metrics(eager, "train/loss"), {s: want[s] for s in (0, 1)}, [0, 1])


@pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary")
def test_bf16_mixed_trains_and_mfu_is_logged_with_a_known_peak(corpus_dir, tmp_path):
    run_dir = run([*overrides(corpus_dir, tmp_path, batch_size=4), "trainer.precision=bf16-mixed",
                   "trainer.max_steps=3", "peak_flops=1e12", NO_VALIDATION, f"run_dir={tmp_path / 'bf16'}"])
    losses, rates, mfus = (metrics(run_dir, name) for name in ("train/loss", "train/tokens_per_sec", "train/mfu"))
    assert sorted(losses) == [0, 1, 2] and all(0 < v < 10 for v in losses.values())
    assert sorted(mfus) == sorted(rates) == [1, 2]  # from the second batch: a rate needs an interval
    model_config = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hier_lm"]["model"]
    flops_per_token = model_flops_per_token(model_config, 16)
    for step in mfus:
        assert mfus[step] == pytest.approx(rates[step] * flops_per_token / 1e12, rel=1e-4)


def test_flops_per_token_counts_every_matmul_of_forward_and_backward():
    d, d_ff, vocab, layers, length = 32, 64, 256, 2, 16
    config = {"name": "transformer", "vocab_size": vocab, "d_model": d, "n_layers": layers, "n_heads": 2,
              "d_ff": d_ff, "max_len": length}
    matmul_params = layers * (4 * d * d + 2 * d * d_ff) + d * vocab  # qkv, out, FFN; the head
    attention = layers * 4 * length * d  # q k^T and the weighted sum of v, per token (counted dense)
    assert model_flops_per_token(config, length) == 3 * (2 * matmul_params + attention)  # backward = 2 x forward


def test_fsdp_names_the_parameters_it_cannot_shard():
    model = build_model({"name": "transformer", "vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2,
                         "d_ff": 64, "max_len": 16})
    model.temperature = torch.nn.Parameter(torch.ones(()))  # FSDP2 shards dim 0: a 0-dim parameter has none
    with pytest.raises(ValueError, match=r"0-dim parameters \(temperature\): give them shape \[1\]"):
        shard_model(model, mesh=None)
    flash = build_model({"name": "flash", "vocab_size": 256, "d_model": 32, "n_layers": 1, "s": 16, "chunk_size": 8})
    assert all(p.dim() > 0 for p in flash.parameters())  # its scale-norm gains included


def test_an_externally_launched_rank_needs_an_explicit_run_dir(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(RUN_ENV, raising=False)
    with pytest.raises(ValueError, match="pass run_dir="):
        run(overrides(corpus_dir, tmp_path, batch_size=2))
    assert not tmp_path.joinpath(RECIPE).exists()
