"""`python -m hier_lm.evaluate ckpt=... split=valid|test`: mean NLL, bpc, bpd or perplexity, tokens evaluated.

Lightning's `Trainer.test` runs the checkpoint's task (`ImageModelTask` for image models, `LanguageModelTask`
otherwise) on the split's loader, on `devices=` devices of `accelerator=` at `precision=` (several devices score
every window once between them). Prints the results and writes them as JSON (`<run>/eval_<split>.json` by
default). For byte corpora the split's unigram entropy (bits per byte) is printed beside bpc as the no-context
reference.

Token models are scored in windows of `context=C` tokens whose last `score=S` targets count, every target of the
split exactly once (the first window scores all its C; `EvalWindows`): C may exceed the training length where the
model's positions allow it (`model.max_context`). Unset, C and S come from the run's `eval:` block (a recipe's
evaluation protocol, e.g. `enwik8_hourglass`), else C = `data.seq_len`, S = C - `data.eval_context`: the
training-time validation. `data=<group>` scores the checkpoint on another dataset of the same vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from hier_lm.checkpoint import load_weights, read_checkpoint
from hier_lm.config import CONFIG_PATH, exit_on_config_error, exit_on_user_error
from hier_lm.data.lm1b import tokenizer_from_checkpoint
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


def eval_windows(cfg: DictConfig, run: Mapping) -> tuple[int, int]:
    """(C, S) = (`context`, `score`) of the evaluation, each the command line's, else the run's `eval:` block's,
    else C = the run's `data.seq_len` and S = C - `eval_context` (the command line's, else the run's data's)."""
    run_eval = run.get("eval") or {}
    context = cfg.context if cfg.context is not None else run_eval.get("context") or run["data"]["seq_len"]
    if cfg.score is not None and cfg.eval_context is not None:
        raise ValueError("give score= or eval_context= (its older form: score = context - eval_context), not both")
    if cfg.score is not None:
        score = cfg.score
    elif cfg.eval_context is not None:
        score = context - cfg.eval_context
    else:
        score = run_eval.get("score") or context - run["data"].get("eval_context", 0)
    for key, value in (("context", context), ("score", score)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a whole number of tokens >= 1, got {value!r}")
    if score > context:
        raise ValueError(f"score={score} must be at most context={context}: each window scores its last `score` "
                         f"tokens after `context - score` tokens of context")
    return context, score


def eval_data(cfg: DictConfig, run: Mapping) -> tuple[dict, bool]:
    """The data config to evaluate on and whether it is another dataset than the run's: `data=<group>` (its
    `seed` the run's), else the run's own data (at `data_root=` when given)."""
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=False)  # its `${seed}` is the run's seed, set here
        return {**data, **({"seed": run["seed"]} if "seed" in data else {})}, True
    data = dict(run["data"])
    if cfg.data_root is not None:
        data["root"] = cfg.data_root
    return data, False


def check_vocabulary(datamodule, model: Mapping, run_data: Mapping, checkpoint: dict) -> None:
    """Another dataset must speak the model's vocabulary: the same size and kind of token (bytes, subwords,
    sub-pixels: the same metric) and, for subwords, the same tokenizer."""
    name, run_metric = getattr(datamodule, "name", type(datamodule).__name__), get_class(run_data["_target_"]).metric
    if datamodule.metric != run_metric or datamodule.vocab_size != model["vocab_size"]:
        raise ValueError(f"data={name} has a vocabulary of {datamodule.vocab_size:,} ({datamodule.metric}), this "
                         f"model's is {model['vocab_size']:,} ({run_metric}): evaluate it on data of its own "
                         f"vocabulary")
    ours = tokenizer_from_checkpoint(checkpoint)
    if ours is not None and hasattr(datamodule, "tokenizer"):
        datamodule.prepare_data()
        datamodule.setup("test")
        if datamodule.tokenizer.get_vocab() != ours.get_vocab():
            raise ValueError(f"data={name} is tokenised by another tokenizer than this model's: give its settings "
                             f"(data.vocab_size, data.tokenizer_sample, data.source) or data.tokenizer=<the run's>")


def check_context(model, context: int) -> None:
    """Refuse windows longer than `model` reads (`max_context`: learned positions end at `max_len`; None: any
    length); note windows longer than its training length `max_len`, where positions extrapolate."""
    limit = getattr(model, "max_context", model.max_len)
    if limit is not None and context > limit:
        raise ValueError(f"context={context} is longer than this model reads: its learned absolute positions end at "
                         f"{limit}; use context <= {limit}")
    if context > model.max_len and rank_zero_only.rank == 0:
        print(f"note: windows of {context:,} tokens, longer than the {model.max_len:,} the model was trained on: its "
              f"positions extrapolate (RoPE does so poorly; see docs/evaluation.md)", flush=True)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the checkpoint on a split; returns the results dict (rank 0 also writes it as JSON). Nothing is
    written when nothing was scored."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    file, checkpoint = read_checkpoint(cfg.ckpt, model_only=True)
    saved = checkpoint[CHECKPOINT_KEY]
    run = saved["config"]
    data_cfg, other_data = eval_data(cfg, run)
    results = {"checkpoint": str(file), "split": cfg.split}
    windows = hasattr(get_class(data_cfg["_target_"]), "set_eval_windows")  # token data
    if windows:
        context, score = eval_windows(cfg, run)
        run_batch = run["data"].get("eval_batch_size") or run["data"]["batch_size"]
        # By default as many tokens per batch as the run's evaluation batches.
        data_cfg["eval_batch_size"] = cfg.batch_size or max(1, run_batch * run["data"]["seq_len"] // context)
        results.update(context=context, score=score)
    elif cfg.context is not None or cfg.score is not None or cfg.eval_context is not None:
        raise ValueError("context=, score= and eval_context= are for token data; image models score whole images")
    elif cfg.batch_size is not None:
        data_cfg["eval_batch_size"] = cfg.batch_size
    datamodule = instantiate(data_cfg)
    if other_data:
        check_vocabulary(datamodule, saved["model"], run["data"], checkpoint)
    task = build_task({**run, "model": saved["model"]}, datamodule)
    load_weights(task, checkpoint["state_dict"], file)
    if windows:
        check_context(task.model, context)
        datamodule.set_eval_windows(context, score)
    trainer = instantiate(cfg.trainer, **({"accelerator": cfg.device} if cfg.device else {}))
    try:
        outputs = trainer.test(task, datamodule=SplitAsTest(datamodule, cfg.split), verbose=False)
    except MisconfigurationException as err:  # e.g. a fraction limit_batches= that leaves no batch
        raise ValueError(f"Lightning: {err}") from err
    out = Path(cfg.out) if cfg.out else file.parent.parent / f"eval_{cfg.split}.json"
    if not task.scored_tokens:
        raise ValueError(f"no token was scored (limit_batches={cfg.limit_batches}): evaluate at least one batch; "
                         f"{out} is left as it was")

    metric, metrics = datamodule.metric, outputs[0]
    results.update({"loss": metrics["test/loss"], metric: metrics[f"test/{metric}"], "tokens": task.scored_tokens})
    if hasattr(datamodule, "corpus"):
        results["unigram_entropy_bits"] = datamodule.corpus.unigram_entropy(cfg.split)
    if trainer.is_global_zero:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    results["out"] = str(out)
    return results


@exit_on_config_error
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
    if "accuracy" in r:  # classification: one target per example
        line += f", accuracy {r['accuracy']:.4f}"
    line += f" over {r['tokens']:,} " + ("examples" if "accuracy" in r else "tokens")
    if "context" in r and r["score"] < r["context"]:
        line += f" (windows of {r['context']:,}, the last {r['score']:,} scored)"
    if "unigram_entropy_bits" in r:
        line += f" (unigram entropy of the split: {r['unigram_entropy_bits']:.4f} bits/byte)"
    print(line)
    print(f"written: {r['out']}")


if __name__ == "__main__":
    main()
