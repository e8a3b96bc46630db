"""Byte corpus (path resolution, cache, splits) and TextFilesDataModule (batches, resume, eval windows)."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import hier_lm.data.text.corpus as corpus_module
from hier_lm.data import ByteCorpus, TextFilesDataModule, resolve_paths, stdlib_files
from hier_lm.data.cache import default_data_root, host_tag

SEQ_LEN, BATCH = 32, 4
DEAD_PID = 2 ** 22 + 12345  # above Linux's largest pid: the writer that left it was killed


def write_files(folder: Path, sizes=(300, 1, 450, 250), seed=0) -> list[Path]:
    """Files of random bytes (any value 0..255, so windows are unique and locatable) of the given sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i, size in enumerate(sizes):
        files.append(folder / f"f{i}.bin")
        files[-1].write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return files


def concat(files) -> bytes:
    return b"".join(Path(f).read_bytes() for f in files)


def files_state(folder: Path) -> dict:
    """Each file's inode, mtime and bytes: equal states mean nothing was rewritten or replaced."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def entropy_bits(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------------------- resolve_paths


def test_resolve_paths_globs_folders_dedup_and_sort(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for rel in ("b.py", "a.py", "notes.txt", "sub/c.py", "sub/deep/d.py", ".hidden.py", ".git/objects/x.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    monkeypatch.setenv("CORPUS_DIR", str(src))
    monkeypatch.setenv("HOME", str(tmp_path))

    assert resolve_paths([f"{src}/*.py"]) == [src / "a.py", src / "b.py"]
    assert resolve_paths([f"{src}/**/*.py"]) == [src / "a.py", src / "b.py", src / "sub/c.py", src / "sub/deep/d.py"]
    # Overlapping entries (glob, folder, plain file, env var, ~) give each file once, sorted.
    got = resolve_paths(["$CORPUS_DIR/sub", str(src / "a.py"), "~/src/*.py", f"{src}/sub/deep/../c.py"])
    assert got == [src / "a.py", src / "b.py", src / "sub/c.py", src / "sub/deep/d.py"]
    # A folder means every non-hidden file under it; globs keep files only (not the folders they match).
    assert resolve_paths([str(src)]) == [src / "a.py", src / "b.py", src / "notes.txt", src / "sub/c.py",
                                         src / "sub/deep/d.py"]
    assert resolve_paths([f"{src}/*"]) == [src / "a.py", src / "b.py", src / "notes.txt"]
    assert all(p.is_absolute() for p in got)


def test_resolve_paths_stdlib_lists_the_standard_library():
    files = resolve_paths(["stdlib"])
    assert len(files) > 1000
    assert files == stdlib_files()
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert [p.as_posix() for p in files] == sorted(p.as_posix() for p in files)
    assert any(p.name == "textwrap.py" for p in files)


def test_resolve_paths_names_the_patterns_that_match_nothing(tmp_path):
    write_files(tmp_path / "src")
    with pytest.raises(FileNotFoundError) as err:
        resolve_paths([f"{tmp_path}/src/*.bin", f"{tmp_path}/nope/**/*.py", str(tmp_path / "missing.txt")])
    message = str(err.value)
    assert f"{tmp_path}/nope/**/*.py" in message and str(tmp_path / "missing.txt") in message
    assert f"{tmp_path}/src/*.bin" not in message
    assert "data.paths=['src/**/*.py']" in message
    with pytest.raises(ValueError, match="data.paths is empty"):
        resolve_paths([])


# ------------------------------------------------------------------------------------------- ByteCorpus


def test_corpus_bytes_splits_meta_and_entropy(tmp_path):
    files = write_files(tmp_path / "src")  # 1001 bytes
    data = concat(files)
    corpus = ByteCorpus.build(files, tmp_path / "cache")

    assert corpus.path.parent == tmp_path / "cache" / "textfiles" and len(corpus.path.name) == 16
    assert (corpus.path / "corpus.bin").read_bytes() == data
    # 90 / 5 / 5 by bytes, boundaries rounded down: floor(1001 * 0.9) = 900, floor(1001 * 0.95) = 950.
    splits = {name: bytes(corpus.split(name)) for name in ("train", "valid", "test")}
    assert [len(s) for s in splits.values()] == [900, 50, 51]
    assert splits["train"] + splits["valid"] + splits["test"] == data
    assert corpus.meta["splits"] == {"train": [0, 900], "valid": [900, 950], "test": [950, 1001]}
    assert corpus.meta["files"] == 4 and corpus.meta["bytes"] == 1001
    assert corpus.meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((corpus.path / "meta.json").read_text()) == corpus.meta
    for name, split_bytes in splits.items():
        assert corpus.unigram_entropy(name) == pytest.approx(entropy_bits(split_bytes), rel=1e-12)
    train = corpus.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint8 and not train.flags.writeable
    with pytest.raises(ValueError):
        train[0] = 1


def test_corpus_split_boundaries_for_round_sizes(tmp_path):
    files = write_files(tmp_path / "src", sizes=(700, 1300))
    corpus = ByteCorpus.build(files, tmp_path / "cache", splits=(0.8, 0.15, 0.05))
    assert corpus.meta["splits"] == {"train": [0, 1600], "valid": [1600, 1900], "test": [1900, 2000]}


def test_corpus_cache_is_reused_and_invalidated(tmp_path):
    files = write_files(tmp_path / "src")
    first = ByteCorpus.build(files, tmp_path / "cache")
    stamps = [((first.path / n).stat().st_ino, (first.path / n).stat().st_mtime_ns) for n in ("corpus.bin", "meta.json")]

    again = ByteCorpus.build(files, tmp_path / "cache")
    assert again.path == first.path
    assert [((again.path / n).stat().st_ino, (again.path / n).stat().st_mtime_ns)
            for n in ("corpus.bin", "meta.json")] == stamps

    other_splits = ByteCorpus.build(files, tmp_path / "cache", splits=(0.8, 0.1, 0.1))
    assert other_splits.path != first.path

    seen = {first.path, other_splits.path}
    with open(files[2], "ab") as f:  # new size
        f.write(b"appended")
    changed = ByteCorpus.build(files, tmp_path / "cache")
    assert changed.path not in seen
    assert bytes(np.concatenate([changed.split(n) for n in ("train", "valid", "test")])) == concat(files)

    seen.add(changed.path)  # same size, new content and mtime
    mtime_ns = files[0].stat().st_mtime_ns
    files[0].write_bytes(bytes(255 - b for b in files[0].read_bytes()))
    os.utime(files[0], ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    rewritten = ByteCorpus.build(files, tmp_path / "cache")
    assert rewritten.path not in seen and (rewritten.path / "corpus.bin").read_bytes() == concat(files)


def test_interrupted_builds_are_rebuilt(tmp_path, monkeypatch):
    files = write_files(tmp_path / "src")
    folder = ByteCorpus.build(files, tmp_path / "cache").path

    # Killed while streaming: a partial corpus.bin in the dead writer's temporary folder, no cache.
    shutil.rmtree(folder)
    dead = folder.parent / f".{folder.name}.tmp-{host_tag()}-{DEAD_PID}"
    dead.mkdir()
    (dead / "corpus.bin").write_bytes(b"partial")
    corpus = ByteCorpus.build(files, tmp_path / "cache")
    assert (folder / "corpus.bin").read_bytes() == concat(files)
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.bin", "meta.json"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the leftover is gone

    # corpus.bin there, meta.json not: no finished corpus.
    (folder / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished byte corpus"):
        ByteCorpus(folder)
    assert ByteCorpus.build(files, tmp_path / "cache").meta == corpus.meta

    # A corpus.bin shorter than meta.json says (a damaged cache) is rebuilt too.
    with open(folder / "corpus.bin", "r+b") as f:
        f.truncate(10)
    assert ByteCorpus.build(files, tmp_path / "cache").meta == corpus.meta
    assert (folder / "corpus.bin").read_bytes() == concat(files)

    # A failure during the build leaves no meta.json behind, and the next build succeeds.
    (folder / "meta.json").unlink()
    monkeypatch.setattr(corpus_module, "entropy_bits", lambda counts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ByteCorpus.build(files, tmp_path / "cache")
    assert not (folder / "meta.json").exists() and [p.name for p in folder.parent.iterdir()] == [folder.name]
    monkeypatch.undo()
    assert ByteCorpus.build(files, tmp_path / "cache").meta == corpus.meta


# ------------------------------------------------------------------------------------------- the cache writer


def test_cache_writer_keeps_the_old_cache_until_the_new_one_is_complete(tmp_path, monkeypatch):
    bounds = {"train": [0, 800], "valid": [800, 900], "test": [900, 1000]}
    old_bytes, new_bytes = (np.random.default_rng(seed).bytes(1000) for seed in (1, 2))
    folder = tmp_path / "cache"
    old = ByteCorpus.write(folder, [old_bytes[:300], old_bytes[300:]], bounds)
    assert old.meta["sha256"] == hashlib.sha256(old_bytes).hexdigest()  # recorded as written, for prepare
    (folder / "source.zip").write_bytes(b"not part of the cache")  # e.g. a download kept beside it
    state = files_state(folder)

    def reject(sha256: str) -> None:
        raise ValueError(f"rejected {sha256}")

    # A write that fails, while streaming or once complete, leaves the old cache untouched and nothing else.
    for chunks, verify in (([new_bytes[:500]], None), ([new_bytes], reject)):
        with pytest.raises(ValueError, match="expected 1,000 bytes|rejected"):
            ByteCorpus.write(folder, chunks, bounds, verify=verify)
        assert files_state(folder) == state and [p.name for p in tmp_path.iterdir()] == ["cache"]

    # Interrupted while publishing (the old cache set aside, the new data in, its meta not yet): the old cache
    # is put back as it was.
    replace, calls = os.replace, []

    def interrupted(source, target):
        calls.append(Path(target).name)
        if Path(target) == folder / "meta.json" and Path(source).parent.name.startswith(".cache.tmp-"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ByteCorpus.write(folder, [new_bytes], bounds)
    monkeypatch.undo()
    # Written into the temporary folder; set aside (meta first); moved in: data, then meta (interrupted); put back.
    assert calls == ["corpus.bin", "meta.json", "meta.json", "corpus.bin", "corpus.bin", "meta.json", "corpus.bin",
                     "meta.json"]
    assert files_state(folder) == state and [p.name for p in tmp_path.iterdir()] == ["cache"]

    # The same, killed (nothing cleaned up): the next open of the cache puts the old one back.
    aside = tmp_path / f".cache.old-{host_tag()}-{DEAD_PID}"
    aside.mkdir()
    for name in ("meta.json", "corpus.bin"):
        os.replace(folder / name, aside / name)
    (folder / "corpus.bin").write_bytes(new_bytes)
    (tmp_path / f".cache.tmp-{host_tag()}-{DEAD_PID}").mkdir()
    assert ByteCorpus.open_finished(folder).meta == old.meta
    assert files_state(folder) == state and [p.name for p in tmp_path.iterdir()] == ["cache"]

    # A complete write replaces the cache; files that are not part of it stay.
    new = ByteCorpus.write(folder, [new_bytes], bounds)
    assert new.meta["sha256"] == hashlib.sha256(new_bytes).hexdigest() != old.meta["sha256"]
    assert bytes(np.concatenate([new.split(n) for n in ("train", "valid", "test")])) == new_bytes
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.bin", "meta.json", "source.zip"]
    assert (folder / "source.zip").read_bytes() == b"not part of the cache"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_file_that_changes_while_caching_is_an_error(tmp_path):
    # /proc files report size 0 but have content: as if the file grew between stat and read.
    files = [*write_files(tmp_path / "src"), Path("/proc/self/status")]
    with pytest.raises(RuntimeError, match="changed while the corpus was being cached"):
        ByteCorpus.build(files, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("meta.json"))


@pytest.mark.parametrize("splits", [(0.9, 0.1), (0.9, 0.2, -0.1), (0.5, 0.3, 0.3), ("a", 0.5, 0.5),
                                    (math.nan, 0.5, 0.5), 0.9])
def test_bad_splits_are_clear_errors(tmp_path, splits):
    files = write_files(tmp_path / "src")
    with pytest.raises(ValueError, match=r"data\.splits must be three non-negative fractions"):
        ByteCorpus.build(files, tmp_path / "cache", splits=splits)


def test_empty_splits_corpus_and_unknown_split_names(tmp_path):
    files = write_files(tmp_path / "src", sizes=(50,))
    with pytest.raises(ValueError, match="at least 1 byte"):  # floor(50 * 0.95) = 47: fine; (0.98, .01, .01) not
        ByteCorpus.build(files, tmp_path / "cache", splits=(0.98, 0.01, 0.01))
    with pytest.raises(ValueError, match="at least 1 byte"):
        ByteCorpus.build(files, tmp_path / "cache", splits=(1.0, 0.0, 0.0))
    empty = write_files(tmp_path / "empty", sizes=(0, 0))
    with pytest.raises(ValueError, match="empty"):
        ByteCorpus.build(empty, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    corpus = ByteCorpus.build(files, tmp_path / "cache")
    for bad in ("val", "training"):
        with pytest.raises(ValueError, match=r"unknown split .*'train', 'valid', 'test'"):
            corpus.split(bad)
        with pytest.raises(ValueError, match="unknown split"):
            corpus.unigram_entropy(bad)


def test_default_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HIER_LM_DATA", str(tmp_path / "env-root"))
    assert default_data_root() == tmp_path / "env-root"
    files = write_files(tmp_path / "src")
    assert ByteCorpus.build(files).path.parent == tmp_path / "env-root" / "textfiles"
    monkeypatch.delenv("HIER_LM_DATA")
    assert default_data_root() == Path("data")


# ----------------------------------------------------------------------------------- TextFilesDataModule


@pytest.fixture
def src(tmp_path) -> Path:
    write_files(tmp_path / "src", sizes=(6000, 9000, 5000))  # 20,000 bytes: train 18,000, valid 1,000, test 1,000
    return tmp_path / "src"


def datamodule(src: Path, **kwargs) -> TextFilesDataModule:
    options = {"paths": [f"{src}/*.bin"], "root": src.parent / "cache", "seq_len": SEQ_LEN, "batch_size": BATCH,
               **kwargs}
    dm = TextFilesDataModule(**options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def first_batches(dm: TextFilesDataModule, n: int) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_train_batches_are_train_windows(src):
    dm = datamodule(src)
    assert dm.vocab_size == 256 and dm.metric == "bpc"
    assert dm.hparams.seq_len == SEQ_LEN and dm.hparams.paths == [f"{src}/*.bin"]
    train, held_out = bytes(dm.corpus.split("train")), bytes(dm.corpus.split("valid")) + bytes(dm.corpus.split("test"))
    starts = set()
    for batch in first_batches(dm, 25):
        assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == torch.long
        for row in batch:
            window = bytes(row.to(torch.uint8).tolist())
            starts.add(train.find(window))
            assert train.find(window) >= 0 and held_out.find(window) == -1
    assert -1 not in starts and len(starts) > 90  # 100 windows of random bytes: random, distinct starts


def test_train_batches_depend_only_on_seed_rank_and_index(src):
    a, b = first_batches(datamodule(src, seed=3), 3), first_batches(datamodule(src, seed=3), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    other = first_batches(datamodule(src, seed=4), 3)
    assert not any(torch.equal(x, y) for x, y in zip(a, other))
    # Each step's global batch is split over the ranks (rows [rank * B, (rank + 1) * B)), so rank 1 of 2 gets
    # the second half of what one process with twice the batch gets, and never rank 0's windows.
    double = first_batches(datamodule(src, seed=3, batch_size=2 * BATCH), 3)
    ranked = datamodule(src, seed=3)
    ranked.trainer = SimpleNamespace(global_rank=1, world_size=2, global_step=0, accumulate_grad_batches=1)
    assert all(torch.equal(x, y[BATCH:]) for x, y in zip(first_batches(ranked, 3), double))
    ranked.trainer.global_rank = 0
    assert all(torch.equal(x, y[:BATCH]) for x, y in zip(first_batches(ranked, 3), double))


def test_worker_count_does_not_change_the_batches(src):
    serial = first_batches(datamodule(src, seed=5), 7)
    loader = datamodule(src, seed=5, num_workers=2).train_dataloader()
    assert loader.num_workers == 2 and loader.batch_size is None and not loader.persistent_workers
    it = iter(loader)
    parallel = [next(it) for _ in range(7)]
    del it
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel))


def test_resume_starts_at_the_saved_batch(src):
    fresh = first_batches(datamodule(src, seed=7), 6)
    dm = datamodule(src, seed=7)
    assert dm.state_dict() == {"train_batches": 0, "seed": 7}
    dm.load_state_dict({"train_batches": 3, "seed": 7})
    assert dm.state_dict() == {"train_batches": 3, "seed": 7}
    assert all(torch.equal(x, y) for x, y in zip(first_batches(dm, 3), fresh[3:]))

    with_workers = datamodule(src, seed=7, num_workers=2)
    with_workers.load_state_dict({"train_batches": 3, "seed": 7})
    assert all(torch.equal(x, y) for x, y in zip(first_batches(with_workers, 3), fresh[3:]))

    # Attached to a trainer, the position is the optimizer steps times the accumulation; with accumulation,
    # the micro-batches of a step split its global batch, so batch 4 is the first half of step 2's batch.
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=2, accumulate_grad_batches=2)
    assert dm.state_dict() == {"train_batches": 4, "seed": 7}
    step_2 = first_batches(datamodule(src, seed=7, batch_size=2 * BATCH), 3)[2]
    assert torch.equal(first_batches(dm, 1)[0], step_2[:BATCH])

    with pytest.raises(ValueError, match=r"data\.seed=6.*data\.seed=7"):
        datamodule(src, seed=7).load_state_dict({"train_batches": 3, "seed": 6})


class _Recorder(L.LightningModule):
    """Records the training batches it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_recording(datamodule: L.LightningDataModule, max_steps: int, root, ckpt_path=None):
    """Train a `_Recorder` on `datamodule` (2 batches per step, no validation, no checkpoints written) for
    `max_steps` steps, resuming from `ckpt_path` if given; returns (trainer, the training batches it saw)."""
    module = _Recorder()
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module.seen


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_checkpoint_resume_continues_the_batch_sequence(src, tmp_path):
    def fit(max_steps, ckpt_path=None):
        return fit_recording(datamodule(src, seed=9), max_steps, tmp_path / "run", ckpt_path)

    trainer, uninterrupted = fit(3)
    assert len(uninterrupted) == 6 and trainer.datamodule.state_dict() == {"train_batches": 6, "seed": 9}
    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    assert torch.load(tmp_path / "step1.ckpt", weights_only=False)["TextFilesDataModule"] == {
        "train_batches": 2, "seed": 9}
    _, resumed = fit(3, ckpt_path=tmp_path / "step1.ckpt")
    assert len(resumed) == 4
    assert all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted[2:]))


