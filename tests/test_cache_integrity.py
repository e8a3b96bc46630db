"""Dataset caches detect damage when opened: a changed byte in any split, a truncated or missing data file, a
changed tokenizer. A damaged cache is rebuilt from its sources when the caller has them (with a one-line warning),
else it is a one-line error that changes nothing on disk. Caches written before the chunk checksums still open
(checked against their recorded sha256, then upgraded). A data root that is a file is a one-line error."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import xxhash

from benchmarks import cache_verify
import hier_lm.data.cache as cache_module
from hier_lm.config import compose_train_config
from hier_lm.data import ByteCorpus, Enwik8DataModule, TextFilesDataModule, resolve_paths
from hier_lm.data.__main__ import main as data_cli
from hier_lm.data.cache import CHECKSUMS, CorruptCacheError, MemmapCache, chunk_ranges
from hier_lm.data.imagenet.cache import ImageNetCache
from hier_lm.data.lm1b.cache import TOKENIZER, TOKENS, TokenCorpus
from hier_lm.evaluate import evaluate
from hier_lm.train import train
from tests.helpers import TINY_MODEL, tiny_overrides
from tests.test_cli import entry_config
from tests.test_enwik8 import fake_enwik8, make_zip
from tests.test_imagenet import TARS, imagenet, write_oord
from tests.test_lm1b import TAR, lm1b
from tests.test_textfiles import concat, write_files

SPLITS = ("train", "valid", "test")


def flip(path: Path, offset: int) -> None:
    """Overwrite the byte at `offset` of `path` with another value, in place (same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))


