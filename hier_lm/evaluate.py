"""`python -m hier_lm.evaluate ckpt=... split=valid|test`: mean NLL, bpc, bpd or perplexity, tokens evaluated.

Lightning's `Trainer.test` runs the checkpoint's task (`ImageModelTask` for image models, `LanguageModelTask`
otherwise) on the split's loader, on `devices=` devices of `accelerator=` at `precision=` (several devices score
every window once between them). Prints the results and writes them as JSON (`<run>/eval_<split>.json` by
default). For byte corpora the split's unigram entropy (bits per byte) is printed beside bpc as the no-context
reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from hier_lm.checkpoint import load_weights, read_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_user_error
from hier_lm.files import atomic_write_text
from hier_lm.tasks import CHECKPOINT_KEY, build_task

SPLITS = ("valid", "test")


class SplitAsTest(L.LightningDataModule):
    """`datamodule` with the loader of its split `"valid"` or `"test"` as the test loader, so that
    `Trainer.test` evaluates either split."""

    def __init__(self, datamodule: L.LightningDataModule, split: str):
        super().__init__()
        self.datamodule, self.split = datamodule, split

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer  # its loaders give each rank its share
        self.datamodule.setup("validate" if self.split == "valid" else "test")

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader() if self.split == "valid" else self.datamodule.test_dataloader()


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the checkpoint on a split; returns the results dict (rank 0 also writes it as JSON)."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    file, checkpoint = read_checkpoint(cfg.ckpt, model_only=True)
    saved = checkpoint[CHECKPOINT_KEY]
    data_cfg = dict(saved["config"]["data"])
    overrides = (("root", cfg.data_root), ("eval_batch_size", cfg.batch_size), ("eval_context", cfg.eval_context))
    data_cfg.update({k: v for k, v in overrides if v is not None})
    datamodule = instantiate(data_cfg)
    task = build_task({**saved["config"], "model": saved["model"]}, datamodule)
    load_weights(task, checkpoint["state_dict"], file)
    trainer = instantiate(cfg.trainer, **({"accelerator": cfg.device} if cfg.device else {}))
    (metrics,) = trainer.test(task, datamodule=SplitAsTest(datamodule, cfg.split), verbose=False)

    metric = datamodule.metric
    results = {"checkpoint": str(file), "split": cfg.split, "loss": metrics["test/loss"],
               metric: metrics[f"test/{metric}"], "tokens": task.scored_tokens}
    if hasattr(datamodule, "corpus"):
        results["unigram_entropy_bits"] = datamodule.corpus.unigram_entropy(cfg.split)
    out = Path(cfg.out) if cfg.out else file.parent.parent / f"eval_{cfg.split}.json"
    if trainer.is_global_zero:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    results["out"] = str(out)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    r = evaluate(cfg)
    if rank_zero_only.rank != 0:
        return
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
