"""The MSD draft's training step (MSD_SPEC.md 4): the draft it trains, its training forward,
the losses and the optimiser step.

The run loop (:mod:`msd.train.trainer`) sees a draft kind's step through the small
:class:`TrainingStep` interface: it hands over the draft inputs of one optimiser step's
micro-batches (:func:`msd.train.capture.draft_inputs`, this rank's) and gets the step's loss
sums back; checkpoints and evaluation read the step's ``draft``, ``model``, ``optimizer``
and ``scheduler``.

Loss normalisation: a step's gradient is that of ``sum of the per-token losses / tokens``
over ALL the step's answer tokens (every micro-batch of every rank), so a step does not
depend on how its samples were split into micro-batches or ranks (up to float rounding).
The feature noise of a micro-batch is seeded from ``(seed, step, micro-batch, rank)``, so a
resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import draft_config_for, load_draft
from msd.draft_eagle3 import Eagle3DraftModel
from msd.draft_kinds import DraftModel
from msd.eagle3_checkpoint import eagle3_config_for
from msd.train.config import TrainConfig, parse_feature_layers
from msd.train.distributed import Ranks, all_reduce, wrap
from msd.train.losses import LossTerms, feature_noise, msd_loss
from msd.train.optim import make_optimizer, make_schedule
from msd.train.ttt import ttt_loss
from msd.train.vocabulary import vocabulary_maps

logger = logging.getLogger(__name__)


@dataclass
class StepSums:
    """What one optimiser step reports: its answer tokens over all ranks, the learning rate it
    used, and THIS rank's token-weighted sums of the loss terms (to be summed over the ranks,
    then turned into the metrics by :meth:`TrainingStep.mean_terms`)."""

    tokens: float
    lr: float
    sums: dict[str, float]


class TrainingStep(Protocol):
    """A draft kind's training step, as the run loop, checkpoints and evaluation use it."""

    draft: nn.Module  # the bare draft: saved, evaluated, loaded on resume
    model: nn.Module  # the training forward the optimiser updates, wrapped by DDP / FSDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __call__(self, inputs: list[dict[str, torch.Tensor] | None], step: int) -> StepSums | None:
        """One optimiser step over ``inputs`` (one micro-batch each, None for an all-skipped
        one), ``step`` steps into the run; None when no rank had an answer token (no update)."""

    def mean_terms(self, sums: dict[str, float], tokens: float) -> dict[str, float]:
        """The metrics columns of :attr:`StepSums.sums` summed over the ranks."""


def training_draft(config: TrainConfig, target, lm_head: nn.Module, device: torch.device,
                   token_counts: Counter[int] | None = None) -> DraftModel:
    """The float32 draft to train on ``device``, in training mode: ``init_draft``'s weights, or
    a fresh draft of ``draft_kind`` and the target's width (random layers seeded by ``seed``, a
    frozen float32 copy of the target's embeddings; the target stays untouched). An MSD draft
    shares ``lm_head``; a fresh EAGLE-3-style one of ``draft_vocab_size`` ids keeps the most
    frequent of ``token_counts`` (the training data's answer tokens)."""
    if config.init_draft:
        draft = load_draft(config.init_draft, target, dtype=torch.float32, device="cpu")
        kind = "eagle3" if isinstance(draft, Eagle3DraftModel) else "msd"
        if kind != config.draft_kind:
            raise ValueError(f"init_draft {config.init_draft} is a {kind} draft, this run trains draft_kind="
                             f"{config.draft_kind}")
        if draft.decouple_visual != config.decouple_visual:
            raise ValueError(f"init_draft {config.init_draft} has decouple_visual={draft.decouple_visual}, "
                             f"this run asks for {config.decouple_visual}")
    else:
        weight = target.get_input_embeddings().weight.detach().to(torch.float32).clone()
        embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)
        torch.manual_seed(config.seed)
        if config.draft_kind == "eagle3":
            layers = parse_feature_layers(config.feature_layers)
            draft_config = eagle3_config_for(target, config.draft_vocab_size, layers,
                                             "decoupled" if config.decouple_visual else "token")
            draft = Eagle3DraftModel(draft_config, embed_tokens)
            if draft_config.draft_vocab_size < draft_config.vocab_size:
                d2t, t2d = vocabulary_maps(token_counts or Counter(), draft_config.draft_vocab_size,
                                           draft_config.vocab_size)
                draft.d2t.copy_(d2t)
                draft.t2d.copy_(t2d)
        else:
            draft = MSDDraftModel(draft_config_for(target), embed_tokens, decouple_visual=config.decouple_visual)
    if isinstance(draft, MSDDraftModel):
        draft.set_lm_head(lm_head)
    return draft.to(device).train()


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool real positions -> ``[B, 1, N, N]`` bool SDPA mask (True = attend):
    causal, and no query attends to padding. Every row keeps key 0, so none is all-masked."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class DraftTrainingForward(nn.Module):
    """Fuse inputs + draft layer as ONE module, so that DDP / FSDP see every trainable
    parameter used inside the forward they wrap."""

    def __init__(self, draft: MSDDraftModel, gradient_checkpointing: bool = False):
        super().__init__()
        self.draft = draft
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``draft_training_inputs`` tensors (features noised) -> draft hidden ``[B, N, H]``."""
        fused = self.draft.fuse_inputs(inputs["input_ids"], inputs["features"], inputs["visual_embeds"],
                                       inputs["visual_mask"])
        args = (fused, inputs["position_ids"], causal_padding_mask(inputs["attention_mask"]))
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self.draft, *args, use_reentrant=False)
        return self.draft(*args)


def _empty_inputs(hidden: int, features: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One position with an empty loss mask: what a rank runs for a micro-batch whose records
    were all skipped, so that every rank runs the same number of forward/backward passes."""
    zeros = torch.zeros(1, 1, hidden, device=device, dtype=dtype)
    index = torch.zeros(1, 1, dtype=torch.long, device=device)
    return {"input_ids": index, "visual_embeds": zeros, "visual_mask": index.bool(),
            "features": torch.zeros(1, 1, features, device=device, dtype=dtype), "target": zeros,
            "loss_mask": index, "attention_mask": ~index.bool(), "position_ids": index}


