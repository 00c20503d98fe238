"""Training losses and input-feature noise of the MSD draft (MSD_SPEC.md 4).

Shapes follow the draft's shifted sequence (see ``msd.train.target_features``): draft
position ``t`` reads ``(f_t, x_{t+1})`` and its output ``h_hat_t`` is trained towards the
target feature ``f_{t+1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

V_WEIGHT = 1.0  # weight of the feature regression loss
P_WEIGHT = 0.1  # weight of the token distribution loss
NOISE_SCALE = 0.2


class LossTerms(NamedTuple):
    """Scalar tensors of one batch. ``loss`` carries the gradient; ``tokens`` = sum of the
    loss mask (the weight to use when averaging the other terms across batches)."""

    vloss: torch.Tensor
    ploss: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    tokens: torch.Tensor


def feature_noise(
    features: torch.Tensor,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scale: float = NOISE_SCALE,
) -> torch.Tensor:
    """``features`` plus uniform noise ``(U(0,1) - 0.5) * scale * 512 / N``.

    Args:
        features: ``[B, N_max, H]`` the draft's input target features ``f_t``.
        mask: ``[B, N_max]`` bool/0-1, the sample's real (non-padding) positions; None means
            all. N is each sample's own real length ``mask[b].sum()``, so that a sample's
            noise does not depend on what it is batched with (the released code divides by
            the padded batch length). Padding positions get no noise.
        generator: the random stream (None: torch's default one).
        scale: ``0.2`` in the spec.

    Returns:
        ``[B, N_max, H]`` in ``features.dtype``; the input is not modified.
    """
    batch, length = features.shape[:2]
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=features.device)
    lengths = mask.sum(1).clamp(min=1).to(torch.float32)  # [B]
    amplitude = (scale * 512.0 / lengths).view(batch, 1, 1) * mask.unsqueeze(-1).to(torch.float32)
    uniform = torch.rand(features.shape, generator=generator, dtype=torch.float32, device=features.device)
    return (features.to(torch.float32) + (uniform - 0.5) * amplitude).to(features.dtype)


def top1_accuracy(draft_logits: torch.Tensor, target_logits: torch.Tensor,
                  loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of (masked) positions where the draft's argmax equals the target's.

    Args:
        draft_logits, target_logits: ``[..., V]``.
        loss_mask: ``[...]`` bool/0-1, or None for all positions.

    Returns:
        A float32 scalar; 0 when the mask is empty.
    """
    agree = (draft_logits.argmax(-1) == target_logits.argmax(-1)).to(torch.float32)
    if loss_mask is None:
        loss_mask = torch.ones_like(agree)
    weights = loss_mask.to(torch.float32)
    return (agree * weights).sum() / weights.sum().clamp(min=1)


def msd_loss(
    draft_hidden: torch.Tensor,
    target_hidden_next: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    loss_mask: torch.Tensor,
    v_weight: float = V_WEIGHT,
    p_weight: float = P_WEIGHT,
) -> LossTerms:
    """The MSD / EAGLE draft loss ``v_weight * vloss + p_weight * ploss``.

    With m = loss_mask, h_hat = draft output, f = target feature, W = lm_head::

        vloss = sum_t m_t * mean_d SmoothL1(h_hat_t, f_{t+1})_d / sum_t m_t
        ploss = -sum_t m_t * sum_v softmax(W f_{t+1})_v * log_softmax(W h_hat_t)_v / sum_t m_t

    Args:
        draft_hidden: ``[B, N, H]`` ``h_hat_t``.
        target_hidden_next: ``[B, N, H]`` ``f_{t+1}`` (no gradient flows into it).
        lm_head: maps hidden states ``[M, H]`` to logits ``[M, V]`` (the target's frozen
            head, e.g. ``draft.compute_logits``).
        loss_mask: ``[B, N]`` 0/1 (bool or float); only the positions with ``m_t != 0``
            go through ``lm_head``, which saves the ``[B, N, V]`` logits of the others.

    Returns:
        :class:`LossTerms`; all zeros (still differentiable) when ``sum m = 0``.
    """
    if draft_hidden.shape != target_hidden_next.shape or draft_hidden.shape[:2] != loss_mask.shape:
        raise ValueError(f"shape mismatch: draft_hidden {tuple(draft_hidden.shape)}, target_hidden_next "
                         f"{tuple(target_hidden_next.shape)}, loss_mask {tuple(loss_mask.shape)}")
    selected = loss_mask != 0
    weights = loss_mask[selected].to(torch.float32)  # [M]
    tokens = weights.sum()
    denominator = tokens.clamp(min=1)  # 0/1 masks: exact, and an empty mask gives 0 / 1
    predicted = draft_hidden[selected]  # [M, H]
    target = target_hidden_next[selected].detach()

    regression = F.smooth_l1_loss(predicted.to(torch.float32), target.to(torch.float32), reduction="none")
    vloss = (weights * regression.mean(-1)).sum() / denominator

    draft_logits = lm_head(predicted)  # [M, V]
    with torch.no_grad():
        target_logits = lm_head(target)
        target_probs = torch.softmax(target_logits.to(torch.float32), -1)
    cross_entropy = -(target_probs * torch.log_softmax(draft_logits.to(torch.float32), -1)).sum(-1)  # [M]
    ploss = (weights * cross_entropy).sum() / denominator

    accuracy = top1_accuracy(draft_logits.detach(), target_logits, weights)
    return LossTerms(vloss, ploss, v_weight * vloss + p_weight * ploss, accuracy, tokens)
