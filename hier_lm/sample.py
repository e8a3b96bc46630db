"""`python -m hier_lm.sample ckpt=... prompt=... max_new_tokens=... temperature= top_k= top_p= seed=`.

Prints the continuations of a byte-level model to stdout (and to `out=` if given).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hier_lm.checkpoint import atomic_write_text, load
from hier_lm.config import CONFIG_PATH, exit_on_user_error, quote_free_text_args
from hier_lm.generation import generate


def sample_text(cfg: DictConfig) -> list[str]:
    """The `num_samples` continuations (prompt included) described by the sample config."""
    model = load(cfg.ckpt).to(cfg.device)
    if model.vocab_size != 256:
        raise ValueError(f"{cfg.ckpt}: text sampling needs a byte-level model (vocab 256), "
                         f"this one has vocab {model.vocab_size}")
    prompt = Path(cfg.prompt_file).read_text(encoding="utf-8") if cfg.prompt_file else cfg.prompt
    prompt_bytes = list(prompt.encode("utf-8"))
    if not prompt_bytes:
        raise ValueError("the prompt is empty: give at least one character, e.g. prompt='\\n'")
    texts = []
    for i in range(cfg.num_samples):
        seed = None if cfg.seed is None else cfg.seed + i
        tokens = generate(model, prompt_bytes, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          use_cache=cfg.use_cache, seed=seed, progress=True)
        texts.append(bytes(tokens.tolist()).decode("utf-8", errors="replace"))
    return texts


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    texts = sample_text(cfg)
    output = "\n".join(f"===== sample {i} =====\n{t}" if len(texts) > 1 else t for i, t in enumerate(texts))
    print(output)
    if cfg.out:
        atomic_write_text(cfg.out, output + "\n")


if __name__ == "__main__":
    quote_free_text_args(("prompt", "prompt_file", "out", "ckpt"))
    main()
