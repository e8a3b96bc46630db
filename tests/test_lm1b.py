"""LM1B: the official layout (tarball streamed, or extracted folder, or a download), the tokenizer (training,
round trip, saved beside the data and in checkpoints), packing, the held-out test split, word-level
perplexity, resume, rank sharding, the Hugging Face streaming path on local files, bad input, the prepare
CLI and a 2-step run of the LM1B recipe. No real download: small shards of synthetic sentences in the real
layout are served from a local HTTP server."""

import csv
import functools
import inspect
import io
import itertools
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Tokenizer

import hier_lm
from hier_lm.config import compose_train_config
from hier_lm.data import ChecksumError, DownloadError, LM1BDataModule, tokenizer_from_checkpoint
from hier_lm.data.__main__ import main as data_cli
from hier_lm.data.lm1b import EOS, STATE_KEY, TAR_NAME, HFSource, StreamBatches, train_tokenizer
from hier_lm.sample import sample_text
from hier_lm.train import train
from tests.helpers import TINY_MODEL
from tests.test_enwik8 import UNREACHABLE, Server, files_state, sha

VOCAB, SAMPLE, SEQ_LEN, BATCH = 320, 400, 16, 4
TOP = "1-billion-word-language-modeling-benchmark-r13output"
WORDS = ("the of and to a in for is on that by with it from at as be are was an have not or which has will "
         "market government year people said would new percent company million first president could state "
         "police city week report minister officials bank shares price oil growth prices election party "
         "team season game players world economy Obama Britain China U.S. health house court law police "
         "Zürich café naïve résumé . , ' 's \" ( ) -- ? : ;").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 25))) for _ in range(n)]


def member(kind: str, n: int) -> str:
    if kind == "train":
        return f"training-monolingual.tokenized.shuffled/news.en-{n:05d}-of-00100"
    return f"heldout-monolingual.tokenized.shuffled/news.en.heldout-{n:05d}-of-00050"


# Archive order as found in no particular sorting: the cache still puts the training shards in shard order.
SHARDS = {("train", 3): sentences(200, 3), ("heldout", 1): sentences(80, 11), ("train", 1): sentences(200, 1),
          ("heldout", 0): [*sentences(70, 10), "  Zürich   café\t.  ", ""], ("train", 2): sentences(200, 2),
          ("heldout", 2): sentences(80, 12)}


