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


class LanguageModelTask(L.LightningModule):
    """Trains `build_model(model)` on batches `LongTensor[B, L + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`).

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

    def _eval_step(self, batch: torch.Tensor) -> None:
        self.eval_nll.update(next_token_loss(self.model, batch), weight=batch[:, 1:].numel())

    def _log_eval(self, stage: str) -> None:
        loss = self.eval_nll.compute().item()
        self.eval_nll.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/{self.metric}", metric_value(self.metric, loss), prog_bar=True)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"model": dict(self.hparams.model), "config": self.hparams.config}

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.trainer.max_steps, **self.hparams.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
