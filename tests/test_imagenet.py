"""Downsampled ImageNet (all three source formats, made tiny inside the tests: a tar of PNGs, zips of npz
batches, parquet files written with `datasets`), the cache, its errors, the download path, exact resume,
DDP shards, and the synthetic image module."""

import inspect
import io
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from hier_lm.config import compose_train_config
from hier_lm.data import (ChecksumError, DownloadError, ImageNetDataModule, ImageSizeError, SyntheticImagesDataModule,
                          encode_images, prepare_imagenet)
from hier_lm.data.__main__ import main as data_cli
from hier_lm.data.cache import host_tag
from hier_lm.data.images import TrainImages
from hier_lm.data.imagenet import DamagedFileError
from hier_lm.data.synthetic_images import SyntheticImages
from hier_lm.tasks import ImageModelTask
from tests.test_enwik8 import Server, files_state, sha
from tests.test_textfiles import fit_recording

S = 32
N_TRAIN, N_VALID = 14, 5
IMAGES = np.random.default_rng(0).integers(0, 256, (N_TRAIN + N_VALID, S, S, 3), dtype=np.uint8)
TRAIN, VALID = IMAGES[:N_TRAIN], IMAGES[N_TRAIN:]
UNREACHABLE = "http://127.0.0.1:9/small/"  # the discard port: connection refused


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tar(images, folder: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i, image in enumerate(images):
            data = png(image)
            info = tarfile.TarInfo(f"{folder}/{i:05d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def npz(images: np.ndarray, **arrays) -> bytes:
    """A Chrabaszcz et al. batch: `data` = planar rows (all R, then G, then B), labels 1..1000."""
    buffer = io.BytesIO()
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    np.savez(buffer, **({"data": planar, "labels": np.arange(1, len(images) + 1)} if not arrays else arrays))
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


TARS = {"train_32x32.tar": make_tar(TRAIN, "train_32x32"), "valid_32x32.tar": make_tar(VALID, "valid_32x32")}


def write_oord(folder: Path, tars: dict[str, bytes] = TARS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in tars.items():
        (folder / name).write_bytes(data)
    return folder


def write_npz(folder: Path) -> Path:
    folder.mkdir(parents=True)
    # Two train batches (their order comes from the batch number, not from the file order in the zip).
    (folder / "Imagenet32_train_npz.zip").write_bytes(make_zip({
        "Imagenet32_train_npz/train_data_batch_2.npz": npz(TRAIN[8:]),
        "Imagenet32_train_npz/train_data_batch_1.npz": npz(TRAIN[:8])}))
    (folder / "Imagenet32_val_npz.zip").write_bytes(make_zip({"val_data.npz": npz(VALID)}))
    return folder


def write_parquet(folder: Path, images=IMAGES) -> Path:
    from datasets import Dataset, Features, Image as ImageFeature, Value

    folder.mkdir(parents=True)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    for name, part in (("train-00000-of-00002", images[:7]), ("train-00001-of-00002", images[7:N_TRAIN]),
                       ("validation-00000-of-00001", images[N_TRAIN:])):
        rows = {"image": [Image.fromarray(image) for image in part], "label": list(range(len(part)))}
        Dataset.from_dict(rows, features=features).to_parquet(folder / f"{name}.parquet")
    return folder


WRITERS = {"oord": write_oord, "npz": write_npz, "parquet": write_parquet}


def imagenet(root: Path, setup: bool = True, **kwargs) -> ImageNetDataModule:
    options = {"size": S, "root": root, "valid_images": 0, "batch_size": 4, "num_workers": 0, **kwargs}
    dm = ImageNetDataModule(**options)
    if setup:
        dm.prepare_data()
        dm.setup("fit")
    return dm


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / f"imagenet{S}").iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("format", ["oord", "npz", "parquet"])
def test_every_format_gives_the_same_images_in_raster_order(tmp_path, format):
    source = WRITERS[format](tmp_path / "source")
    dm = imagenet(tmp_path, format=format, path=source, eval_batch_size=3)
    cache = dm.cache
    assert cache.path == tmp_path / f"imagenet{S}" / format
    assert sorted(p.name for p in cache.path.iterdir()) == ["meta.json", "train.u8", "valid.u8"]
    assert (cache.path / "train.u8").read_bytes() == TRAIN.tobytes()  # [N, S, S, 3] uint8, source order
    assert (cache.path / "valid.u8").read_bytes() == VALID.tobytes()
    assert cache.meta["splits"]["train"] == {"file": "train.u8", "images": N_TRAIN, "sha256": sha(TRAIN.tobytes())}
    assert dm.vocab_size == 256 and dm.metric == "bpd" and dm.image_size == S
    # Evaluation: every official validation image once, in order, as raster-order pixel tokens.
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [3, 2] and all(b.dtype == torch.long for b in batches)
    tokens = torch.cat(batches)
    assert tokens.shape == (N_VALID, 3 * S * S) and torch.equal(tokens, encode_images(VALID))
    assert tokens[1, :6].tolist() == [*VALID[1, 0, 0], *VALID[1, 0, 1]]  # (y, x) = (0, 0) then (0, 1)
    assert tokens[1, 3 * S: 3 * S + 3].tolist() == VALID[1, 1, 0].tolist()  # row 1 starts after S pixels
    assert dm.num_eval_tokens("test") == N_VALID * 3 * S * S == dm.num_eval_tokens("valid")
    # A second module reuses the cache without the source.
    state = files_state(cache.path)
    again = imagenet(tmp_path, format=format)
    assert files_state(cache.path) == state and torch.equal(next(iter(again.val_dataloader())), tokens[:4])


def test_hub_id_streams_its_train_and_validation_splits(tmp_path, monkeypatch):
    # No network here: the hub's load_dataset is replaced by the same rows streamed from local parquet files.
    import datasets

    folder, real, asked = write_parquet(tmp_path / "hub"), datasets.load_dataset, []

    def from_hub(name, split=None, streaming=False, **kwargs):
        if name == "parquet":  # the local-files path of hier_lm goes through unchanged
            return real(name, split=split, streaming=streaming, **kwargs)
        asked.append((name, split, streaming))
        if name == "offline/imagenet":
            raise ConnectionError("Couldn't reach 'offline/imagenet' on the Hub (OfflineModeIsEnabled)")
        files = sorted(str(p) for p in folder.glob(f"{split}-*.parquet"))
        return real("parquet", data_files={split: files}, split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", from_hub)
    cache = prepare_imagenet(S, "parquet", tmp_path, "someone/imagenet-1k-32x32", progress=False)
    assert asked == [("someone/imagenet-1k-32x32", "train", True), ("someone/imagenet-1k-32x32", "validation", True)]
    assert (cache.path / "train.u8").read_bytes() == TRAIN.tobytes()
    assert (cache.path / "valid.u8").read_bytes() == VALID.tobytes()
    assert cache.meta["source"] == "hf:someone/imagenet-1k-32x32"
    assert prepare_imagenet(S, "parquet", tmp_path, "someone/imagenet-1k-32x32").path == cache.path
    assert len(asked) == 2  # reused without the hub
    with pytest.raises(DownloadError, match=r"could not read the Hugging Face dataset offline/imagenet \(Couldn't "
                                            r"reach .*download it on a machine with network .*data\.path=DIR$"):
        prepare_imagenet(S, "parquet", tmp_path / "offline", "offline/imagenet", progress=False)


def test_held_out_valid_split(tmp_path):
    dm = imagenet(tmp_path, path=write_oord(tmp_path / "src"), valid_images=4)
    train, valid = dm.sources["train"], dm.sources["valid"]
    assert len(train) == N_TRAIN - 4 and len(valid) == 4 and dm.num_eval_tokens("valid") == 4 * 3 * S * S
    rows = np.concatenate([train.rows, valid.rows])
    assert sorted(rows.tolist()) == list(range(N_TRAIN))  # a partition of the official train split
    assert np.array_equal(valid.read(np.arange(4)), TRAIN[valid.rows])
    assert torch.equal(torch.cat(list(dm.test_dataloader())), encode_images(VALID))  # test = official valid
    other = imagenet(tmp_path, valid_images=4, seed=5)  # the held-out images do not depend on data.seed
    assert np.array_equal(other.sources["valid"].rows, valid.rows)
    with pytest.raises(ValueError, match=r"data\.valid_images=14 but the train split has only 14 images"):
        imagenet(tmp_path, valid_images=N_TRAIN)


# ---------------------------------------------------------------------------------------- bad input


def test_wrong_image_size_is_one_line_naming_the_file(tmp_path):
    big = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    tars = {**TARS, "valid_32x32.tar": make_tar([VALID[0], *big], "valid_32x32")}
    with pytest.raises(ImageSizeError, match=r"^valid_32x32\.tar:valid_32x32/00001\.png is 64x64, expected 32x32: "
                                             r"this is not the imagenet32 data \(data=imagenet64 is"):
        prepare_imagenet(S, "oord", tmp_path, write_oord(tmp_path / "oord", tars))
    folder = write_npz(tmp_path / "npz")
    (folder / "Imagenet32_val_npz.zip").write_bytes(make_zip({"val_data.npz": npz(big)}))
    with pytest.raises(ImageSizeError, match=r"val_data\.npz: 'data' is uint8 \[2, 12288\], expected uint8 "
                                             r"\[N, 3072\] .*use data=imagenet64"):
        prepare_imagenet(S, "npz", tmp_path, folder)
    (folder / "Imagenet32_val_npz.zip").write_bytes(make_zip({"val_data.npz": npz(VALID, labels=np.ones(5))}))
    with pytest.raises(ValueError, match=r"has no array 'data' \(it holds \['labels'\]\)"):
        prepare_imagenet(S, "npz", tmp_path, folder)
    parquet = write_parquet(tmp_path / "parquet", [*IMAGES[:-1], big[0]])
    with pytest.raises(ImageSizeError, match=r"\(valid\) row 4 is 64x64, expected 32x32"):
        prepare_imagenet(S, "parquet", tmp_path, parquet)
    assert not (tmp_path / f"imagenet{S}" / "oord").exists() and leftovers(tmp_path) == []


def test_damaged_or_missing_files_keep_the_finished_cache(tmp_path):
    good = imagenet(tmp_path, path=write_oord(tmp_path / "good")).cache
    state = files_state(good.path)

    archive = TARS["train_32x32.tar"]
    cut = write_oord(tmp_path / "cut", {**TARS, "train_32x32.tar": archive[: len(archive) // 2]})
    with pytest.raises(DamagedFileError, match=r"train_32x32\.tar is damaged or truncated .* after \d+ images"):
        prepare_imagenet(S, "oord", tmp_path, cut)
    corrupt = bytearray(archive)
    corrupt[600:700] = b"\xff" * 100  # inside the first PNG
    with pytest.raises(DamagedFileError, match=r"00000\.png is not a readable image"):
        prepare_imagenet(S, "oord", tmp_path, write_oord(tmp_path / "corrupt", {**TARS,
                                                                               "train_32x32.tar": bytes(corrupt)}))
    with pytest.raises(FileNotFoundError, match=r"has no valid_32x32\.tar .*pass the folder holding train_32x32\.tar "
                                                r"and valid_32x32\.tar"):
        prepare_imagenet(S, "oord", tmp_path, write_oord(tmp_path / "half", {"train_32x32.tar": archive}))

    npz_dir = write_npz(tmp_path / "npz")
    zipped = (npz_dir / "Imagenet32_train_npz.zip").read_bytes()
    (npz_dir / "Imagenet32_train_npz.zip").write_bytes(zipped[: len(zipped) - 100])  # lost its central directory
    with pytest.raises(DamagedFileError, match=r"Imagenet32_train_npz\.zip is damaged or truncated"):
        prepare_imagenet(S, "npz", tmp_path, npz_dir)
    flipped = bytearray(zipped)
    flipped[len(zipped) // 3] ^= 0xFF  # inside the deflated batch 2
    (npz_dir / "Imagenet32_train_npz.zip").write_bytes(bytes(flipped))
    with pytest.raises(DamagedFileError, match=r"is damaged or truncated"):
        prepare_imagenet(S, "npz", tmp_path, npz_dir)
    (npz_dir / "Imagenet32_train_npz.zip").write_bytes(make_zip({"train_data_batch_2.npz": npz(TRAIN)}))
    with pytest.raises(FileNotFoundError, match=r"lacks train_data_batch_1\.npz \(it has batches \[2\]\)"):
        prepare_imagenet(S, "npz", tmp_path, npz_dir)
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere does not exist"):
        prepare_imagenet(S, "oord", tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no imagenet32 cache in .*pass data\.path=.*image-net\.org/small/ "
                                                r"is offline"):
        prepare_imagenet(S, "oord", tmp_path / "empty")

    # None of these touched the finished cache, and none left a half-written folder behind.
    assert files_state(good.path) == state and leftovers(tmp_path) == []
    assert torch.equal(next(iter(imagenet(tmp_path).val_dataloader())), encode_images(VALID[:4]))

    # A prepare killed between moving the old cache aside and renaming the new one in: the next run puts the
    # old one back, and deletes a dead process's half-written folder.
    dead = f"{host_tag()}-{2 ** 22 + 12345}"  # above Linux's largest pid
    good.path.rename(good.path.parent / f".oord.old-{dead}")
    (good.path.parent / f".oord.tmp-{dead}").mkdir()
    assert torch.equal(next(iter(imagenet(tmp_path).val_dataloader())), encode_images(VALID[:4]))
    assert files_state(good.path) == state and leftovers(tmp_path) == []


def test_download_checksum_and_offline(tmp_path):
    server = Server({f"/small/{name}": data for name, data in TARS.items()})
    try:
        url = f"{server.url}/small/"
        sums = {name: sha(data) for name, data in TARS.items()}
        with pytest.raises(ChecksumError, match=r"valid_32x32\.tar has sha256 .*expected 0{64}"):
            prepare_imagenet(S, "oord", tmp_path, url=url, sha256={**sums, "valid_32x32.tar": "0" * 64},
                             progress=False)
        downloads = tmp_path / f"imagenet{S}" / "downloads"
        assert sorted(p.name for p in downloads.iterdir()) == ["train_32x32.tar"]  # the verified one is kept
        dm = imagenet(tmp_path, url=url, sha256=sums)
        assert (dm.cache.path / "train.u8").read_bytes() == TRAIN.tobytes()
        assert dm.cache.meta["source_sha256"] == sums and dm.cache.meta["source"] == url
        assert [path for path, _ in server.requests] == ["/small/train_32x32.tar", "/small/valid_32x32.tar",
                                                         "/small/valid_32x32.tar"]
        imagenet(tmp_path, url=url, sha256=sums)  # the cache is reused: no request
        assert len(server.requests) == 3
    finally:
        server.close()
    with pytest.raises(DownloadError, match=r"could not download .*Connection refused.*download them on a machine "
                                            r"with network and pass data\.path="):
        prepare_imagenet(S, "oord", tmp_path / "offline", url=UNREACHABLE, progress=False)
    with pytest.raises(ChecksumError, match=r"train_32x32\.tar has sha256 .*expected 1{64}"):
        prepare_imagenet(S, "oord", tmp_path / "local", write_oord(tmp_path / "src"),
                         sha256={"train_32x32.tar": "1" * 64})


def test_prepare_cli(tmp_path, capsys):
    source = write_npz(tmp_path / "src")
    args = ["prepare", "imagenet32", "data.format=npz", f"data.path={source}", f"data.root={tmp_path}"]
    data_cli(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"imagenet32 (npz) cache: {tmp_path / 'imagenet32' / 'npz'}"
    assert out[1] == f"  source: {source}"
    assert out[2] == f"  train  train.u8:        14 images (the full set has 1,281,167), sha256 {sha(TRAIN.tobytes())}"
    assert out[3] == f"  valid  valid.u8:         5 images (the full set has 50,000), sha256 {sha(VALID.tobytes())}"
    assert out[4:] == [f"  source file {name}: sha256 {sha((source / name).read_bytes())}"
                       for name in ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip")]
    with pytest.raises(SystemExit) as exit_info:
        data_cli(["prepare", "imagenet64", "format=npz", f"path={source}", f"root={tmp_path}"])
    progress, err = capsys.readouterr().err.splitlines()  # the conversion started, then failed: one line
    assert exit_info.value.code == 2 and progress.startswith("imagenet64: converting")
    assert err.startswith("error: Imagenet32_train_npz.zip:") and "[N, 12288]" in err and "use data=imagenet32" in err


# ------------------------------------------------------------------------------ order, resume, shards


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_resume_mid_epoch_continues_the_batch_sequence(tmp_path):
    source = write_oord(tmp_path / "src")

    def fit(max_steps, ckpt_path=None):
        return fit_recording(imagenet(tmp_path, path=source, seed=9), max_steps, tmp_path / "run", ckpt_path)

    # 14 images, batch 4: 3 batches per epoch (2 images dropped, others each epoch); 4 steps x 2 = 8 batches.
    trainer, uninterrupted = fit(4)
    assert len(uninterrupted) == 8 and trainer.datamodule.state_dict() == {"epoch": 2, "position": 8, "seed": 9}
    tokens = encode_images(TRAIN)
    for epoch in range(2):  # each epoch: a permutation, 12 distinct images
        seen = torch.cat(uninterrupted[3 * epoch: 3 * epoch + 3])
        index = [next(i for i in range(N_TRAIN) if torch.equal(row, tokens[i])) for row in seen]
        assert len(set(index)) == 12
        assert index == np.random.default_rng([9, epoch]).permutation(N_TRAIN)[:12].tolist()
    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")  # mid-epoch 0: 2 of its 3 batches consumed
    saved = torch.load(tmp_path / "step1.ckpt", weights_only=True)["ImageNetDataModule"]
    assert saved == {"epoch": 0, "position": 8, "seed": 9}
    _, resumed = fit(4, ckpt_path=tmp_path / "step1.ckpt")
    assert len(resumed) == 6 and all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted[2:]))
    with pytest.raises(ValueError, match=r"data\.seed=9, but this run has data\.seed=1; resume with data\.seed=9"):
        imagenet(tmp_path, seed=1).load_state_dict(saved)


def test_two_ranks_read_disjoint_equal_shards(tmp_path):
    dm = imagenet(tmp_path, path=write_oord(tmp_path / "src"), batch_size=3, seed=4)

    def batches(rank, start=0, count=4):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        loader = dm.train_dataloader()
        dm.trainer = None
        assert loader.dataset.start == start
        return [b for b, _ in zip(loader, range(count))]

    # 14 images, batch 3, 2 ranks: 4 batches per epoch -> 2 per rank; 2 images of each epoch are dropped.
    rank0, rank1 = batches(0), batches(1)
    assert all(b.shape == (3, 3 * S * S) for b in rank0 + rank1)
    tokens = encode_images(TRAIN)
    ids = {r: [[next(i for i in range(N_TRAIN) if torch.equal(row, tokens[i])) for row in b] for b in bs]
           for r, bs in ((0, rank0), (1, rank1))}
    for epoch in range(2):
        mine, theirs = sum(ids[0][2 * epoch: 2 * epoch + 2], []), sum(ids[1][2 * epoch: 2 * epoch + 2], [])
        assert len(mine) == len(theirs) == 6 and not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(np.random.default_rng([4, epoch]).permutation(N_TRAIN)[:12].tolist())
    assert ids[0][0] != ids[0][2]  # another order in epoch 1
    # Resumed state counts the images of all ranks: after 1 step per rank, 6 images of epoch 0.
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, global_step=1, accumulate_grad_batches=1)
    assert dm.state_dict() == {"epoch": 0, "position": 6, "seed": 4}
    dm.trainer = None
    dm.load_state_dict({"epoch": 1, "position": 6, "seed": 4})
    assert torch.equal(batches(1, start=3, count=1)[0], rank1[3])
    with pytest.raises(ValueError, match=r"the train split has 14 images, fewer than data\.batch_size \* world size "
                                         r"= 8 \* 2"):
        TrainImages(dm.sources["train"], 8, 0, 0, 2)


def test_two_ranks_score_every_evaluation_image_once():
    dm = SyntheticImagesDataModule(size=4, split_sizes=[16, 7, 5], batch_size=2, eval_batch_size=3)
    dm.setup("validate")
    whole = list(dm.val_dataloader())  # one rank: the 7 valid images, in order
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, distributed_sampler_kwargs={
            "rank": rank, "num_replicas": 2})
        shards.append(list(dm.val_dataloader()))  # pairs (pixels, n_context)
    dm.trainer = None
    items = [[(tuple(p.tolist()), int(c)) for pixels, n_context in batches for p, c in zip(pixels, n_context)]
             for batches in shards]
    assert len(items[0]) == len(items[1]) == 4  # ceil(7 / 2) each: as many forward passes on every rank
    scored = [[p for p, c in rank_items if c == 0] for rank_items in items]
    assert not set(scored[0]) & set(scored[1])
    assert sorted(scored[0] + scored[1]) == sorted(tuple(p.tolist()) for p in torch.cat(whole))
    assert [c for rank_items in items for _, c in rank_items if c] == [3 * 4 * 4]  # one padding image, all context

    # The image task scores exactly those: both ranks' batches give the one-rank mean NLL and token count.
    torch.manual_seed(0)
    task = ImageModelTask(model={"name": "transformer", "vocab_size": 256, "d_model": 16, "n_layers": 1,
                                 "n_heads": 2, "d_ff": 32, "dropout": 0.0}, optim={}, image_size=4)
    means = []
    with torch.no_grad():
        for batches in (whole, shards[0] + shards[1]):
            for i, batch in enumerate(batches):
                task.validation_step(batch, i)
            means.append((task.eval_nll.compute().item(), task.eval_nll.weight.item()))
            task.eval_nll.reset()
    assert means[1][0] == pytest.approx(means[0][0], rel=1e-6) and means[0][1] == means[1][1] == 7 * 3 * 4 * 4


# ------------------------------------------------------------------------------------- synthetic, config


def test_synthetic_images_are_deterministic_learnable_pixel_batches():
    def module(**kwargs):
        dm = SyntheticImagesDataModule(**{"size": 8, "split_sizes": [64, 10, 6], "batch_size": 5, **kwargs})
        dm.setup("fit")
        return dm

    dm = module()
    assert dm.vocab_size == 256 and dm.metric == "bpd" and dm.image_size == 8
    train = [b for b, _ in zip(dm.train_dataloader(), range(3))]
    assert all(b.dtype == torch.long and b.shape == (5, 192) for b in train)
    assert all(torch.equal(x, y) for x, y in zip(train, [b for b, _ in zip(module().train_dataloader(), range(3))]))
    assert not torch.equal(train[0], next(iter(module(seed=1).train_dataloader())))  # seed: another order
    valid = torch.cat(list(dm.val_dataloader()))
    assert valid.shape == (10, 192) and dm.num_eval_tokens("valid") == 10 * 192
    assert torch.equal(valid, encode_images(SyntheticImages(8, 10, 0, "valid").read(np.arange(10))))
    assert not torch.equal(valid[:6], torch.cat(list(dm.test_dataloader())))  # the splits hold other images
    assert not torch.equal(valid, torch.cat(list(module(image_seed=1).val_dataloader())))
    # 16 levels per channel and mostly smooth: far below 8 bits per sub-pixel for any model of the values.
    values = torch.cat(train).flatten()
    assert set(values.unique().tolist()) <= set(range(0, 256, 17))
    counts = torch.bincount(values, minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    assert float(-(p * p.log2()).sum()) < 4.1
    assert module(size=5).sources["train"].read(np.arange(2)).shape == (2, 5, 5, 3)  # any size
    with pytest.raises(ValueError, match=r"data\.split_sizes must be three positive image counts"):
        module(split_sizes=[4, 0, 1])


def test_config_groups_instantiate_the_modules(tmp_path, monkeypatch):
    monkeypatch.setenv("HIER_LM_DATA", str(tmp_path))
    for name, size in (("imagenet32", 32), ("imagenet64", 64)):
        cfg = compose_train_config([f"data={name}", "seed=3", "data.sha256={train_32x32.tar: abc}"])
        assert set(cfg.data) - {"_target_"} == set(inspect.signature(ImageNetDataModule).parameters)
        dm = instantiate(cfg.data)
        assert isinstance(dm, ImageNetDataModule) and dm.image_size == size and dm.hparams.format == "oord"
        assert dm.hparams.root == str(tmp_path) and dm.hparams.seed == 3 and dm.hparams.valid_images == 10_000
        assert dm.hparams.sha256 == {"train_32x32.tar": "abc"} and type(dm.hparams.sha256) is dict
        torch.save(dict(dm.hparams), tmp_path / "hparams.pt")  # plain values: loadable with weights_only
        assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(dm.hparams)
        with pytest.raises(FileNotFoundError, match=rf"no imagenet{size} cache in .*data\.path="):
            dm.prepare_data()
    cfg = compose_train_config(["data=synthetic_images", "seed=2"])
    assert set(cfg.data) - {"_target_"} == set(inspect.signature(SyntheticImagesDataModule).parameters)
    dm = instantiate(cfg.data)
    assert isinstance(dm, SyntheticImagesDataModule) and dm.image_size == 8 and dm.hparams.seed == 2
    assert type(dm.hparams.split_sizes) is list
