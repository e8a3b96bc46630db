"""The language-modelling LightningModule: next-token cross-entropy, bpc, bpd or perplexity, AdamW schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric

from hier_lm.models import build_model
from hier_lm.tasks.optim import build_optimizer

METRICS = ("bpc", "bpd", "ppl")
CHECKPOINT_KEY = "hier_lm"  # every hier_lm checkpoint carries {"model": <model kwargs>, "config": <run config>}


def metric_value(metric: str, loss_nats: float) -> float:
    """Bits per token (`bpc` for bytes, `bpd` for sub-pixels) or perplexity (`ppl`, for subwords) of a mean
    NLL in nats."""
    if metric in ("bpc", "bpd"):
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


def block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The residual block types of `model`, as its class declares them (`Transformer.block_types == (Block,)`):
    the units of FSDP sharding and of activation checkpointing."""
    return type(model).block_types


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks (`block_types`) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, block_types(model))]


def checkpoint_activations(model: nn.Module) -> None:
    """Wrap every block of `model` in a non-reentrant activation checkpoint: its activations are recomputed in
    the backward pass instead of stored. Only the training forward is affected: without autograd (evaluation,
    cached decoding) a wrapped block runs once, as before; the RNG state is replayed for the recomputation, so
    dropout draws the same masks; the state dict keys are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as ac

    wrapper = partial(ac.checkpoint_wrapper, checkpoint_impl=ac.CheckpointImpl.NO_REENTRANT)
    blocks = block_types(model)
    ac.apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, blocks))


def shard_model(model: nn.Module, mesh) -> None:
    """FSDP2: `fully_shard` each block of `model` (its activation-checkpoint wrapper when it has one) over the
    1-D device `mesh`, then the root, which keeps the rest: embeddings, head, resampling layers, and any block
    one of whose parameters is also reachable from outside it (Hourglass's relative biases are shared by all
    its blocks; a parameter can belong to one shard group only). A block's parameters are all-gathered just
    before it runs and freed after, in the forward and again in the backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import fully_shard

    scalars = [name.replace("_checkpoint_wrapped_module.", "") for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"trainer=fsdp: FSDP2 cannot shard 0-dim parameters ({', '.join(scalars[:3])}): give them "
                         "shape [1] in the model, or use trainer=ddp")
    reached: dict[int, set[int | None]] = {}  # parameter id -> the blocks it is reached through (None: none)
    blocks = block_types(model)

    def visit(module: nn.Module, block: int | None) -> None:
        block = id(module) if isinstance(module, blocks) else block
        for p in module.parameters(recurse=False):
            reached.setdefault(id(p), set()).add(block)
        for child in module.children():
            visit(child, block)

    visit(model, None)
    wrappers = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    for block in model_blocks(model):
        if all(reached[id(p)] == {id(block)} for p in block.parameters()):
            fully_shard(wrappers.get(id(block), block), mesh=mesh)
    fully_shard(model, mesh=mesh)


class TokenCount(Metric):
    """The number of scored targets: an int64 sum over the updates (and, in `compute`, the ranks), exact at any
    size (a float metric state is not, beyond 2**24)."""

    def __init__(self):
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, count: int) -> None:
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.count