@pytest.mark.parametrize(("split", "seq_len", "count"), [("valid", 32, 31), ("test", 25, 39)])
def test_eval_windows_partition_the_split(src, split, seq_len, count):
    # Both splits have 1,000 bytes: 31 windows of 32 targets (7 bytes left over), or 39 of 25 (the 40th
    # would need byte 1,000), the last partial window dropped.
    dm = datamodule(src, seq_len=seq_len, eval_batch_size=5)
    dm.setup("validate")
    loader = dm.val_dataloader() if split == "valid" else dm.test_dataloader()
    assert loader.batch_size == 5 and isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    batches = list(loader)
    windows = torch.cat(batches)
    assert all(b.dtype == torch.long and b.shape[1:] == (seq_len + 1,) for b in batches)
    assert windows.shape == (count, seq_len + 1) and len(loader) == math.ceil(count / 5)
    assert dm.num_eval_tokens(split) == count * seq_len == sum(b[:, 1:].numel() for b in batches)
    stream = torch.cat([windows[:, :-1].flatten(), windows[-1, -1:]])
    assert bytes(stream.to(torch.uint8).tolist()) == bytes(dm.corpus.split(split))[: count * seq_len + 1]
    assert torch.equal(windows[1:, 0], windows[:-1, -1])  # each window's last target opens the next one
    for out_of_range in (-1, count):
        with pytest.raises(IndexError):
            loader.dataset[out_of_range]


