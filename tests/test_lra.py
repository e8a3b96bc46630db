"""Long Range Arena: the ListOps generator (grammar, values, determinism), each task read from a few examples
written here in its release's real format (TSV, tar.gz, parquet, pickled CIFAR batches, PNG + metadata), the
cache, exact resume and data-parallel shards, the classification task (padding never changes a real token's
output or the pooled features; the dual-encoder head) and every LRA recipe trained and evaluated on tiny data."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from hier_lm.config import CONFIG_MODULE, compose_train_config
from hier_lm.data import (LRAImageDataModule, LRATextDataModule, ListOpsDataModule, PathfinderDataModule,
                          RetrievalDataModule, generate_listops)
from hier_lm.data.__main__ import main as data_main
from hier_lm.data.base import EvalShard
from hier_lm.data.lra.listops import VOCAB
from hier_lm.evaluate import evaluate
from hier_lm.models import MODELS, build_model
from hier_lm.tasks import ClassificationTask, build_task
from hier_lm.train import train
from tests.helpers import TINY_MODEL

OPS = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)), "[SM": lambda a: sum(a) % 10}


def evaluate_listops(tokens: list[str]) -> int:
    """The value of a ListOps expression, by a stack machine (independent of the generator's recursion)."""
    stack: list = []
    for token in tokens:
        if token in OPS:
            stack.append(token)
        elif token == "]":
            args = []
            while not isinstance(stack[-1], str):
                args.append(stack.pop())
            stack.append(OPS[stack.pop()](args[::-1]))
        else:
            stack.append(int(token))
    assert len(stack) == 1
    return stack[0]


def decode(ids) -> list[str]:
    return [VOCAB[i] for i in ids]


# ---------------------------------------------------------------------------------------------- ListOps generator


def test_generator_values_lengths_and_determinism():
    examples = list(generate_listops(60, seed=3, min_length=10, max_length=80))
    again = list(generate_listops(60, seed=3, min_length=10, max_length=80))
    other = list(generate_listops(60, seed=4, min_length=10, max_length=80))
    assert all(np.array_equal(a[0][0], b[0][0]) and a[1] == b[1] for a, b in zip(examples, again))
    assert not all(np.array_equal(a[0][0], b[0][0]) for a, b in zip(examples, other))
    keys = {e[0][0].tobytes() for e in examples}
    assert len(keys) == 60  # distinct expressions
    for (ids,), value in examples:
        tokens = decode(ids)
        assert 10 < len(tokens) < 80 and tokens[0] in OPS and tokens[-1] == "]"
        assert evaluate_listops(tokens) == value


def test_generator_depth_and_arguments_follow_the_grammar():
    for (ids,), _ in generate_listops(40, seed=0, min_length=5, max_length=300, max_depth=3, max_args=4):
        depth = deepest = 0
        counts = []
        for token in decode(ids):
            if token in OPS:
                depth += 1
                deepest = max(deepest, depth)
                counts.append(0)
            elif token == "]":
                depth -= 1
                assert 2 <= counts.pop() <= 4
                if counts:
                    counts[-1] += 1
            else:
                counts[-1] += 1
        assert deepest <= 2  # the root is depth 1; a node at max_depth 3 is a digit


def test_generator_rejects_an_empty_length_range():
    with pytest.raises(ValueError, match="min_length"):
        next(generate_listops(1, seed=0, min_length=10, max_length=11))


# ---------------------------------------------------------------------------------------------- release formats


def release_source(tokens: list[str]) -> str:
    """An expression as the release writes it: the tree `((((op, a1), a2), ...), "]")`, each pair in round
    brackets: `[MAX 2 9 ]` -> `( ( ( [MAX 2 ) 9 ) ] )`."""
    stack: list[str] = []
    for token in tokens:
        if token in OPS:
            stack.append(token)
        elif token == "]":
            args = []
            while stack[-1] not in OPS:
                args.append(stack.pop())
            text = stack.pop()
            for arg in reversed(args):
                text = f"( {text} {arg} )"
            stack.append(f"( {text} ] )")
        else:
            stack.append(token)
    return stack[0]


def listops_release(folder, rows_per_split: int = 6) -> list:
    """basic_{train,val,test}.tsv in the release's format (round brackets, a header) from generated trees."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = list(generate_listops(3 * rows_per_split, seed=1, min_length=4, max_length=40))
    for i, name in enumerate(("basic_train.tsv", "basic_val.tsv", "basic_test.tsv")):
        lines = ["Source\tTarget"] + [f"{release_source(decode(ids))}\t{value}"
                                      for (ids,), value in examples[i * rows_per_split:(i + 1) * rows_per_split]]
        (folder / name).write_text("\n".join(lines) + "\n")
    return examples


def test_release_source_round_trips_to_the_tokens():
    assert release_source("[MAX 2 9 ]".split()) == "( ( ( [MAX 2 ) 9 ) ] )"


def test_listops_release_tsv_is_read_with_brackets_dropped(tmp_path):
    examples = listops_release(tmp_path / "lra_release" / "listops-1000")
    data = ListOpsDataModule(path=str(tmp_path), root=str(tmp_path / "cache"), seq_len=30, batch_size=2)
    data.prepare_data()
    data.setup()
    train = data.sources["train"]
    for i in range(6):
        (ids,), value = examples[i]
        assert np.array_equal(train.sequences(i)[0], ids[:30]) and train.labels()[i] == value
    assert "lra_listops cache" in data.describe() and "6 examples" in data.describe()


def test_listops_bad_tsv_and_missing_release_are_one_line_errors(tmp_path):
    (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n[MAX 1 [FIRST 2 ] ]\t2\n")
    for name in ("basic_val.tsv", "basic_test.tsv"):
        (tmp_path / name).write_text("Source\tTarget\n[MAX 1 2 ]\t2\n")
    with pytest.raises(ValueError, match="unknown ListOps token '\\[FIRST'"):
        ListOpsDataModule(path=str(tmp_path), root=str(tmp_path / "c")).prepare_data()
    with pytest.raises(FileNotFoundError, match="data.generate=true"):
        ListOpsDataModule(path=str(tmp_path / "nowhere"), root=str(tmp_path / "c")).prepare_data()
    with pytest.raises(ValueError, match="data.path"):
        ListOpsDataModule()


def test_prepare_generate_flag_is_data_generate_true(tmp_path, capsys):
    data_main(["prepare", "lra_listops", "--generate", f"data.root={tmp_path}", "data.num_examples=[20,4,4]",
               "data.min_length=4", "data.max_length=30", "data.seq_len=30"])
    out = capsys.readouterr().out
    assert "generated (seed 0" in out and "20 examples" in out
    data_main(["prepare", "lra_listops", "data.generate=true", f"data.root={tmp_path}", "data.num_examples=[20,4,4]",
               "data.min_length=4", "data.max_length=30", "data.seq_len=30"])
    assert capsys.readouterr().out == out  # the same cache, found again


def aclimdb_tarball(path, reviews: dict) -> None:
    """aclImdb_v1.tar.gz with `reviews[(split, label)] = [text, ...]` (and an unsup review, never read)."""
    with tarfile.open(path, "w:gz") as tar:
        items = [(f"aclImdb/{split}/{label}/{i}_7.txt", text) for (split, label), texts in reviews.items()
                 for i, text in enumerate(texts)] + [("aclImdb/train/unsup/0_0.txt", "unlabelled")]
        for name, text in items:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_text_reads_the_aclimdb_tarball_and_the_parquet_copy(tmp_path):
    reviews = {("train", "pos"): ["great film", "loved it é"], ("train", "neg"): ["awful"],
               ("test", "pos"): ["fine"], ("test", "neg"): ["boring and long " * 5]}
    aclimdb_tarball(tmp_path / "aclImdb_v1.tar.gz", reviews)
    tar = LRATextDataModule(path=str(tmp_path / "aclImdb_v1.tar.gz"), root=str(tmp_path / "c1"), seq_len=16,
                            batch_size=1)
    tar.setup()
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hf" / "plain_text").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [(t, int(label == "pos")) for (s, label), texts in sorted(reviews.items()) if s == split for t in texts]
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}),
                       tmp_path / "hf" / "plain_text" / f"{split}-00000-of-00001.parquet")
    hf = LRATextDataModule(path=str(tmp_path / "hf"), root=str(tmp_path / "c2"), seq_len=16, batch_size=1)
    hf.setup()
    for data in (tar, hf):
        train = data.sources["train"]
        texts = {bytes(train.sequences(i)[0]): int(train.labels()[i]) for i in range(len(train))}
        assert texts == {b"great film": 1, "loved it é".encode(): 1, b"awful": 0}
        assert len(data.sources["valid"]) == len(data.sources["test"]) == 2  # valid = test = IMDB test
        assert max(len(data.sources["test"].sequences(i)[0]) for i in range(2)) == 16  # cut to seq_len


def test_retrieval_pairs_batch_as_two_sequences(tmp_path):
    folder = tmp_path / "lra_release" / "tsv_data"
    folder.mkdir(parents=True)
    rows = {"train": [(1, "a b c", "d e"), (0, "xyz", "uvw qq"), (1, "k", "mm")], "eval": [(0, "p", "q")],
            "test": [(1, "r s", "t")]}
    for split, items in rows.items():
        lines = [f"{float(y)}\tid{i}a\tid{i}b\t{t1}\t{t2}" for i, (y, t1, t2) in enumerate(items)]
        (folder / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n")
    data = RetrievalDataModule(path=str(tmp_path), root=str(tmp_path / "c"), seq_len=4, batch_size=3)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (3, 2, 4) and batch["lengths"].shape == (3, 2)
    for row, length, label in zip(batch["tokens"], batch["lengths"], batch["labels"]):
        first, second = (bytes(row[f, :length[f]].tolist()) for f in range(2))
        assert (int(label), first, second) in {(y, t1.encode()[:4], t2.encode()[:4]) for y, t1, t2 in rows["train"]}
        assert (row[:, :][torch.arange(4) >= length[:, None]] == 0).all()  # right-padded with 0
    (folder / "new_aan_pairs.test.tsv").write_text("2\ta\tb\tc\n")
    with pytest.raises(ValueError, match="new_aan_pairs.test.tsv:1"):
        RetrievalDataModule(path=str(folder), root=str(tmp_path / "c2")).prepare_data()


def cifar_batches(folder, per_file: int = 4) -> np.ndarray:
    """cifar-10-batches-py with random images (planar uint8 [n, 3072]); returns all train images [n, 3, 1024]."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": rng.integers(0, 10, per_file).tolist(), b"data": data,
                         b"filenames": [b"f"] * per_file}, f, protocol=2)
        if name != "test_batch":
            train.append(data.reshape(-1, 3, 1024))
    return np.concatenate(train)