class LanguageModelTask(L.LightningModule):
    """Trains `build_model(model)` on batches `LongTensor[B, L + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`).
    Evaluation batches may also be `(tokens, n_context)` pairs (see `scored_next_token_loss`).

    Logs `train/loss` (the mean over the optimizer step's micro-batches and ranks), `val/loss` and
    `val/<metric>` (`test/...` in testing); `scored_tokens` is the exact number of targets the latest validation
    or test scored, all ranks together. `config` is the whole composed run config; it is stored in every
    checkpoint so that `hier_lm.load` can rebuild the model.

    Scale-out (`configure_model`, applied once the strategy is set up): `model.activation_checkpointing=true`
    (popped from `model`, never passed to the model) checkpoints every block; under FSDP2 (`trainer=fsdp`)
    every block and the root are sharded; `config["compile"]` (true for inductor, or a backend name such as
    `aot_eager`) compiles the training forward with `torch.compile` (evaluation and sampling keep the eager
    module; where compiling fails, one message and eager training).
    """

    def __init__(self, model: Mapping, optim: Mapping, metric: str = "bpc", config: Mapping | None = None):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.save_hyperparameters()
        self.model_config = dict(model)  # the model's constructor kwargs, saved in checkpoints
        self.activation_checkpointing = bool(self.model_config.pop("activation_checkpointing", False))
        self.compile_setting = (config or {}).get("compile", False)  # false | true (inductor) | a backend name
        self.model = build_model(self.model_config)
        self.metric = metric
        self.eval_nll = MeanMetric()
        self.eval_tokens = TokenCount()
        self.scored_tokens: int | None = None  # targets scored by the latest validation or test, all ranks
        self.last_input_shape: tuple[int, int] | None = None  # (B, L) of the latest training micro-batch
        self._compiled: tuple[nn.Module, ...] = ()  # a tuple, so that it is not registered as a submodule
        self._compile_works, self._configured = False, False
        self._loss_sum, self._loss_count = 0.0, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def configure_model(self) -> None:
        """Activation checkpointing, FSDP2 sharding (when the strategy gives a device mesh) and compilation,
        in that order; idempotent (Lightning calls it again for each `validate`/`test` after `fit`)."""
        if self._configured:
            return
        self._configured = True
        if self.activation_checkpointing:
            checkpoint_activations(self.model)
        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh["data_parallel"])
        if self.compile_setting:
            backend = "inductor" if self.compile_setting is True else self.compile_setting
            if backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ValueError(f"compile={backend!r} is not a torch.compile backend: use true (inductor), false or "
                                 f"one of {', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
            self._compiled = (torch.compile(self.model, backend=backend),)

    def _training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._compiled:
            return next_token_loss(self.model, batch)
        if self._compile_works:
            return next_token_loss(self._compiled[0], batch)
        setting = "true" if self.compile_setting is True else self.compile_setting
        try:  # the first call compiles
            loss = next_token_loss(self._compiled[0], batch)
        except Exception as err:  # no C++ compiler, an op or a Python construct Dynamo cannot trace, ...
            reason = (str(err).strip().splitlines() or [""])[0][:300]
            self._say(f"compile={setting}: torch.compile does not work here ({type(err).__name__}: {reason}); "
                      f"training eagerly")
            self._compiled = ()
            return next_token_loss(self.model, batch)
        self._say(f"compile={setting}: the training forward runs compiled (torch.compile)")
        self._compile_works = True
        return loss

    def _say(self, message: str) -> None:
        if self.global_rank == 0:
            print(message, flush=True)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.last_input_shape = (batch.shape[0], batch.shape[1] - 1)
        loss = self._training_loss(batch)
        self._loss_sum, self._loss_count = self._loss_sum + loss.detach(), self._loss_count + 1
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # One value per optimizer step: the mean loss of its micro-batches (gradient accumulation) and of its
        # ranks (every rank trains on as many windows), i.e. the loss of the global batch.
        if self._loss_count:
            self.log("train/loss", self._loss_sum / self._loss_count, prog_bar=True, sync_dist=True)
        self._loss_sum, self._loss_count = 0.0, 0

    def _eval_step(self, batch) -> None:
        loss, count = scored_next_token_loss(self.model, batch)
        self.eval_nll.update(loss, weight=count)
        self.eval_tokens.update(count)

    def _log_eval(self, stage: str) -> None:
        loss = self.eval_nll.compute().item()
        self.scored_tokens = int(self.eval_tokens.compute())
        self.eval_nll.reset()
        self.eval_tokens.reset()
        # `compute()` syncs the weighted mean and the count across ranks, so every rank has the global values;
        # sync_dist=True averages identical values (and keeps Lightning from warning that it is not synced).
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/{self.metric}", metric_value(self.metric, loss), prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"model": dict(self.model_config), "config": self.hparams.config}

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.trainer.max_steps, **self.hparams.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
