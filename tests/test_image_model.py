"""Image modelling: the START shift and bpd of the image task, cached image sampling, the sample-grid callback,
`python -m hier_lm.sample` / `hier_lm.evaluate` on an image run, and a tiny overfit."""

import io
import math

import numpy as np
import pytest
import lightning as L
import torch
import wandb
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import hier_lm
from hier_lm.config import compose_train_config
from hier_lm.data import SyntheticImagesDataModule, encode_images
from hier_lm.data.synthetic_images import SyntheticImages
from hier_lm.evaluate import evaluate
from hier_lm.image_sampling import load_images, sample_images, top_half_tokens
from hier_lm.models import Hourglass
from hier_lm.sample import sample_image_files, sample_text
from hier_lm.tasks import ImageModelTask, build_task, image_model_config, next_token_loss, with_start_token
from hier_lm.train import train
from tests.helpers import tiny_overrides
from tests.test_cli import cli, entry_config

SIZE = 8  # the synthetic images' default: 192 sub-pixel tokens
TINY = dict(name="hourglass", d_model=32, n_heads=2, d_ff=64, dropout=0.0, hierarchy="1@1 1@3 1@1",
            shortening="attention", attention_shortening_base="linear", upsampling="attention",
            attention_upsampling_base="linear")


def tiny_model(image_size: int, pos: str = "rope", seed: int = 0) -> Hourglass:
    torch.manual_seed(seed)
    kwargs = image_model_config({**TINY, "pos": pos}, image_size)
    kwargs.pop("name")
    return Hourglass(**kwargs).eval()


def images(count: int, size: int = SIZE, split: str = "valid") -> torch.Tensor:
    """`uint8 [count, size, size, 3]` synthetic images."""
    return torch.from_numpy(SyntheticImages(size, count, seed=0, split=split).read(np.arange(count)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is much faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-step tiny run of the quickstart_images recipe on 8x8 images (its samples callback included), logged
    to CSV and TensorBoard."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = [*tiny_overrides(runs, runs, recipe="quickstart_images"), f"data.size={SIZE}",
                 "logger=[csv,tensorboard]"]
    return train(compose_train_config(["recipe=quickstart_images", *overrides]), recipe="quickstart_images")


def test_uniform_model_is_8_bits_per_dimension():
    """All-zero logits (a zeroed head) give every sub-pixel probability 1/256: val/bpd = 8 through the task's
    validation loop, i.e. total nats / (ln 2 * 3 * H * W) per image."""
    data = SyntheticImagesDataModule(size=4, split_sizes=[8, 6, 6], batch_size=4)
    task = build_task({"model": TINY, "optim": {}}, data)
    assert isinstance(task, ImageModelTask) and task.model.max_len == 48
    torch.nn.init.zeros_(task.model.head.weight)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(task, datamodule=data, verbose=False)
    assert metrics["val/bpd"] == pytest.approx(8.0, abs=1e-6)  # float32 rounding of ln 256
    assert metrics["val/loss"] == pytest.approx(math.log(256), abs=1e-6)


def test_start_token_shift_and_targets():
    """Inputs are [START=0] + pixels[:-1], targets every pixel; logits at t see only pixels < t."""
    pixels = encode_images(images(2, 4))
    batch = with_start_token(pixels)
    assert batch.shape == (2, 49) and (batch[:, 0] == 0).all() and torch.equal(batch[:, 1:], pixels)
    model = tiny_model(4, pos="relative")
    logits = model(batch[:, :-1])  # position t predicts pixel t
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), pixels.flatten())
    assert next_token_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    for s in (0, 1, 2, 20, 47):
        changed = pixels.clone()
        changed[:, s] = (changed[:, s] + 101) % 256
        other = model(with_start_token(changed)[:, :-1])
        assert torch.equal(other[:, : s + 1], logits[:, : s + 1]), f"pixel {s} leaked into positions <= {s}"
        if s + 1 < pixels.shape[1]:
            assert not torch.allclose(other[:, s + 1], logits[:, s + 1]), f"position {s + 1} ignores pixel {s}"


def test_image_length_is_checked():
    assert image_model_config({"name": "hourglass", "max_len": None}, 32)["max_len"] == 3072
    with pytest.raises(ValueError, match="exactly 12288 sub-pixel tokens"):
        image_model_config({"name": "hourglass", "max_len": 3072}, 64)
    with pytest.raises(ValueError, match="not the 48 sub-pixels"):
        sample_images(tiny_model(8), 4, num_images=1)


def test_cached_sampling_equals_uncached():
    model = tiny_model(4, pos="relative", seed=1)
    cached = sample_images(model, 4, num_images=3, seed=0, use_cache=True)
    assert cached.shape == (3, 4, 4, 3) and cached.dtype == torch.uint8
    assert torch.equal(sample_images(model, 4, num_images=3, seed=0, use_cache=False), cached)
    originals = images(2, 4)
    prompt = top_half_tokens(originals, 4)
    completed = sample_images(model, 4, prompt_pixels=prompt, seed=3, use_cache=True)
    assert torch.equal(sample_images(model, 4, prompt_pixels=prompt, seed=3, use_cache=False), completed)
    assert torch.equal(completed[:, :2], originals[:, :2])  # the given top halves are kept exactly