def test_image_is_cifar_grayscale_split_90_10(tmp_path):
    images = cifar_batches(tmp_path / "cifar-10-batches-py")
    data = LRAImageDataModule(path=str(tmp_path), root=str(tmp_path / "c"), batch_size=2)
    data.setup()
    assert [len(data.sources[s]) for s in ("train", "valid", "test")] == [18, 2, 4]
    gray = np.rint(0.2989 * images[:, 0] + 0.5870 * images[:, 1] + 0.1140 * images[:, 2])
    assert np.array_equal(data.sources["train"].sequences(3)[0], gray[3])
    assert np.array_equal(data.sources["valid"].sequences(1)[0], gray[19])


def test_image_pickles_cannot_run_code(tmp_path):
    cifar_batches(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="builtins.print is not allowed"):
        LRAImageDataModule(path=str(tmp_path), root=str(tmp_path / "c")).prepare_data()


def test_pathfinder_reads_pngs_and_metadata(tmp_path):
    from PIL import Image

    folder = tmp_path / "pathfinder32" / "curv_baseline"
    (folder / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels, labels = [], []
    for file_no in (0, 1):  # two metadata files of 5 images each: 10 images, 8 / 1 / 1
        lines = []
        (folder / "imgs" / str(file_no)).mkdir(parents=True)
        for k in range(5):
            image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(image).save(folder / "imgs" / str(file_no) / f"sample_{k}.png")
            pixels.append(image.reshape(-1))
            labels.append(k % 2)
            lines.append(f"imgs/{file_no} sample_{k}.png {k} {k % 2} 2 1 0.75 1")
        (folder / "metadata" / f"{file_no}.npy").write_text("\n".join(lines) + "\n")
    data = PathfinderDataModule(path=str(tmp_path), difficulty="curv_baseline", root=str(tmp_path / "c"),
                                batch_size=2)
    data.setup()
    assert [len(data.sources[s]) for s in ("train", "valid", "test")] == [8, 1, 1]
    assert np.array_equal(data.sources["test"].sequences(0)[0], pixels[9])
    assert data.sources["train"].labels().tolist() == labels[:8]
    with pytest.raises(ValueError, match="data.difficulty"):
        PathfinderDataModule(path=str(tmp_path), difficulty="medium")


# ---------------------------------------------------------------------------------------------- resume and shards


@pytest.fixture
def listops(tmp_path):
    data = ListOpsDataModule(generate=True, root=str(tmp_path), seq_len=40, num_examples=[30, 6, 5], min_length=4,
                             max_length=40, batch_size=4)
    data.setup()
    return data


def batches(data, rank: int, world: int, start: int, n: int) -> list[dict]:
    it = iter(data._train_dataset(rank, world, start))
    return [next(it) for _ in range(n)]


def test_training_batches_resume_exactly_and_shard_disjointly(listops):
    straight = batches(listops, 0, 1, 0, 10)  # 7 batches per epoch: crosses into the second epoch
    resumed = batches(listops, 0, 1, 6, 4)
    for a, b in zip(straight[6:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    listops._resume = None
    listops.load_state_dict({**listops.state_dict(), "train_batches": 0})
    ranks = [batches(listops, r, 2, 0, 3) for r in (0, 1)]
    rows = [tuple(row[:n].tolist()) for rank in ranks for b in rank for row, n in zip(b["tokens"], b["lengths"])]
    assert len(rows) == len(set(rows)) == 24  # 3 batches x 4 examples x 2 ranks, no example twice in the epoch
    with pytest.raises(ValueError, match="data.seed"):
        listops.load_state_dict({**listops.state_dict(), "seed": 99})


def test_evaluation_scores_every_example_once_over_two_ranks(listops):
    items = listops._eval_dataset("test")
    seen = []
    for rank in (0, 1):
        shard = EvalShard(items, rank, 2)
        for j in range(len(shard)):
            item, n_context = shard[j]
            if n_context == 0:
                seen.append(tuple(item["tokens"][:item["lengths"]].tolist()))
    assert sorted(seen) == sorted(tuple(items[i]["tokens"][:items[i]["lengths"]].tolist()) for i in range(5))
    assert items.num_scored() == 5 and items[0]["tokens"].shape == (40,)


# ---------------------------------------------------------------------------------------------- encoders and task

ENCODERS = [("transformer", {}), ("h_transformer", {}), ("flash", {"mode": "chunk"}), ("flash", {"mode": "quad"})]


def tiny_encoder(name: str, **options) -> torch.nn.Module:
    config = MODELS[name].config_class.tiny()
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    return build_model({"name": name, **fields, "causal": False, **options}).eval()


@pytest.mark.parametrize("name, options", ENCODERS, ids=lambda x: x if isinstance(x, str) else str(x.get("mode", "")))
def test_padding_never_changes_a_real_tokens_output(name, options):
    torch.manual_seed(0)
    model = tiny_encoder(name, **options)
    tokens, lengths = torch.randint(0, 32, (3, 40)), torch.tensor([40, 23, 1])
    states = model.encode(tokens, lengths=lengths)
    garbage = torch.where(torch.arange(40) < lengths[:, None], tokens, torch.randint(0, 32, (3, 40)))
    for b, n in enumerate(lengths.tolist()):
        alone = model.encode(tokens[b:b + 1, :n])[0]
        torch.testing.assert_close(states[b, :n], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(garbage, lengths=lengths)[b, :n], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "h_transformer", "flash"])
def test_task_pooled_features_ignore_padding_single_and_pairs(name):
    torch.manual_seed(0)
    config = MODELS[name].config_class.tiny()
    model = {"name": name, **{f: getattr(config, f) for f in config.__dataclass_fields__}}
    for pairs in (False, True):
        task = ClassificationTask(model=model, optim={}, num_classes=3, pairs=pairs, mlp_dim=8).eval()
        shape = (2, 2, 30) if pairs else (2, 30)
        tokens, lengths = torch.randint(1, 32, shape), torch.tensor([[30, 7], [12, 1]] if pairs else [30, 9])
        padded = torch.where(torch.arange(30) < lengths[..., None], tokens, torch.randint(0, 32, shape))
        logits = task(padded, lengths)
        assert logits.shape == (2, 3)
        for b in range(2):
            if pairs:
                u, v = (task.model.encode(tokens[b, f:f + 1, :lengths[b, f]]).mean(1) for f in range(2))
                alone = task.head(torch.cat((u, v, u * v, u - v), -1))
            else:
                alone = task.head(task.model.encode(tokens[b:b + 1, :lengths[b]]).mean(1))
            torch.testing.assert_close(logits[b], alone[0], rtol=1e-4, atol=1e-5)


def test_encoders_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="causal=True"):
        tiny_encoder("transformer").new_cache()
    with pytest.raises(ValueError, match="causal=False"):
        MODELS["transformer"](**{**MODELS["transformer"].config_class.tiny().__dict__}).encode(
            torch.zeros(1, 4, dtype=torch.long), lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="bidirectional encoder: model="):
        ClassificationTask(model={"name": "hourglass"}, optim={}, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationTask(model={"name": "h_transformer", "num_classes": 3}, optim={}, num_classes=2)


def test_task_trains_its_encoder_and_head_but_not_the_token_head(listops):
    config = MODELS["h_transformer"].config_class.tiny()
    model = {"name": "h_transformer", **{f: getattr(config, f) for f in config.__dataclass_fields__}}
    task = build_task({"model": model, "optim": {"lr": 1e-2, "warmup_steps": 1}, "classifier": {"mlp_dim": 16}},
                      listops)
    assert isinstance(task, ClassificationTask) and task.head[0].out_features == 16
    batch = next(iter(listops.train_dataloader()))
    loss = torch.nn.functional.cross_entropy(task(batch["tokens"], batch["lengths"]), batch["labels"])
    loss.backward()
    trained = [n for n, p in task.named_parameters() if p.requires_grad]
    assert all(task.get_parameter(n).grad is not None for n in trained)
    assert not any(n.startswith("model.head.") for n in trained)


# ---------------------------------------------------------------------------------------------- recipes, evaluate

TASK_DATA = ("listops", "text", "retrieval", "image", "pathfinder")


def tiny_release(task: str, folder) -> list[str]:
    """Data overrides that train `task` on a few examples written here in its release format."""
    if task == "listops":
        return ["data.generate=true", "data.num_examples=[16,4,4]", "data.min_length=4", "data.max_length=40",
                "data.seq_len=40"]
    if task == "text":
        reviews = {("train", "pos"): ["good"] * 5, ("train", "neg"): ["bad!"] * 5, ("test", "pos"): ["ok"] * 2,
                   ("test", "neg"): ["no"] * 2}
        aclimdb_tarball(folder / "imdb.tar.gz", reviews)
        return [f"data.path={folder / 'imdb.tar.gz'}", "data.seq_len=24"]
    if task == "retrieval":
        for split in ("train", "eval", "test"):
            (folder / f"new_aan_pairs.{split}.tsv").write_text(
                "".join(f"{i % 2}\ta\tb\tdoc {i} text\tother {i}\n" for i in range(8)))
        return [f"data.path={folder}", "data.seq_len=24"]
    if task == "image":
        cifar_batches(folder / "cifar-10-batches-py", per_file=2)
        return [f"data.path={folder}"]
    from PIL import Image

    base = folder / "pathfinder32" / "curv_contour_length_14"
    (base / "metadata").mkdir(parents=True)
    (base / "imgs" / "0").mkdir(parents=True)
    for k in range(10):
        Image.fromarray(np.full((32, 32), 20 * k, dtype=np.uint8)).save(base / "imgs" / "0" / f"sample_{k}.png")
    (base / "metadata" / "0.npy").write_text("".join(f"imgs/0 sample_{k}.png {k} {k % 2}\n" for k in range(10)))
    return [f"data.path={folder}"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["h_transformer", "transformer"])
@pytest.mark.parametrize("task", TASK_DATA)
def test_every_lra_recipe_trains_and_evaluates(task, family, tmp_path):
    recipe = f"lra_{task}_{family}"
    (tmp_path / "src").mkdir()
    overrides = [f"recipe={recipe}", *tiny_release(task, tmp_path / "src"), f"data.root={tmp_path / 'cache'}",
                 "data.batch_size=2", *TINY_MODEL[family], "classifier.mlp_dim=8", f"runs_dir={tmp_path}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "checkpoint.every_n_steps=2",
                 "optim.warmup_steps=1", "logger=csv"]
    run_dir = train(compose_train_config(overrides), recipe=recipe)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[f"ckpt={ckpt}", "split=test", f"out={tmp_path / 'eval.json'}",
                                                  "device=cpu"])
    results = evaluate(eval_cfg)
    assert 0.0 <= results["accuracy"] <= 1.0 and results["tokens"] > 0


@pytest.mark.slow
def test_lra_listops_benchmark_quick_run(tmp_path):
    from benchmarks import lra_listops

    results = lra_listops.main([*lra_listops.QUICK, "--eval-examples", "16", "--root", str(tmp_path / "data"),
                                "--out", str(tmp_path)])
    assert {r["name"] for r in results["runs"]} == {"h_transformer", "transformer"}
    assert all(r["seconds"] >= 2 and len(r["curve"]) >= 2 for r in results["runs"])
    assert (tmp_path / "lra_listops.png").exists() and "chance" in (tmp_path / "lra_listops.md").read_text().lower()