def tree_state(root: Path) -> dict:
    """Every path under `root`, with each file's inode, mtime and bytes: equal states mean nothing was written,
    replaced, created or deleted."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def one_warning(err: str) -> str:
    """The one warning line of the stderr text `err` (progress lines aside)."""
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1, lines
    return lines[0]


def strip_checksums(folder: Path) -> dict:
    """Make the cache in `folder` look written before the chunk checksums; returns the meta it had."""
    meta = json.loads((folder / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k != CHECKSUMS}
    (folder / "meta.json").write_text(json.dumps(old, indent=2) + "\n")
    return meta


# ------------------------------------------------------------------------------------------- the checksums


def test_chunks_tile_the_file_never_straddle_a_split_and_match_xxh3(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 100)
    assert chunk_ranges(0) == []
    assert chunk_ranges(250) == [(0, 100), (100, 200), (200, 250)]
    assert chunk_ranges(250, [0, 120, 120, 130, 250, 999]) == [(0, 100), (100, 120), (120, 130), (130, 230),
                                                               (230, 250)]
    data = np.random.default_rng(0).bytes(1000)
    bounds = {"train": [0, 900], "valid": [900, 950], "test": [950, 1000]}
    corpus = ByteCorpus.write(tmp_path / "c", [data[:333], data[333:]], bounds)
    chunks = corpus.meta[CHECKSUMS]["files"]["corpus.bin"]
    assert corpus.meta[CHECKSUMS]["algorithm"] == "xxh3_64"
    assert [(s, e) for s, e, _ in chunks] == [*((s, s + 100) for s in range(0, 900, 100)), (900, 950), (950, 1000)]
    assert [d for _, _, d in chunks] == [xxhash.xxh3_64_hexdigest(data[s:e]) for s, e, _ in chunks]

    # Damage in several chunks: adjacent ones are reported as one range, with the splits they touch.
    for offset in (150, 250, 420, 960):
        flip(corpus.path / "corpus.bin", offset)
    message = "bytes [100, 300), [400, 500) and 1 more differ from those written, in the train split and " \
              "the test split"
    with pytest.raises(CorruptCacheError, match=re.escape(message)):
        ByteCorpus(corpus.path)


def test_any_cache_kind_gets_the_check_from_the_writer(tmp_path):
    class Blobs(MemmapCache):  # a new kind of cache: file sizes only, no regions, no recorded sha256
        kind = "blob cache"

        @classmethod
        def file_sizes(cls, meta):
            return {name: size for name, size in meta["sizes"].items()}

    blobs = {"a.bin": b"x" * 10, "b.bin": bytes(range(200)), "empty.bin": b""}
    with Blobs.writer(tmp_path / "blobs") as writer:
        for name, data in blobs.items():
            writer.add(name, [data])
        writer.publish({"sizes": {name: len(data) for name, data in blobs.items()}})
    assert Blobs(tmp_path / "blobs").meta[CHECKSUMS]["files"]["empty.bin"] == []
    flip(tmp_path / "blobs" / "b.bin", 199)
    state = tree_state(tmp_path)
    with pytest.raises(CorruptCacheError, match=r"b\.bin is corrupt \(bytes \[0, 200\) differ from those written\)"):
        Blobs.open_finished(tmp_path / "blobs")
    assert tree_state(tmp_path) == state


# ----------------------------------------------------------------------------------------- textfiles


@pytest.mark.parametrize("split", SPLITS)
def test_a_changed_byte_in_a_split_is_detected_and_rebuilt_from_the_sources(tmp_path, split, capsys):
    files = write_files(tmp_path / "src")  # 1,001 bytes: train [0, 900), valid [900, 950), test [950, 1001)
    corpus = ByteCorpus.build(files, tmp_path / "cache")
    start, end = corpus.meta["splits"][split]
    flip(corpus.path / "corpus.bin", (start + end) // 2)
    state = tree_state(tmp_path / "cache")

    # Nothing to rebuild from: an error naming the file, the damaged split and the fix, and nothing changes.
    expected = f"{corpus.path / 'corpus.bin'} is corrupt (bytes [{start:,}, {end:,}) differ from those written, " \
               f"in the {split} split): delete {corpus.path / 'meta.json'} and run again to rebuild"
    for open_cache in (ByteCorpus, ByteCorpus.open_finished):
        with pytest.raises(CorruptCacheError, match=re.escape(expected)):
            open_cache(corpus.path)
        assert tree_state(tmp_path / "cache") == state

    # The DataModule has its sources: it rebuilds the cache (one warning line) and serves the right bytes.
    dm = TextFilesDataModule(paths=[str(tmp_path / "src")], root=tmp_path / "cache", seq_len=8, batch_size=2)
    dm.prepare_data()
    assert one_warning(capsys.readouterr().err) == f"warning: {corpus.path / 'corpus.bin'} is corrupt (bytes [{start:,}, {end:,}) " \
                                  f"differ from those written, in the {split} split): rebuilding the byte corpus " \
                                  "from its 4 source files"
    dm.setup("fit")
    assert bytes(dm.corpus.split(split)) == concat(files)[start:end]
    assert (corpus.path / "corpus.bin").read_bytes() == concat(files)
    assert capsys.readouterr().err == ""  # setup found it intact


def test_truncated_extended_or_missing_data_is_detected(tmp_path, capsys):
    files = write_files(tmp_path / "src")
    corpus = ByteCorpus.build(files, tmp_path / "cache")
    data = corpus.path / "corpus.bin"
    for damage, detail in ((lambda: os.truncate(data, 500), "it has 500 bytes, not the 1,001 it was written with"),
                           (lambda: data.write_bytes(concat(files) + b"!"),
                            "it has 1,002 bytes, not the 1,001 it was written with"),
                           (data.unlink, "it is missing")):
        damage()
        state = tree_state(tmp_path / "cache")
        with pytest.raises(CorruptCacheError, match=re.escape(f"{data} is corrupt ({detail}): delete")):
            ByteCorpus(corpus.path)
        assert tree_state(tmp_path / "cache") == state
        assert ByteCorpus.build(files, tmp_path / "cache").meta == corpus.meta
        assert one_warning(capsys.readouterr().err).startswith(f"warning: {data} is corrupt ({detail}): rebuilding")
        assert data.read_bytes() == concat(files)


def test_an_intact_cache_opens_without_rebuild_or_writes(tmp_path, capsys):
    files = write_files(tmp_path / "src")
    corpus = ByteCorpus.build(files, tmp_path / "cache")
    state = tree_state(tmp_path / "cache")
    for _ in range(2):
        assert ByteCorpus.build(files, tmp_path / "cache").meta == corpus.meta
    assert ByteCorpus(corpus.path).meta == corpus.meta
    assert tree_state(tmp_path / "cache") == state and capsys.readouterr().err == ""


def test_a_cache_without_chunk_checksums_is_checked_by_sha256_then_upgraded(tmp_path, monkeypatch, capsys):
    files = write_files(tmp_path / "src")
    folder = ByteCorpus.build(files, tmp_path / "cache").path
    meta = strip_checksums(folder)

    # Read-only folder: opens (checked against the recorded sha256), meta.json stays as it was.
    old_meta = (folder / "meta.json").read_text()

    def refuse(path, text):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(cache_module, "atomic_write_text", refuse)
    assert ByteCorpus(folder).meta == meta
    assert (folder / "meta.json").read_text() == old_meta
    monkeypatch.undo()

    # Writable: the checksums are added to meta.json (exactly those a new write records).
    assert ByteCorpus.build(files, tmp_path / "cache").meta == meta
    assert json.loads((folder / "meta.json").read_text()) == meta and capsys.readouterr().err == ""

    # An old cache whose bytes no longer match its sha256: an error, and meta.json is left as it was.
    strip_checksums(folder)
    flip(folder / "corpus.bin", 920)
    state = tree_state(tmp_path / "cache")
    with pytest.raises(CorruptCacheError, match="corpus.bin is corrupt .its sha256 differs from the one recorded in "
                                                "meta.json.: delete"):
        ByteCorpus(folder)
    assert tree_state(tmp_path / "cache") == state
    assert ByteCorpus.build(files, tmp_path / "cache").meta == meta  # rebuilt from the sources
    assert "rebuilding the byte corpus from its 4 source files" in one_warning(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------- the data root


@pytest.mark.parametrize("how", ["env", "root", "below"])
def test_a_data_root_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch, capsys, how):
    write_files(tmp_path / "src")
    (tmp_path / "file").write_text("not a folder")
    state = tree_state(tmp_path)
    args = ["prepare", "textfiles", f"data.paths=[{tmp_path / 'src'}]"]
    if how == "env":
        monkeypatch.setenv("HIER_LM_DATA", str(tmp_path / "file"))
    else:
        args.append(f"data.root={tmp_path / 'file'}{'/sub' if how == 'below' else ''}")
    with pytest.raises(SystemExit) as exit_info:
        data_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'file'} is a file, not a folder, so no cache can be made in "
                          f"{tmp_path / 'file'}{'/sub' if how == 'below' else ''}/textfiles/")
    assert err.count("\n") == 1 and err.endswith(": point HIER_LM_DATA (or data.root=) at a folder\n")
    assert tree_state(tmp_path) == state


# ----------------------------------------------------------------------------------------- enwik8


def test_enwik8_rebuilds_from_its_zip_else_says_how(tmp_path, capsys):
    data = fake_enwik8()
    source = tmp_path / "enwik8.zip"
    source.write_bytes(make_zip(data))
    options = {"root": tmp_path / "data", "url": "http://127.0.0.1:9/enwik8.zip", "sha256": None, "raw_sha256": None,
               "split_sizes": [6000, 500, 500], "seq_len": 16, "batch_size": 2}
    dm = Enwik8DataModule(path=source, **options)
    dm.prepare_data()
    capsys.readouterr()
    folder = tmp_path / "data" / "enwik8"
    flip(folder / "corpus.bin", 6200)  # in the valid split

    # The zip is gone (only data.path had it): the prepare CLI exits 2 with one line; nothing changes.
    source.rename(tmp_path / "elsewhere.zip")
    state = tree_state(tmp_path / "data")
    args = ["prepare", "enwik8", f"data.root={tmp_path / 'data'}", "data.sha256=null", "data.raw_sha256=null",
            "data.split_sizes=[6000,500,500]", f"data.url={options['url']}"]
    with pytest.raises(SystemExit) as exit_info:
        data_cli(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {folder / 'corpus.bin'} is corrupt (bytes [6,000, 6,500) differ from those "
                          "written, in the valid split): pass data.path=/path/to/enwik8.zip to rebuild it, or delete "
                          f"{folder / 'meta.json'} to download enwik8.zip anew")
    assert tree_state(tmp_path / "data") == state

    # With data.path: rebuilt (one warning line), and prepare prints the checksum of the bytes now cached.
    data_cli([*args, f"data.path={tmp_path / 'elsewhere.zip'}"])
    out, err = capsys.readouterr()
    assert one_warning(err) == f"warning: {folder / 'corpus.bin'} is corrupt (bytes [6,000, 6,500) differ from " \
                                  f"those written, in the valid split): rebuilding the byte corpus from " \
                                  f"{tmp_path / 'elsewhere.zip'}"
    assert (folder / "corpus.bin").read_bytes() == data
    assert out.splitlines()[1] == f"  corpus.bin: 7,000 bytes, sha256 {hashlib.sha256(data).hexdigest()}"

    # A zip kept in the cache folder (as a download leaves it) is a source too.
    (tmp_path / "elsewhere.zip").rename(folder / "enwik8.zip")
    flip(folder / "corpus.bin", 10)
    dm = Enwik8DataModule(**options)
    dm.prepare_data()
    assert one_warning(capsys.readouterr().err).endswith(f"in the train split): rebuilding the byte corpus from {folder / 'enwik8.zip'}")
    assert (folder / "corpus.bin").read_bytes() == data


# ----------------------------------------------------------------------------------------- LM1B, images


def test_lm1b_tokens_and_tokenizer_damage_is_detected(tmp_path, capsys):
    source = tmp_path / "lm1b.tar.gz"
    source.write_bytes(TAR)
    corpus = lm1b(tmp_path / "data", path=source).corpus
    tokens = corpus.path / TOKENS
    intact, meta = tokens.read_bytes(), corpus.meta
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, (start, end) in meta["splits"].items():
        flip(tokens, (start + end) // 2 * itemsize + 1)
        state = tree_state(tmp_path / "data")
        with pytest.raises(CorruptCacheError, match=f"in the {split} split.: delete .*meta.json and run again"):
            lm1b(tmp_path / "data", path=None)  # no source given: the cache is all there is
        assert tree_state(tmp_path / "data") == state
        dm = lm1b(tmp_path / "data", path=source)
        assert one_warning(capsys.readouterr().err).endswith(f"in the {split} split): rebuilding the LM1B cache from {source}")
        assert tokens.read_bytes() == intact
        assert dm.corpus.meta == {k: v for k, v in meta.items() if k != "tokenizer_trained_on_sentences"}

    # The tokenizer beside the tokens is checked too.
    tokenizer = corpus.path / TOKENIZER
    tokenizer.write_text(tokenizer.read_text().replace('"</s>"', '"</S>"', 1))
    with pytest.raises(CorruptCacheError, match=f"{re.escape(str(tokenizer))} is corrupt .its sha256 differs"):
        TokenCorpus(corpus.path)


def test_image_cache_damage_in_either_split_is_detected(tmp_path, capsys):
    source = write_oord(tmp_path / "src", TARS)
    cache = imagenet(tmp_path / "data", path=source).cache
    intact = {split: (cache.path / f"{split}.u8").read_bytes() for split in ("train", "valid")}
    for split in intact:
        flip(cache.path / f"{split}.u8", 1234)
        state = tree_state(tmp_path / "data")
        with pytest.raises(CorruptCacheError, match=f"{split}.u8 is corrupt .bytes .0, [0-9,]+. differ from those "
                                                    f"written, in the {split} split.: delete"):
            imagenet(tmp_path / "data")  # no source given
        assert tree_state(tmp_path / "data") == state
        imagenet(tmp_path / "data", path=source)
        assert one_warning(capsys.readouterr().err).endswith(f"rebuilding the image cache from {source.resolve()}")
        assert (cache.path / f"{split}.u8").read_bytes() == intact[split]
    assert ImageNetCache(cache.path).meta == cache.meta


# ----------------------------------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_evaluate_on_a_damaged_cache_rebuilds_it_and_reports_the_true_loss(corpus_dir, tmp_path, capsys):
    """The reported case: the valid split overwritten in place (same size) used to change `evaluate`'s loss
    silently; now the cache is rebuilt from its files first and the loss is the one of the intact data."""
    run_dir = train(compose_train_config(["recipe=quickstart", *tiny_overrides(corpus_dir, tmp_path)]), "quickstart")
    config = entry_config("evaluate", f"ckpt={run_dir}", "split=valid", "limit_batches=4",
                          f"out={tmp_path / 'valid.json'}")
    intact = evaluate(config)
    corpus = ByteCorpus.build(resolve_paths([f"{corpus_dir}/*.py"]))
    start, end = corpus.meta["splits"]["valid"]
    with open(corpus.path / "corpus.bin", "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(0).bytes(end - start))
    capsys.readouterr()

    again = evaluate(config)
    assert "in the valid split): rebuilding the byte corpus from its" in one_warning(capsys.readouterr().err)
    assert again["loss"] == intact["loss"] and again["tokens"] == intact["tokens"]


# ----------------------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_the_benchmark_times_open_and_check_against_a_training_step(corpus_dir, tmp_path):
    overrides = [f"data.paths=[{corpus_dir}/*.py]", f"data.root={tmp_path / 'data'}", "data.seq_len=32",
                 "data.batch_size=4", *TINY_MODEL["hourglass"]]
    results = cache_verify.main([*overrides, *cache_verify.QUICK, "--out", str(tmp_path / "out")])
    assert set(results["hash_mb_per_s"]) == {"sha256", "blake2b", "crc32", "xxh3_64"}
    assert results["caches"]["synthetic"]["bytes"] == 2_000_000 and results["caches"]["synthetic"]["chunks"] == 3
    for cache in results["caches"].values():
        assert 0 < cache["open_s"] and 0 < cache["open_verify_s"] and 0 < cache["upgrade_s"]
    [meta] = (tmp_path / "data" / "textfiles").glob("*/meta.json")
    assert CHECKSUMS in json.loads(meta.read_text())  # the recipe's own cache was not rewritten as an old one
    saved = json.loads((tmp_path / "out" / "cache_verify.json").read_text())
    assert saved["model"]["step_s"] > 0 and "cpu" in saved["machine"]
    assert "| synthetic (enwik8 split), 2.0 MB | 3 |" in (tmp_path / "out" / "cache_verify.md").read_text()
    assert (tmp_path / "out" / "cache_verify.png").stat().st_size > 1000
    assert len(cache_verify.headlines(saved)) == 2
