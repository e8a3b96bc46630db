"""The sequence-classification LightningModule (Long Range Arena): a bidirectional encoder, the mean of its
final states over the real tokens, an MLP head; cross-entropy and accuracy per split (torchmetrics).

Batches are dicts (`hier_lm.data.lra`): `tokens: LongTensor[B, L]`, `lengths: LongTensor[B]` (real tokens of
each right-padded row), `labels: LongTensor[B]`. The pair task (Retrieval) has `tokens [B, 2, L]` and `lengths
[B, 2]`: both sequences go through the same encoder, and the head reads the benchmark's dual-encoder features
`[u, v, u * v, u - v]` of the two pooled encodings `u, v`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from hier_lm.models import MODELS, build_model
from hier_lm.models.layers import mean_pool
from hier_lm.tasks.language_model import CHECKPOINT_KEY, TokenCount
from hier_lm.tasks.optim import build_optimizer

ENCODERS = tuple(name for name, cls in MODELS.items()
                 if "causal" in {field.name for field in dataclasses.fields(cls.config_class)})


def encoder_config(model: Mapping) -> dict:
    """`model` (the `model` config group) as a bidirectional encoder: `causal=False`; a family without that
    option, or a `num_classes` set on the model, is a one-line error."""
    if model.get("name") not in ENCODERS:
        raise ValueError(f"classification needs a bidirectional encoder: model={' | '.join(ENCODERS)}, got "
                         f"model={model.get('name')}")
    if model.get("num_classes") is not None:
        raise ValueError("model.num_classes must stay null for the classification task: its head and the number of "
                         "classes come from the data")
    return {**model, "causal": False}


def classifier_head(d_in: int, mlp_dim: int, num_classes: int, pairs: bool) -> nn.Sequential:
    """The benchmark's heads: `Linear(d_in, mlp_dim) -> ReLU -> Linear(mlp_dim, num_classes)`; for pairs
    (`d_in` = 4 d) a second hidden layer of `mlp_dim // 2`."""
    if not pairs:
        return nn.Sequential(nn.Linear(d_in, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))
    return nn.Sequential(nn.Linear(d_in, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, mlp_dim // 2), nn.ReLU(),
                         nn.Linear(mlp_dim // 2, num_classes))


class ClassificationTask(L.LightningModule):
    """Trains `build_model(model)` (made bidirectional: `causal=False`) with a classifier head on batches of
    right-padded sequences (see the module docstring). `pairs`: two sequences per example (dual encoder).
    `mlp_dim`: the head's hidden width (None: `d_model`). The family's token head is not used: it is frozen
    (no gradient, not optimised), so that every trained parameter gets a gradient (DDP needs it).

    Logs `train/loss`, `train/accuracy` (per optimizer step), `val/loss`, `val/accuracy` (`test/...` in
    testing); `scored_tokens` is the number of examples the latest validation or test scored, all ranks.
    """

    metric = "accuracy"

    def __init__(self, model: Mapping, optim: Mapping, num_classes: int, pairs: bool = False,
                 mlp_dim: int | None = None, config: Mapping | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = encoder_config(model)
        self.model = build_model(self.model_config)
        self.model.head.requires_grad_(False)
        d_model = self.model.config.d_model
        self.head = classifier_head(4 * d_model if pairs else d_model, mlp_dim or d_model, num_classes, pairs)
        self.pairs = pairs
        self.accuracy = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro")
                                       for stage in ("fit", "val", "test")})
        self.eval_loss = MeanMetric()
        self.eval_count = TokenCount()
        self.scored_tokens: int | None = None  # examples scored by the latest validation or test, all ranks
        self.last_input_shape: tuple[int, int] | None = None  # (B, L) of the latest training encoder input

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The mean final state over the real tokens: `[B, L]` -> `[B, d]`; pairs `[B, 2, L]` -> `[B, 4 d]`
        (`[u, v, u * v, u - v]`)."""
        length = int(lengths.max())  # drop the padding that every row has
        if not self.pairs:
            tokens = tokens[..., :length]
            return mean_pool(self.model.encode(tokens, lengths=lengths), lengths)
        both, both_lengths = tokens[..., :length].flatten(0, 1), lengths.flatten()  # [2B, L]: one encoder pass
        u, v = mean_pool(self.model.encode(both, lengths=both_lengths), both_lengths).unflatten(0, (-1, 2)).unbind(1)
        return torch.cat((u, v, u * v, u - v), dim=-1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits `[B, num_classes]`."""
        return self.head(self.features(tokens, lengths))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = batch["tokens"]
        self.last_input_shape = (tokens.shape[:-1].numel(), int(batch["lengths"].max()))
        logits = self(tokens, batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.accuracy["fit"].update(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/accuracy", self.accuracy["fit"].compute(), prog_bar=True, sync_dist=True)
        self.accuracy["fit"].reset()

    def _eval_step(self, batch, stage: str) -> None:
        # Under data parallelism, the pair (batch, n_context) of an `EvalShard`: n_context = 1 is padding.
        batch, n_context = (batch, None) if isinstance(batch, Mapping) else batch
        keep = slice(None) if n_context is None else n_context == 0
        logits = self(batch["tokens"], batch["lengths"])[keep]
        labels = batch["labels"][keep]
        if len(labels):
            self.eval_loss.update(F.cross_entropy(logits.float(), labels), weight=len(labels))
            self.accuracy[stage].update(logits, labels)
        self.eval_count.update(len(labels))

    def _log_eval(self, stage: str) -> None:
        self.scored_tokens = int(self.eval_count.compute())
        self.log(f"{stage}/loss", self.eval_loss.compute(), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/accuracy", self.accuracy[stage].compute(), prog_bar=True, sync_dist=True)
        for metric in (self.eval_loss, self.eval_count, self.accuracy[stage]):
            metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"model": dict(self.model_config), "config": self.hparams.config,
                                      "classifier": {"num_classes": self.hparams.num_classes,
                                                     "pairs": self.pairs, "mlp_dim": self.hparams.mlp_dim}}

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self, self.trainer.max_steps, **self.hparams.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
