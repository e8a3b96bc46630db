"""Run folders under bad input and interruption: a refused resume or a failed start changes nothing on disk, a
run folder is locked while a run writes it, new folders are unique across processes, `last` moves only once
training started, SIGINT / SIGTERM save a checkpoint that resumes exactly, stale temporary files are removed,
and configuration mistakes are one-line errors (exit code 2)."""

import csv
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hier_lm.config import compose_train_config
from hier_lm.files import remove_stale_temporaries
from hier_lm.runs import LOCK_FILE, RunLock, new_run_dir
from hier_lm.train import train
from tests.helpers import subprocess_env, tiny_overrides

REPO = Path(__file__).resolve().parents[1]

pytestmark = [  # Lightning's notes when a run is resumed in (a copy of) its folder: expected here
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]


def run(overrides: list[str], recipe: str = "quickstart") -> Path:
    return train(compose_train_config([f"recipe={recipe}", *overrides]), recipe=recipe)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (its bytes), folder and symlink (its target) under `folder`, by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        found[name] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file() else "/"
    return found


def metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    """`{(step, name): value}` of every logged metric but the wall-clock throughput."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {(int(row["step"]), name): float(value) for row in csv.DictReader(f) for name, value in row.items()
                if value and name not in ("step", "epoch", "train/tokens_per_sec")}


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory) -> Path:
    """A finished 2-step quickstart run under `<runs>/quickstart/`."""
    return run(tiny_overrides(corpus_dir, tmp_path_factory.mktemp("runs")))


@pytest.fixture
def old_run(finished, tmp_path) -> Path:
    """A copy of the finished run (with its group and `last` link) that a test may resume."""
    group = tmp_path / "runs" / "quickstart"
    shutil.copytree(finished, group / finished.name)
    (group / "last").symlink_to(finished.name)
    return group / finished.name


# 1. A refused resume leaves the run as it was (config.yaml is written only after the checkpoint restored).

def corrupt(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint at all")


@pytest.mark.parametrize("recipe, extra, change, message", [
    ("quickstart_transformer", [], None, "holds a model of family 'hourglass'"),  # another model family
    ("quickstart", [], corrupt, "not a readable checkpoint"),
    ("quickstart", ["data.seed=5"], None, "resume with data.seed=0"),
])
def test_a_refused_resume_changes_nothing(recipe, extra, change, message, old_run, corpus_dir):
    if change:
        change(old_run)
    before = snapshot(old_run.parent)
    overrides = tiny_overrides(corpus_dir, old_run.parent.parent, steps=4, recipe=recipe)
    with pytest.raises(ValueError, match=message):
        run([*overrides, *extra, f"resume={old_run}"], recipe=recipe)
    assert snapshot(old_run.parent) == before


# 2. The run folder lock.

def test_a_second_run_into_a_locked_folder_is_refused(old_run, corpus_dir):
    overrides = tiny_overrides(corpus_dir, old_run.parent.parent, steps=3)
    with RunLock(old_run):  # as a run writing the folder holds it
        before = snapshot(old_run.parent)
        for target in (f"run_dir={old_run}", f"resume={old_run}", "resume=auto"):
            with pytest.raises(ValueError, match=rf"in use by a running run \(pid {os.getpid()}\)"):
                run([*overrides, target])
            assert snapshot(old_run.parent) == before
    assert not (old_run / LOCK_FILE).exists()  # released: the lock file goes with the lock
    resumed = run([*overrides, "resume=auto"])
    assert resumed == old_run and not (old_run / LOCK_FILE).exists()
    assert torch.load(old_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_crashed_runs_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("99999999\n")  # what a killed run leaves: the file, no lock (flock died)
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


# 3. New run folders are unique across processes starting within one second.

def claim_folder(group: Path, start, queue) -> None:
    start.wait()
    run_dir = new_run_dir(group)
    with RunLock(run_dir):
        (run_dir / "owner").write_text(str(os.getpid()))
        queue.put((str(run_dir), os.getpid()))


def test_processes_starting_together_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # all in the same second
    context = multiprocessing.get_context("fork")
    start, queue = context.Barrier(4), context.Queue()
    workers = [context.Process(target=claim_folder, args=(tmp_path, start, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    claimed = dict(queue.get(timeout=5) for _ in workers)
    assert sorted(Path(folder).name for folder in claimed) == \
        ["20260101-000000", "20260101-000000-1", "20260101-000000-2", "20260101-000000-3"]
    for folder, pid in claimed.items():
        assert (Path(folder) / "owner").read_text() == str(pid)  # nobody wrote another's folder


# 4. `last` moves only once training started; a failed start leaves no folder.

@pytest.mark.parametrize("bad, message", [
    ("model.d_model=130", "not divisible by n_heads"),
    ("+model.foo=1", "no option 'foo'"),
    ("+data.foo=1", r"data.foo is not an option of .*TextFilesDataModule: drop it \(~data.foo\)"),
    ("+trainer.foo=1", r"trainer.foo is not an option"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0: give a whole number of steps >= 1"),
    ("checkpoint.every_n_steps=-2", "checkpoint.every_n_steps=-2: give a whole number"),
])
def test_a_failed_start_keeps_last_and_leaves_no_folder(bad, message, old_run, corpus_dir):
    runs = old_run.parent.parent
    before = snapshot(runs)
    with pytest.raises(ValueError, match=message):
        run([*tiny_overrides(corpus_dir, runs), bad])
    assert snapshot(runs) == before  # no new run folder, `last` -> the old run, which is unchanged
    with pytest.raises(ValueError, match=message):  # into a new runs_dir: nothing is created at all
        run([*tiny_overrides(corpus_dir, runs.parent / "fresh" / "runs"), bad])
    assert not (runs.parent / "fresh").exists()


def test_last_moves_once_training_started(old_run, corpus_dir):
    new = run(tiny_overrides(corpus_dir, old_run.parent.parent))
    assert new != old_run and (old_run.parent / "last").resolve() == new.resolve()
    assert (new / "config.yaml").is_file() and not (new / LOCK_FILE).exists()


# 5. Stale temporary files of a killed save are removed at the next save.

def test_stale_temporaries_are_removed_at_the_next_save(old_run, corpus_dir):
    checkpoints = old_run / "checkpoints"
    stale = [checkpoints / ".last.ckpt.tmp99999999", checkpoints / ".step_2.ckpt.tmp1"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    run([*tiny_overrides(corpus_dir, old_run.parent.parent, steps=3), "resume=auto"])
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step_2.ckpt", "step_3.ckpt"]


def test_remove_stale_temporaries_keeps_this_process_and_other_files(tmp_path):
    names = [".last.ckpt.tmp123", f".last.ckpt.tmp{os.getpid()}", "last.ckpt", ".notes.tmp", "x.tmp5"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".step_4.ckpt.tmp").mkdir()  # a sharded save's temporary folder: FSDP2Strategy's to clean
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.ckpt.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], ".step_4.ckpt.tmp"])


# 6. SIGINT / SIGTERM: a checkpoint at the next step boundary, exit 130 / 143, and an exact resume.

STEPS = 12


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hier_lm.train", "recipe=quickstart", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("straight")
    return run([*tiny_overrides(corpus_dir, runs, steps=STEPS), "checkpoint.every_n_steps=3"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(signum, uninterrupted, corpus_dir, tmp_path):
    overrides = [*tiny_overrides(corpus_dir, tmp_path, steps=STEPS), "checkpoint.every_n_steps=3"]
    process = launch(*overrides)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("quickstart/*/checkpoints/step_3.ckpt")):  # a few steps in
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signum)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signum, output
    assert f"{signum.name}: stopping after step" in output
    run_dir = (tmp_path / "quickstart" / "last").resolve()
    stopped = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped < STEPS  # stopped early, after the step in flight
    assert not (run_dir / LOCK_FILE).exists()

    assert run([*overrides, "resume=auto"]) == run_dir
    expected, got = metrics(uninterrupted), metrics(run_dir)
    assert {step for step, _ in got} == {step for step, _ in expected}  # no step lost, none logged twice
    for key, value in expected.items():
        assert got.get(key) == pytest.approx(value, rel=1e-5), key


# 7. Configuration mistakes at the command line: one line, exit code 2, nothing written.

@pytest.mark.slow
@pytest.mark.parametrize("module, args, message", [
    ("hier_lm.train", ["recipe=quickstart", "model.d_model=abc"],
     "model.d_model=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("hier_lm.train", ["recipe=quickstart", "+model.foo=1"], "HourglassConfig has no option 'foo'"),
    ("hier_lm.train", ["recipe=quickstart", "data=enwik8", "data.path=nowhere.zip"], "nowhere.zip"),
    ("hier_lm.train", ["recipe=quickstart", "trainer.no_such_key=1"], "trainer.no_such_key"),
    ("hier_lm.train", ["recipe=no_such_recipe"], "Available options in 'recipe': enwik8_flash"),
    ("hier_lm.evaluate", ["ckpt=nowhere", "split=valid", "no_such_key=1"], "no_such_key"),
    ("hier_lm.sample", ["ckpt=nowhere", "no_such_key=1"], "no_such_key"),
])
def test_configuration_mistakes_are_one_line(module, args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                            env=subprocess_env(HIER_LM_DATA=str(tmp_path / "data")), timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr  # after Lightning's notes, if any
    assert result.stderr.strip().endswith(errors[0]) and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # the default runs_dir
