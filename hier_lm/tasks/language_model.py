"""The language-modelling LightningModule: next-token cross-entropy, bpc or perplexity, AdamW schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer

METRICS = ("bpc", "ppl")
CHECKPOINT_KEY = "hier_lm"  # every hier_lm checkpoint carries {"model": <model kwargs>, "config": <run config>}


def metric_value(metric: str, loss_nats: float) -> float:
    """Bits per token (`bpc`, for bytes) or perplexity (`ppl`, for subwords) of a mean NLL in nats."""
    if metric == "bpc":
        return loss_nats / math.log(2)
    if metric == "ppl":
        return math.exp(loss_nats)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `batch: LongTensor[B, L + 1]`, inputs `[:, :-1]`."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def scored_next_token_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy (nats) over the scored targets of an evaluation batch, and their count.

    `batch` is `LongTensor[B, L + 1]` (every target scored; the same value as `next_token_loss`), or the
    pair `(tokens: LongTensor[B, L + 1], n_context: LongTensor[B])` of evaluation with context: row `b`
    scores only its targets `tokens[b, 1 + n_context[b]:]`; the first `n_context[b]` targets are context.
    """
    if isinstance(batch, torch.Tensor):
        return next_token_loss(model, batch), batch[:, 1:].numel()
    tokens, n_context = batch
    logits = model(tokens[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    positions = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    scored = (positions[None, :] >= torch.as_tensor(n_context, device=tokens.device)[:, None]).flatten()
    count = int(scored.sum())
    return nll[scored].sum() / max(count, 1), count


class LanguageModelTask(L.LightningModule):
    """Trains `build_model(model)` on batches `LongTensor[B, L + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`).
    Evaluation batches may also be `(tokens, n_context)` pairs (see `scored_next_token_loss`).

    Logs `train/loss`, `val/loss` and `val/<metric>` (`test/...` in testing). `config` is the whole composed
    run config; it is stored in every checkpoint so that `hier_lm.load` can rebuild the model.
    """

    def __init__(self, model: Mapping, optim: Mapping, metric: str = "bpc", config: Mapping | None = None):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.save_hyperparameters()
        self.model = build_model(model)
        self.metric = metric
        self.eval_nll = MeanMetric()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = next_token_loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch) -> None:
        loss, count = scored_next_token_loss(self.model, batch)
        self.eval_nll.update(loss, weight=count)

    def _log_eval(self, stage: str) -> None:
        loss = self.eval_nll.compute().item()
        self.eval_nll.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/{self.metric}", metric_value(self.metric, loss), prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"model": dict(self.hparams.model), "config": self.hparams.config}

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.trainer.max_steps, **self.hparams.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
