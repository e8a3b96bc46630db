"""`python -m hier_lm.evaluate ckpt=... split=valid|test`: mean NLL, bpc, bpd or perplexity, tokens evaluated.

Prints the results and writes them as JSON (`<run>/eval_<split>.json` by default). For byte corpora the
split's unigram entropy (bits per byte) is printed beside bpc as the no-context reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from hier_lm.checkpoint import load, read_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_user_error
from hier_lm.files import atomic_write_text
from hier_lm.tasks import CHECKPOINT_KEY, metric_value, scored_next_token_loss, with_start_token

SPLITS = ("valid", "test")


@torch.inference_mode()
def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the checkpoint on a split; returns the results dict (also written as JSON)."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    file, checkpoint = read_checkpoint(cfg.ckpt)
    data_cfg = dict(checkpoint[CHECKPOINT_KEY]["config"]["data"])
    overrides = (("root", cfg.data_root), ("eval_batch_size", cfg.batch_size), ("eval_context", cfg.eval_context))
    data_cfg.update({k: v for k, v in overrides if v is not None})
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("validate" if cfg.split == "valid" else "test")
    loader = datamodule.val_dataloader() if cfg.split == "valid" else datamodule.test_dataloader()
    model = load(file).to(cfg.device)

    total_nll, tokens = 0.0, 0
    n_batches = len(loader) if cfg.limit_batches is None else min(cfg.limit_batches, len(loader))
    for i, batch in enumerate(tqdm(loader, total=n_batches, desc=f"evaluating {cfg.split}")):
        if i == n_batches:
            break
        batch = batch.to(cfg.device) if isinstance(batch, torch.Tensor) else [b.to(cfg.device) for b in batch]
        if datamodule.metric == "bpd":  # image batches are the pixels alone: score all of them after START
            batch = with_start_token(batch)
        loss, n = scored_next_token_loss(model, batch)
        total_nll += loss.item() * n
        tokens += n
    loss = total_nll / max(tokens, 1)
    results = {"checkpoint": str(file), "split": cfg.split, "loss": loss,
               datamodule.metric: metric_value(datamodule.metric, loss), "tokens": tokens}
    if hasattr(datamodule, "corpus"):
        results["unigram_entropy_bits"] = datamodule.corpus.unigram_entropy(cfg.split)
    out = Path(cfg.out) if cfg.out else file.parent.parent / f"eval_{cfg.split}.json"
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    results["out"] = str(out)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    r = evaluate(cfg)
    line = f"{r['split']}: loss {r['loss']:.4f} nats/token"
    if "bpc" in r:
        line += f", {r['bpc']:.4f} bpc"
    if "bpd" in r:
        line += f", {r['bpd']:.4f} bpd"
    if "ppl" in r:
        line += f", perplexity {r['ppl']:.2f}"
    line += f" over {r['tokens']:,} tokens"
    if "unigram_entropy_bits" in r:
        line += f" (unigram entropy of the split: {r['unigram_entropy_bits']:.4f} bits/byte)"
    print(line)
    print(f"written: {r['out']}")


if __name__ == "__main__":
    main()