def _noise_generator(device: torch.device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The feature-noise stream of one micro-batch: a pure function of its place in the run,
    so resuming needs no generator state (hashes of int tuples are the same in every process)."""
    return torch.Generator(device).manual_seed(hash((seed, step, micro, rank)) & (2**63 - 1))


class Eagle3TrainingForward(nn.Module):
    """The EAGLE-3-style draft's training-time-test loss as ONE module (for DDP / FSDP): the
    draft unrolled ``steps`` times on its own predictions (:func:`msd.train.ttt.ttt_loss`),
    against the target's next-token distributions from its frozen ``target_head``."""

    def __init__(self, draft: Eagle3DraftModel, target_head: nn.Module, steps: int):
        super().__init__()
        self.draft, self.steps = draft, steps
        self._target_head = [target_head]  # frozen, not the draft's: kept out of the module tree

    def forward(self, inputs: dict[str, torch.Tensor]) -> LossTerms:
        return ttt_loss(self.draft, inputs, self._target_head[0], self.steps)


class MSDTrainingStep:
    """The MSD draft's :class:`TrainingStep`: noise on the input features, the draft with a
    causal, padding-masked attention (:class:`DraftTrainingForward`, wrapped for the ranks),
    :func:`msd_loss`, then AdamW with gradient clipping and the warm-up / decay schedule."""

    TERMS = ("vloss", "ploss", "accuracy")

    def __init__(self, draft: MSDDraftModel, config: TrainConfig, ranks: Ranks, dtype: torch.dtype,
                 total_steps: int):
        self.draft, self.config, self.ranks, self.dtype = draft, config, ranks, dtype
        self.training_forward = self._training_forward()
        self.model = wrap(self.training_forward, ranks, config.fsdp)
        self.optimizer = make_optimizer(self.model.parameters(), lr=config.lr)
        self.scheduler = make_schedule(self.optimizer, total_steps=total_steps,
                                       warmup_steps=min(config.warmup_steps, total_steps))

    def _training_forward(self) -> nn.Module:
        return DraftTrainingForward(self.draft, self.config.gradient_checkpointing)

    def _noise(self, x: dict[str, torch.Tensor], step: int, micro: int) -> None:
        """MSD's uniform noise on the input features (MSD_SPEC.md 4), in place."""
        if self.config.noise_scale:
            noise = _noise_generator(self.ranks.device, self.config.seed, step, micro, self.ranks.rank)
            x["features"] = feature_noise(x["features"], x["attention_mask"], noise, self.config.noise_scale)

    def _terms(self, x: dict[str, torch.Tensor]) -> LossTerms:
        return msd_loss(self.model(x), x["target"], self.draft.compute_logits, x["loss_mask"], self.config.v_weight,
                        self.config.p_weight)

    def autocast(self):
        """bf16 autocast when the target's features are bf16."""
        return torch.autocast(self.ranks.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def __call__(self, inputs: list[dict[str, torch.Tensor] | None], step: int) -> StepSums | None:
        """See :meth:`TrainingStep.__call__`."""
        config, ranks, device = self.config, self.ranks, self.ranks.device
        local_tokens = sum(float(x["loss_mask"].sum()) for x in inputs if x is not None)
        (tokens,) = all_reduce([local_tokens], ranks)
        if tokens == 0:
            logger.warning("step %d: no answer token in its records (all skipped?): no update", step + 1)
            return None
        sums = torch.zeros(len(self.TERMS), dtype=torch.float64)  # token-weighted, as TERMS
        for micro, x in enumerate(inputs):
            x = x or _empty_inputs(self.draft.config.hidden_size, self.draft.feature_size, device, self.dtype)
            self._noise(x, step, micro)
            # Gradients are all-reduced on the step's last micro-batch only.
            last = micro == len(inputs) - 1
            with nullcontext() if last or self.model is self.training_forward else self.model.no_sync():
                with self.autocast():
                    terms = self._terms(x)
                # Sum of this micro-batch's token losses over the step's tokens; x world undoes
                # DDP's gradient averaging over the ranks.
                (terms.loss * terms.tokens * (ranks.world / tokens)).backward()
            sums += torch.stack([terms.vloss, terms.ploss, terms.accuracy]).detach().double().cpu() * float(
                terms.tokens)
        if config.fsdp:
            self.model.clip_grad_norm_(config.grad_clip)
        else:
            nn.utils.clip_grad_norm_(self.draft.parameters(), config.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepSums(tokens, lr, dict(zip(self.TERMS, sums.tolist())))

    def mean_terms(self, sums: dict[str, float], tokens: float) -> dict[str, float]:
        """``loss``, ``vloss``, ``ploss`` and ``accuracy``: token means over the step."""
        vloss, ploss, accuracy = (sums[name] / tokens for name in self.TERMS)
        return {"loss": self.config.v_weight * vloss + self.config.p_weight * ploss, "vloss": vloss,
                "ploss": ploss, "accuracy": accuracy}


class Eagle3TrainingStep(MSDTrainingStep):
    """The EAGLE-3-style draft's :class:`TrainingStep`: the training-time-test loss
    (:class:`Eagle3TrainingForward`; ``ploss`` holds it, there is no feature regression) with
    the same optimiser, clipping and schedule; no feature noise (EAGLE-3's recipe: the
    unrolled steps feed the draft its own imperfect states instead)."""

    def __init__(self, draft: Eagle3DraftModel, target_head: nn.Module, config: TrainConfig, ranks: Ranks,
                 dtype: torch.dtype, total_steps: int):
        self.target_head = target_head
        super().__init__(draft, config, ranks, dtype, total_steps)

    def _training_forward(self) -> nn.Module:
        return Eagle3TrainingForward(self.draft, self.target_head, self.config.ttt_steps)

    def _noise(self, x: dict[str, torch.Tensor], step: int, micro: int) -> None:
        pass

    def _terms(self, x: dict[str, torch.Tensor]) -> LossTerms:
        return self.model(x)

    def mean_terms(self, sums: dict[str, float], tokens: float) -> dict[str, float]:
        """``loss`` = ``ploss`` (the decayed sum over the unrolled steps), ``vloss`` 0, ``accuracy``."""
        ploss, accuracy = sums["ploss"] / tokens, sums["accuracy"] / tokens
        return {"loss": ploss, "vloss": 0.0, "ploss": ploss, "accuracy": accuracy}


def training_step(draft: DraftModel, target_head: nn.Module, config: TrainConfig, ranks: Ranks, dtype: torch.dtype,
                  total_steps: int) -> MSDTrainingStep:
    """The :class:`TrainingStep` of ``draft``'s kind."""
    if isinstance(draft, Eagle3DraftModel):
        return Eagle3TrainingStep(draft, target_head, config, ranks, dtype, total_steps)
    return MSDTrainingStep(draft, config, ranks, dtype, total_steps)