def test_overfit_a_few_images():
    """A tiny Hourglass memorises 4 images far below the 8 bpd of guessing."""
    pixels = encode_images(images(4, 4, split="train"))
    model = tiny_model(4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        loss = next_token_loss(model, with_start_token(pixels))  # what ImageModelTask.training_step minimises
        if step == 0:
            assert loss.item() / math.log(2) > 7  # about 8 bpd untrained
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        bpd = next_token_loss(model.eval(), with_start_token(pixels)).item() / math.log(2)
    assert bpd < 0.5


def test_callback_writes_the_sample_grid(image_run):
    checkpoint = torch.load(image_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hier_lm"]["image_size"] == SIZE and checkpoint["hier_lm"]["model"]["max_len"] == 192
    with Image.open(image_run / "samples" / "step_2.png") as grid:  # after the validation at step 2
        assert grid.format == "PNG" and grid.size == (2 * (SIZE + 2) + 2, SIZE + 4)  # 2 images, 2 px padding
    assert [p.name for p in (image_run / "samples").iterdir()] == ["step_2.png"]  # no temporary file left
    model = hier_lm.load(image_run)
    assert model.image_size == SIZE and model.max_len == 3 * SIZE * SIZE


def test_samples_are_logged_as_tensorboard_images(image_run):
    events = EventAccumulator(str(image_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (event,) = events.Images("samples")
    assert event.step == 2
    logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.int16)
    saved = np.asarray(Image.open(image_run / "samples" / "step_2.png").convert("RGB"), dtype=np.int16)
    assert logged.shape == saved.shape == (SIZE + 4, 2 * (SIZE + 2) + 2, 3)
    assert np.abs(logged - saved).max() <= 1  # the same grid (TensorBoard truncates to uint8, the PNG rounds)


def test_samples_are_logged_as_wandb_images(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B runs offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = [*tiny_overrides(tmp_path, tmp_path, recipe="quickstart_images"), "logger=wandb"]
    run_dir = train(compose_train_config(["recipe=quickstart_images", *overrides]), recipe="quickstart_images")
    wandb.teardown()  # wait for W&B's background service to write everything out
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (logged,) = (offline / "files" / "media" / "images").glob("samples_*.png")
    assert logged.read_bytes() == (run_dir / "samples" / "step_2.png").read_bytes()


@pytest.mark.slow
def test_sample_command_writes_grids_and_completions(image_run, tmp_path):
    grid = tmp_path / "grid.png"
    cli("hier_lm.sample", f"ckpt={image_run}", "num_images=4", f"out={grid}", "temperature=1.0", "seed=0",
        "save_each=true", OMP_NUM_THREADS="1")
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.size == (2 * (SIZE + 2) + 2,) * 2  # a 2 x 2 grid
    for i in range(4):
        with Image.open(tmp_path / f"grid_{i:03d}.png") as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"

    originals = images(3)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for i, image in enumerate(originals.numpy()):
        Image.fromarray(image).save(prompts / f"{i}.png")
    # the same function the command calls for these arguments, in-process (one subprocess is enough)
    sample_image_files(entry_config("sample", f"ckpt={image_run}", f"prompt_images={prompts}",
                                    f"out={tmp_path / 'done.png'}", "seed=0", "save_each=true"))
    for i, original in enumerate(originals.numpy()):
        completed = np.asarray(Image.open(tmp_path / f"done_{i:03d}.png").convert("RGB"))
        assert np.array_equal(completed[: SIZE // 2], original[: SIZE // 2])
    assert not (tmp_path / "done_003.png").exists()


def test_prompt_images_and_mismatched_prompts_are_clear_errors(image_run, tmp_path):
    array = images(2).numpy()
    np.save(tmp_path / "prompts.npy", array)
    assert torch.equal(load_images(tmp_path / "prompts.npy", SIZE), torch.from_numpy(array))
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 4, 4, 3\]"):
        load_images(tmp_path / "prompts.npy", 4)
    Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="is 7x5, this model makes 8x8 images"):
        load_images(tmp_path / "*.png", SIZE)
    cfg = entry_config("sample", f"ckpt={image_run}", "prompt='def '")
    with pytest.raises(ValueError, match="takes no text prompt"):
        sample_image_files(cfg)
    with pytest.raises(ValueError, match="is an image model"):
        sample_text(cfg)


def test_evaluate_reports_bpd(image_run, tmp_path):
    cfg = entry_config("evaluate", f"ckpt={image_run}", "split=test", f"out={tmp_path / 'eval.json'}")
    results = evaluate(cfg)
    assert results["tokens"] == 8 * 3 * SIZE * SIZE  # every sub-pixel of the 8 test images
    assert results["bpd"] == pytest.approx(results["loss"] / math.log(2))
    assert 0 < results["bpd"] < 9
