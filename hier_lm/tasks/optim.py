"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

SCHEDULES = ("cosine", "rsqrt", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weights of linear layers; never biases, norms or embeddings."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    # tied weights appear under several modules: keep each parameter once, decayed if any use decays it
    decay_ids = {id(p) for p in decay}
    decay = list({id(p): p for p in decay}.values())
    no_decay = [p for p in {id(p): p for p in no_decay}.values() if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float,
              cycle_steps: int | None = None) -> float:
    """Multiplier of the peak LR at `step`: linear warm-up, then cosine to `min_lr_ratio`, rsqrt, or constant.

    The cosine's half period is `cycle_steps` (default: the steps after warm-up); a longer one truncates it,
    as the Hourglass enwik8 run does (a 350k-step cycle stopped at 263k steps)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "rsqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    progress = min(1.0, (step - warmup_steps) / max(1, cycle_steps or total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    total_steps: int,
    lr: float = 3e-4,
    betas: Sequence[float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    warmup_steps: int = 100,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    cycle_steps: int | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a per-step LambdaLR schedule over `total_steps` optimizer steps."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_lr_ratio, cycle_steps)
    )
    return optimizer, scheduler
