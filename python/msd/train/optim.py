"""Optimiser and learning-rate schedule of draft training (MSD_SPEC.md 4)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

GRAD_CLIP = 0.5  # max global gradient norm (torch.nn.utils.clip_grad_norm_)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float = 5e-5, betas: tuple[float, float] = (0.9, 0.95),
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the parameters that require a gradient (the draft's frozen token
    embedding is skipped)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires a gradient")
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 2000) -> LambdaLR:
    """Linear warm-up from 0 to the optimiser's lr over ``warmup_steps``, then linear decay
    to 0 at ``total_steps`` (call ``step()`` after each optimiser step)."""
    if not 0 <= warmup_steps <= total_steps or total_steps < 1:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