def shard_text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def make_tar(shards=SHARDS, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        files = {f"{TOP}/{member(*key)}": shard_text(lines) for key, lines in shards.items()}
        for name, data in {f"{TOP}/README": b"LM1B r13output\n", **files, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TAR = make_tar()


def normalised(lines: list[str]) -> str:
    """The text the cache holds for these lines: blank lines dropped, whitespace runs made one space."""
    return "".join(" ".join(line.split()) + "\n" for line in lines if line.strip())


@functools.cache
def _yaml_arguments() -> dict:
    return OmegaConf.to_container(compose_train_config(["data=lm1b", "data.root=null"]).data, resolve=True)


def yaml_arguments(**kwargs) -> dict:
    """The arguments of `data=lm1b` (recipes/data/lm1b.yaml: the one place that holds their defaults), with
    `kwargs` instead of some."""
    return {k: v for k, v in _yaml_arguments().items() if k != "_target_"} | kwargs


def lm1b(root: Path, setup: bool = True, **kwargs) -> LM1BDataModule:
    options = {"root": root, "url": UNREACHABLE, "sha256": sha(TAR), "vocab_size": VOCAB, "tokenizer_sample": SAMPLE,
               "seq_len": SEQ_LEN, "batch_size": BATCH, "num_workers": 0, **kwargs}
    dm = LM1BDataModule(**yaml_arguments(**options))
    if setup:
        dm.prepare_data()
        dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def tar_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm1b-source") / TAR_NAME
    path.write_bytes(TAR)
    return path


@pytest.fixture(scope="module")
def dm(tar_path, tmp_path_factory) -> LM1BDataModule:
    return lm1b(tmp_path_factory.mktemp("lm1b-cache"), path=tar_path)


def split_text(dm: LM1BDataModule, split: str) -> str:
    return dm.decode(np.asarray(dm.corpus.split(split)).tolist())


# ------------------------------------------------------------------------------------ download + layout


def test_download_split_layout_and_reuse(tmp_path):
    server = Server({"/lm1b.tar.gz": TAR})
    try:
        url = f"{server.url}/lm1b.tar.gz"
        dm = lm1b(tmp_path, url=url)
        folder = dm.corpus.path
        assert folder.parent == tmp_path / "lm1b" and dm.metric == "ppl" and dm.vocab_size == VOCAB
        assert sorted(p.name for p in (tmp_path / "lm1b").iterdir()) == [TAR_NAME, folder.name]
        assert (tmp_path / "lm1b" / TAR_NAME).read_bytes() == TAR
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "tokenizer.json", "tokens.bin"]
        # test = held-out shard 0, valid = held-out shard 1, train = training shards 1, 2, 3 in shard order
        # (the archive holds 3, 1, 2); held-out shard 2 is not used.
        assert split_text(dm, "test") == normalised(SHARDS["heldout", 0])
        assert split_text(dm, "valid") == normalised(SHARDS["heldout", 1])
        assert split_text(dm, "train") == normalised(SHARDS["train", 1] + SHARDS["train", 2] + SHARDS["train", 3])
        meta = dm.corpus.meta
        assert meta["shards"]["test"] == ["news.en.heldout-00000-of-00050"]
        assert [c["sentences"] for c in meta["counts"].values()] == [600, 80, 71]  # the blank line is no sentence
        assert meta["dtype"] == "uint16" and meta["source_sha256"] == sha(TAR)
        assert meta["tokens"] == sum(c["tokens"] for c in meta["counts"].values()) == len(np.fromfile(
            folder / "tokens.bin", dtype=np.uint16))
        assert server.requests == [("/lm1b.tar.gz", None)]

        # A new module (as in a new process) reuses the cache: no request, nothing rewritten.
        state = files_state(folder)
        again = lm1b(tmp_path, url=url)
        assert again.corpus.path == folder and files_state(folder) == state and len(server.requests) == 1

        # A wrong checksum: nothing is kept, no cache is made.
        with pytest.raises(ChecksumError, match=r"sha256 .*expected 0{64}.*data\.sha256=null"):
            lm1b(tmp_path / "other", url=url, sha256="0" * 64)
        assert not list((tmp_path / "other").rglob("meta.json")) and not list((tmp_path / "other").rglob("*.tar.gz*"))
    finally:
        server.close()


def test_extracted_folder_gives_the_same_cache_offline(tmp_path, dm):
    for (kind, n), lines in SHARDS.items():
        file = tmp_path / "src" / TOP / member(kind, n)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(shard_text(lines))
    # The tokenizer sample differs (folder order: shard 1 first), so pass the tarball cache's tokenizer.
    tokenizer = dm.corpus.path / "tokenizer.json"
    other = lm1b(tmp_path / "cache", path=tmp_path / "src", tokenizer=tokenizer)  # url unreachable: offline
    assert other.corpus.meta["sha256"] == dm.corpus.meta["sha256"] and other.corpus.path != dm.corpus.path
    assert (other.corpus.path / "tokenizer.json").read_text() == tokenizer.read_text()
    assert other.corpus.meta["source_sha256"] is None  # a folder has no single checksum


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_beside_the_data_and_in_checkpoints(dm, tmp_path):
    tokenizer = dm.tokenizer
    assert tokenizer.get_vocab_size() == VOCAB and tokenizer.token_to_id(EOS) == 0
    odd = ["  Über  naïve\tcafé   🙂 ", "unseen-xyzzy wörds 12,345 .", "U.S. 's"]
    for text in SHARDS["heldout", 0][:20] + odd:
        ids = dm.encode(text)
        assert 0 not in ids and all(0 <= i < VOCAB for i in ids)
        assert dm.decode(ids) == " ".join(text.split())  # whitespace runs -> one space, ends stripped
    assert len(dm.encode("the market")) < len("the market")  # merges were learnt
    lines = SHARDS["train", 1][:3]
    ids = dm.encode("\n".join(lines) + "\n")
    assert ids == [*dm.encode(lines[0]), 0, *dm.encode(lines[1]), 0, *dm.encode(lines[2]), 0]
    assert dm.decode(ids) == "\n".join(lines) + "\n"
    assert np.asarray(dm.corpus.split("train"))[: len(ids)].tolist() == ids  # the cache holds exactly that

    beside = Tokenizer.from_file(str(dm.corpus.path / "tokenizer.json"))
    assert beside.to_str() == tokenizer.to_str()
    torch.save({"LM1BDataModule": dm.state_dict()}, tmp_path / "x.ckpt")
    checkpoint = torch.load(tmp_path / "x.ckpt", weights_only=True)
    restored = tokenizer_from_checkpoint(checkpoint)
    assert restored.to_str() == tokenizer.to_str() and restored.decode(dm.encode("the bank")) == "the bank"
    assert tokenizer_from_checkpoint({"state_dict": {}}) is None
    # Resuming onto data tokenised by another tokenizer is refused.
    other = {**dm.state_dict(), STATE_KEY: train_tokenizer(sentences(100, 99), VOCAB).to_str()}
    resumed = lm1b(dm.hparams.root, path=dm.hparams.path)
    with pytest.raises(ValueError, match=r"checkpoint was trained with another tokenizer than .*data\.tokenizer"):
        resumed.load_state_dict(other)
    resumed.load_state_dict(dm.state_dict())  # its own tokenizer: fine


def test_tokenizer_vocab_mismatches_are_clear_errors(dm, tar_path, tmp_path):
    with pytest.raises(ValueError, match=rf"has {VOCAB} subwords but data\.vocab_size={VOCAB + 8}: set "
                                         rf"data\.vocab_size={VOCAB}"):
        lm1b(tmp_path, path=tar_path, tokenizer=dm.corpus.path / "tokenizer.json", vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match=r"sample \(5 sentences\) gives only .* fewer than data\.vocab_size=4,000"):
        lm1b(tmp_path, path=tar_path, vocab_size=4000, tokenizer_sample=5)
    # A tokenizer.json left in a cache folder (here copied by hand) whose size is not data.vocab_size.
    unfinished = next(p for p in (tmp_path / "lm1b").iterdir() if not (p / "meta.json").exists())
    (unfinished / "tokenizer.json").write_text((dm.corpus.path / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=rf"tokenizer\.json has {VOCAB} subwords but data\.vocab_size=4,000.*"
                                         r"delete it"):
        lm1b(tmp_path, path=tar_path, vocab_size=4000, tokenizer_sample=5)


# ------------------------------------------------------------------------------------ packing, metrics


def test_eval_windows_score_every_token_once_and_split_across_ranks(dm):
    for split, loader in (("valid", dm.val_dataloader()), ("test", dm.test_dataloader())):
        tokens = torch.from_numpy(np.asarray(dm.corpus.split(split), dtype=np.int64))
        windows = torch.cat(list(loader))
        n = len(windows)
        assert windows.shape == (n, SEQ_LEN + 1) and n == (len(tokens) - 1) // SEQ_LEN
        assert torch.equal(windows[:, 1:].flatten(), tokens[1: 1 + n * SEQ_LEN])  # each target once, in order
        assert torch.equal(windows[1:, 0], windows[:-1, -1]) and len(tokens) - 1 - n * SEQ_LEN < SEQ_LEN
        assert dm.num_eval_tokens(split) == n * SEQ_LEN

        # Two ranks (the shared `EvalShard`): the same number of windows each, every window scored by exactly
        # one rank; the shorter shard is padded with a window that scores nothing (n_context = seq_len).
        shards, loaders = [], {"valid": dm.val_dataloader, "test": dm.test_dataloader}
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
            try:
                shards.append([(tuple(w.tolist()), int(c)) for batch, context in loaders[split]()
                               for w, c in zip(batch, context)])
            finally:
                dm.trainer = None
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)
        scored = [w for shard in shards for w, c in shard if c == 0]
        assert sorted(scored) == sorted(tuple(w.tolist()) for w in windows)
        assert all(c in (0, SEQ_LEN) for shard in shards for _, c in shard)


def test_word_ppl_exponent_on_a_hand_counted_split(tmp_path):
    test = ["The cat sat on the mat .", "  Hello   world ", "", "It 's 5 p.m. ."]  # 7 + 2 + 5 words
    for (kind, n), lines in {("train", 1): sentences(300, 1), ("heldout", 1): sentences(30, 2),
                             ("heldout", 0): test}.items():
        file = tmp_path / "src" / member(kind, n)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(shard_text(lines))
    dm = lm1b(tmp_path / "cache", path=tmp_path / "src", tokenizer_sample=300, seq_len=4)
    counts = dm.corpus.meta["counts"]["test"]
    words = (7 + 1) + (2 + 1) + (5 + 1)  # + 1 end of sentence each; the blank line is no sentence
    tokens = sum(len(dm.encode(s)) + 1 for s in test if s.strip())
    assert counts == {"sentences": 3, "words": words, "tokens": tokens}
    assert dm.word_ppl_exponent("test") == tokens / words
    assert split_text(dm, "test") == "The cat sat on the mat .\nHello world\nIt 's 5 p.m. .\n"
    # exp(mean token NLL * tokens / words) is the word-level perplexity: same total NLL, counted per word.
    mean_token_nll = 1.7
    assert math.exp(mean_token_nll * dm.word_ppl_exponent("test")) == pytest.approx(
        math.exp(mean_token_nll * tokens / words), rel=1e-12)
    assert dm.corpus.meta["counts"]["train"]["words"] == sum(len(s.split()) + 1 for s in sentences(300, 1))


def test_training_batches_resume_mid_stream(dm, tar_path, tmp_path):
    def batches(module, k):
        it = iter(module.train_dataloader())
        return [next(it) for _ in range(k)]

    fresh = batches(dm, 5)
    train = np.asarray(dm.corpus.split("train"), dtype=np.int64)
    for batch in fresh:  # each row is a window of the train token stream
        assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == torch.long
        for row in batch.numpy():
            starts = np.flatnonzero(train[: len(train) - SEQ_LEN] == row[0])
            assert any(np.array_equal(train[s: s + SEQ_LEN + 1], row) for s in starts)
    state = {**dm.state_dict(), "train_batches": 3}
    resumed = lm1b(dm.hparams.root, setup=False, path=tar_path)
    resumed.load_state_dict(state)
    resumed.prepare_data()
    resumed.setup("fit")
    assert all(torch.equal(x, y) for x, y in zip(batches(resumed, 2), fresh[3:]))


# ------------------------------------------------------------------------------------ Hugging Face streaming


def _hf_files(tmp_path: Path) -> dict:
    files = {"train": [], "validation": [], "test": []}
    for name, lines in {"train-0": sentences(150, 20), "train-1": sentences(150, 21), "validation": sentences(40, 22),
                        "test": sentences(40, 23)}.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(shard_text(lines))
        files[name.split("-")[0]].append(str(path))
    return files


def test_hf_streaming_on_local_files(tmp_path):
    files = _hf_files(tmp_path)
    options = {"source": "hf", "hf_name": "text", "hf_revision": None, "hf_data_files": files, "hf_shuffle_buffer": 32,
               "hf_splits": {"train": "train", "valid": "validation", "test": "test"}}
    dm = lm1b(tmp_path / "cache", **options)
    assert sorted(dm.corpus.meta["splits"]) == ["test", "valid"]  # training streams
    assert split_text(dm, "valid") == normalised(sentences(40, 22)) and len(dm.val_dataloader()) > 0
    train = {0: sentences(150, 20), 1: sentences(150, 21)}

    def rank_sentences(rank: int, world: int, n: int) -> list[str]:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0, accumulate_grad_batches=1)
        try:
            stream = dm.train_dataloader().dataset
        finally:
            dm.trainer = None
        return list(itertools.islice(stream.sentences(), n))

    # One epoch of one rank is every training sentence once, shuffled.
    epoch = rank_sentences(0, 1, 300)
    assert sorted(epoch) == sorted(train[0] + train[1]) and epoch != train[0] + train[1]
    # Two ranks: the two files are dealt one to each rank, disjoint, together everything.
    shares = [rank_sentences(rank, 2, 150) for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(epoch)

    # Batches pack the rank's stream: consecutive windows share one token; the stream never runs dry.
    stream = StreamBatches(HFSource("text", data_files=files), "train", dm.tokenizer.to_str(), SEQ_LEN, BATCH, seed=0,
                           shuffle_buffer=1)
    expected = dm.encode("\n".join(train[0] + train[1]) + "\n")  # one epoch in stream order
    fresh = list(itertools.islice(iter(stream), len(expected) // (BATCH * SEQ_LEN) + 2))  # into the second epoch
    flat = torch.cat([b[:, :-1].flatten() for b in fresh])
    assert all(b.shape == (BATCH, SEQ_LEN + 1) and torch.equal(b[1:, 0], b[:-1, -1]) for b in fresh)
    assert flat[: len(expected)].tolist() == expected and flat[len(expected):][:5].tolist() == expected[:5]
    stream.start = 3  # resume: the same batches from the fourth on
    assert all(torch.equal(x, y) for x, y in zip(itertools.islice(iter(stream), 2), fresh[3:5]))
    # Read in a DataLoader worker (data.num_workers=1), the shuffled stream is the same as in the process.
    worker = LM1BDataModule(**{**dm.hparams, "num_workers": 1})
    worker.setup("fit")
    loader = worker.train_dataloader()
    assert loader.num_workers == 1 and loader.dataset.shuffle_buffer == 32
    assert all(torch.equal(x, y) for x, y in zip(itertools.islice(loader, 3), itertools.islice(loader.dataset, 3)))

    with pytest.raises(DownloadError, match=r"could not open split 'train' of the Hugging Face dataset 'text'.*"
                                            r"data\.hf_data_files"):
        lm1b(tmp_path / "none", **{**options, "hf_data_files": {"train": str(tmp_path / "missing.txt")}})


# ------------------------------------------------------------------------------------ bad input


def test_bad_sources_are_one_line_errors_and_leave_no_cache(tar_path, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere does not exist.*data\.path=null"):
        lm1b(tmp_path / "a", path=tmp_path / "nowhere")
    with pytest.raises(DownloadError, match=r"could not download .*Connection refused.*data\.path="):
        lm1b(tmp_path / "a")
    with pytest.raises(ChecksumError, match=r"data\.path=.* has sha256 .*data\.sha256=null"):
        lm1b(tmp_path / "a", path=tar_path, sha256="1" * 64)
    damaged = bytearray(TAR)
    damaged[len(TAR) // 2: len(TAR) // 2 + 8] = b"\xff" * 8
    for name, data in (("truncated", TAR[: len(TAR) // 2]), ("damaged", bytes(damaged)), ("text", b"not a tar\n" * 9),
                       ("no-test", make_tar({k: v for k, v in SHARDS.items() if k != ("heldout", 0)}))):
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(data)
        expected = (r"lacks held-out shard 0 \(data\.test_shard\)" if name == "no-test" else
                    r"(is damaged, truncated or not a \.tar\.gz|holds a shard that is not UTF-8).*: "
                    r"pass an intact copy")
        with pytest.raises((ValueError, FileNotFoundError), match=expected) as err:
            lm1b(tmp_path / name, path=path, sha256=None, tokenizer_sample=150)
        assert "\n" not in str(err.value) and f"{name}.tar.gz" in str(err.value)
        left = sorted(p.name for p in (tmp_path / name).rglob("*") if p.is_file())
        assert left in ([], ["tokenizer.json"]), left  # no tokens, no meta: no cache taken for finished

    # The truncated run trained and kept its tokenizer before the tokenisation failed: a good copy reuses it.
    kept = next((tmp_path / "truncated").rglob("tokenizer.json"))
    tokenizer = kept.read_text()
    good = lm1b(tmp_path / "truncated", path=tar_path, tokenizer_sample=150)
    assert good.corpus.path == kept.parent and (kept.parent / "tokenizer.json").read_text() == tokenizer
    # A finished cache is used as it is, whatever is now at data.path (here: a damaged file).
    state = files_state(good.corpus.path)
    reused = lm1b(tmp_path / "truncated", path=tmp_path / "damaged.tar.gz", tokenizer_sample=150)
    assert reused.corpus.path == kept.parent
    assert files_state(good.corpus.path) == state

    with pytest.raises(ValueError, match=r"data\.valid_shard and data\.test_shard are both 0"):
        LM1BDataModule(**yaml_arguments(valid_shard=0))
    with pytest.raises(ValueError, match=r"data\.vocab_size must be at least 258"):
        LM1BDataModule(**yaml_arguments(vocab_size=100))
    with pytest.raises(ValueError, match=r"data\.source must be 'tar'.*or 'hf'"):
        LM1BDataModule(**yaml_arguments(source="web"))
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'seed'"):  # no defaults here
        LM1BDataModule(**{k: v for k, v in yaml_arguments().items() if k != "seed"})
    with pytest.raises(ValueError, match=r"the test split has [\d,]+ tokens, fewer than data\.seq_len \+ 1"):
        lm1b(tmp_path / "truncated", path=tar_path, tokenizer_sample=150, seq_len=5000).test_dataloader()


# ------------------------------------------------------------------------------------ CLI, config, recipe


def test_prepare_cli(tar_path, tmp_path, capsys):
    args = ["prepare", "lm1b", f"data.root={tmp_path}", f"data.path={tar_path}", f"data.sha256={sha(TAR)}",
            f"data.vocab_size={VOCAB}", f"tokenizer_sample={SAMPLE}"]
    data_cli(args)
    out = capsys.readouterr().out.splitlines()
    folder = next((tmp_path / "lm1b").iterdir())
    assert out[0] == f"lm1b cache: {folder.resolve()}"
    assert out[1].startswith("  tokens.bin: ") and "sha256" in out[1] and out[2].startswith("  tokenizer.json: 320 ")
    assert out[3] == f"  source: {tar_path.resolve()}, sha256 {sha(TAR)}"
    assert [line.split()[:3] for line in out[4:]] == [["train", "600", "sentences"], ["valid", "80", "sentences"],
                                                      ["test", "71", "sentences"]]
    data_cli(args)  # reused
    assert capsys.readouterr().out.splitlines() == out
    # The deprecated flags of the former command line, mappings included, name the same cache.
    data_cli(["prepare", "lm1b", "--root", str(tmp_path), "--path", str(tar_path), "--sha256", sha(TAR),
              "--vocab-size", str(VOCAB), "--tokenizer-sample", str(SAMPLE), "--hf-data-files", "train=a/*.parquet",
              "test=b/*.parquet", "--hf-revision", "null"])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == out and captured.err.startswith("note: --flags are deprecated")
    assert "data.vocab_size=320 " in captured.err and "data.hf_data_files={train:'a/*.parquet',test:'b/*.parquet'} " \
        "data.hf_revision=null\n" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        data_cli(["prepare", "lm1b", f"root={tmp_path / 'b'}", f"path={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: data.path=") and err.count("\n") == 1


def test_config_group_and_the_recipe_trains_two_steps(tar_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HIER_LM_DATA", str(tmp_path / "data"))
    cfg = compose_train_config(["data=lm1b", "seed=3"])
    assert set(cfg.data) - {"_target_"} == set(inspect.signature(LM1BDataModule).parameters)  # every argument
    module = instantiate(cfg.data)
    assert module.hparams.root == str(tmp_path / "data") and module.hparams.seed == 3 and module.vocab_size == 32000
    assert module.hparams.sha256 == "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e"
    assert type(module.hparams.hf_data_files) is dict
    torch.save(dict(module.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(module.hparams)

    recipe = "lm1b_h_transformer_base"
    overrides = [f"recipe={recipe}", f"runs_dir={tmp_path / 'runs'}", f"data.path={tar_path}",
                 f"data.sha256={sha(TAR)}", f"data.vocab_size={VOCAB}",
                 f"data.tokenizer_sample={SAMPLE}", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0",
                 *TINY_MODEL["h_transformer"], "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                 "trainer.accelerator=cpu", "checkpoint.every_n_steps=2", "optim.warmup_steps=1", "logger=csv"]
    run_dir = train(compose_train_config(overrides), recipe=recipe)
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/ppl")]
    assert len(rows) == 1 and 1 < float(rows[0]["val/ppl"]) < 10 * VOCAB
    assert float(rows[0]["val/ppl"]) == pytest.approx(math.exp(float(rows[0]["val/loss"])), rel=1e-4)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["LM1BDataModule"]["train_batches"] == 2
    tokenizer = tokenizer_from_checkpoint(checkpoint)
    cache = next(p for p in (tmp_path / "data" / "lm1b").iterdir() if p.is_dir())
    assert tokenizer.to_str() == (cache / "tokenizer.json").read_text()
    model = hier_lm.load(run_dir)
    assert model(torch.tensor([tokenizer.encode("the market").ids]))[0].shape[-1] == VOCAB

    # Sampling decodes subwords with the checkpoint's tokenizer; the prompt comes back as it was given.
    sample_cfg = OmegaConf.create({"ckpt": str(run_dir), "device": "cpu", "prompt": "the market", "prompt_file": None,
                                   "num_samples": 1, "max_new_tokens": 5, "temperature": 1.0, "top_k": None,
                                   "top_p": None, "use_cache": True, "seed": 0, "prompt_images": None,
                                   "save_each": False})
    (text,) = sample_text(sample_cfg, model)
    assert text.startswith("the market") and len(text) > len("the market")
