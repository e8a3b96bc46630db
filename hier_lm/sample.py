"""`python -m hier_lm.sample ckpt=... prompt=... max_new_tokens=... temperature= top_k= top_p= seed=`.

Text models (bytes, or LM1B subwords through the tokenizer saved in the checkpoint): prints the continuations
to stdout (and to `out=` if given).
Image models (checkpoints of `ImageModelTask`): writes a PNG grid of `num_images` samples to `out=` (default
`samples.png`), with `save_each=true` also each image (`grid.png` -> `grid_000.png`, ...). With
`prompt_images=<folder or glob of PNG files, or an .npy uint8 [N, H, W, 3]>` it keeps the top half of each of
the first `num_images` images and samples the bottom half.

Settings that would sample nonsense (`top_p` outside (0, 1], a temperature that is not a finite number >= 0,
`max_new_tokens` not a whole number >= 0, `num_samples` < 1) and image settings given to a text model (or the
reverse) are one-line errors before anything is sampled or written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch import nn

from hier_lm.checkpoint import load, read_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_config_error, exit_on_user_error, quote_free_text_args
from hier_lm.data.lm1b import decode_ids, encode_text, tokenizer_from_checkpoint
from hier_lm.files import atomic_write_text
from hier_lm.generation import check_count, check_sampling, generate
from hier_lm.image_sampling import load_images, sample_images, save_images, top_half_tokens

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_NUM_IMAGES = 16


def text_codec(ckpt, vocab_size: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) between text and a text model's tokens: UTF-8 bytes for vocab 256, else the subword
    tokenizer saved in the checkpoint (LM1B runs; a newline is the end-of-sentence token)."""
    if vocab_size == 256:
        return (lambda text: list(text.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    tokenizer = tokenizer_from_checkpoint(read_checkpoint(ckpt, model_only=True)[1])
    if tokenizer is None:
        raise ValueError(f"{ckpt}: a text model of vocab {vocab_size} whose checkpoint holds no tokenizer: text "
                         "sampling needs a byte-level model (vocab 256) or a subword run (data=lm1b)")
    return (lambda text: encode_text(tokenizer, text)), (lambda ids: decode_ids(tokenizer, ids))


def sample_text(cfg: DictConfig, model: nn.Module | None = None) -> list[str]:
    """The `num_samples` continuations (prompt included) described by the sample config."""
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens)
    check_count("num_samples", cfg.num_samples, minimum=1)
    model = (model if model is not None else load(cfg.ckpt)).to(cfg.device)
    if getattr(model, "image_size", None) is not None:
        raise ValueError(f"{cfg.ckpt} is an image model: give num_images= (and prompt_images=), not a text prompt")
    if cfg.get("prompt_images") is not None or cfg.get("save_each") or cfg.get("num_images") is not None:
        raise ValueError(f"{cfg.ckpt} is a text model: num_images=, prompt_images= and save_each= are for image "
                         f"models; give prompt= or prompt_file=")
    if cfg.get("out") and Path(cfg.out).suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{cfg.ckpt} is a text model: it writes text, not an image to out={cfg.out}; give a text "
                         f"file, e.g. out=samples.txt")
    encode, decode = text_codec(cfg.ckpt, model.vocab_size)
    prompt = Path(cfg.prompt_file).read_text(encoding="utf-8") if cfg.prompt_file else cfg.prompt
    prompt_tokens = encode("\n" if prompt is None else prompt)
    if not prompt_tokens:
        raise ValueError("the prompt is empty: give at least one character, e.g. prompt='\\n'")
    texts = []
    for i in range(cfg.num_samples):
        seed = None if cfg.seed is None else cfg.seed + i
        tokens = generate(model, prompt_tokens, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          use_cache=cfg.use_cache, seed=seed, progress=True)
        texts.append(decode(tokens.tolist()))
    return texts


def sample_image_files(cfg: DictConfig, model: nn.Module | None = None) -> list[Path]:
    """Sample (or complete) the images described by the sample config and write them; returns the files
    written, the grid first."""
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    num_images = check_count("num_images", DEFAULT_NUM_IMAGES if cfg.num_images is None else cfg.num_images, 1)
    batch_size = None if cfg.batch_size is None else check_count("batch_size", cfg.batch_size, 1)
    out = Path(cfg.out or "samples.png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"out={out}: image samples are written as a PNG grid; give a .png file, e.g. out=grid.png")
    model = (model if model is not None else load(cfg.ckpt)).to(cfg.device)
    size = getattr(model, "image_size", None)
    if size is None:
        raise ValueError(f"{cfg.ckpt} is a text model: give prompt= (num_images=, prompt_images= and save_each= "
                         f"are for image models)")
    if cfg.prompt is not None or cfg.prompt_file:
        raise ValueError(f"{cfg.ckpt} is a {size}x{size} image model: it takes no text prompt; give num_images= "
                         f"or prompt_images=<PNG folder, glob or .npy>")
    prompt = None
    if cfg.prompt_images is not None:
        prompt = top_half_tokens(load_images(cfg.prompt_images, size)[:num_images], size)
    images = sample_images(model, size, num_images, prompt, cfg.temperature, cfg.top_k, cfg.top_p,
                           use_cache=cfg.use_cache, seed=cfg.seed, batch_size=batch_size, progress=True)
    return save_images(images, out, save_each=cfg.save_each)


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    model = load(cfg.ckpt)
    if model.image_size is not None:
        written = sample_image_files(cfg, model)
        print(f"written: {written[0]}" + (f" and {len(written) - 1} images beside it" if len(written) > 1 else ""))
        return
    texts = sample_text(cfg, model)
    output = "\n".join(f"===== sample {i} =====\n{t}" if len(texts) > 1 else t for i, t in enumerate(texts))
    print(output)
    if cfg.out:
        atomic_write_text(cfg.out, output + "\n")


if __name__ == "__main__":
    quote_free_text_args(("prompt", "prompt_file", "out", "ckpt", "prompt_images"))
    main()