def test_two_ranks_score_every_eval_window_once(src):
    dm = datamodule(src, eval_batch_size=4)
    windows = torch.cat(list(dm.val_dataloader()))  # one rank: 31 windows of 32 targets
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1,
                                     distributed_sampler_kwargs={"rank": rank, "num_replicas": 2})
        loader = dm.val_dataloader()
        # A sequential one-replica DistributedSampler: Lightning keeps it instead of sharding (and padding) again.
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and loader.sampler.num_replicas == 1
        shards.append([(tuple(w.tolist()), int(c)) for batch, context in loader for w, c in zip(batch, context)])
    dm.trainer = None
    assert len(shards[0]) == len(shards[1]) == 16
    scored = [[w for w, c in shard if c == 0] for shard in shards]
    assert not set(scored[0]) & set(scored[1])
    assert sorted(scored[0] + scored[1]) == sorted(tuple(w.tolist()) for w in windows)
    assert [c for shard in shards for _, c in shard if c] == [SEQ_LEN]  # one padding window, all context


def test_hyperparameters_are_plain_values_that_load_with_weights_only(src, tmp_path):
    # Hydra passes ListConfig and the caller may pass a Path: the checkpointed hparams must still be plain.
    dm = TextFilesDataModule(paths=OmegaConf.create([f"{src}/*.bin"]), root=tmp_path / "cache",
                             splits=OmegaConf.create([0.8, 0.1, 0.1]))
    assert dm.hparams.paths == [f"{src}/*.bin"] and type(dm.hparams.paths) is list
    assert dm.hparams.root == str(tmp_path / "cache") and dm.hparams.splits == (0.8, 0.1, 0.1)
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(dm.hparams)
    with pytest.raises(ValueError, match=r"data\.splits must be"):
        TextFilesDataModule(splits=(0.5, 0.4))


def test_eval_batch_size_defaults_to_batch_size_and_bad_names(src):
    dm = datamodule(src)
    assert dm.val_dataloader().batch_size == BATCH
    with pytest.raises(ValueError, match="unknown evaluation split"):
        dm.num_eval_tokens("train")


def test_seq_len_longer_than_a_split_is_a_clear_error(src):
    dm = datamodule(src, seq_len=1000)  # valid and test have 1,000 bytes: one short of seq_len + 1
    with pytest.raises(ValueError, match=r"valid split has 1,000 bytes.*lower data\.seq_len or add files"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match=r"test split.*lower data\.seq_len"):
        dm.test_dataloader()
    assert next(iter(dm.train_dataloader())).shape == (BATCH, 1001)
    # The longest window that fits: train has 18,000 bytes, so every row is the whole train split.
    whole = datamodule(src, seq_len=17999)
    for batch in first_batches(whole, 20):
        assert (batch == torch.from_numpy(np.array(whole.corpus.split("train"), dtype=np.int64))).all()
    assert datamodule(src, seq_len=999).num_eval_tokens("valid") == 999
    with pytest.raises(ValueError, match=r"data\.seq_len must be at least 1"):
        TextFilesDataModule(seq_len=0)
