"""Checkpoints of a training run: writing them atomically, the ``last`` marker, and resuming.

A checkpoint is ``output_dir/<name>/`` (``step-XXXXXX`` or ``epoch-XX``; rank 0 writes it): a
released-layout draft (:func:`msd.draft_checkpoint.save_draft`) plus ``trainer_state.pt``
(step, epoch, sampler position, optimiser, schedule, random number states, settings). It is
written to a temporary folder then renamed, and only then named in the ``output_dir/last``
file, so a crash never leaves a half checkpoint behind ``last``. With the feature noise
seeded from the step's place in the run, the saved states make a resumed run repeat an
uninterrupted one exactly (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from msd import eagle3_checkpoint
from msd.draft_checkpoint import check_keys, read_state_dict, save_draft
from msd.draft_eagle3 import Eagle3DraftModel
from msd.draft_kinds import DraftModel
from msd.train.config import TrainConfig
from msd.train.curriculum import CurriculumSampler
from msd.train.distributed import (
    Ranks,
    full_optimizer_state,
    gathered_weights,
    optimizer_state_to_load,
    writable_weights,
)
from msd.train.step import TrainingStep

STATE_FILE = "trainer_state.pt"
LAST_FILE = "last"  # names the newest complete checkpoint folder
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("epochs", "batch_size", "grad_accum", "samples_per_epoch", "seed")


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``output_dir/last`` names, or None before the first one."""
    pointer = Path(output_dir) / LAST_FILE
    return Path(output_dir) / pointer.read_text().strip() if pointer.is_file() else None


def rng_states(device: torch.device) -> dict:
    """The global random number states (torch, Python, NumPy, and ``device``'s on CUDA)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _write_checkpoint(output_dir: Path, name: str, draft: DraftModel, state: dict) -> Path:
    """Write ``output_dir/name`` atomically (temporary folder, rename), then point ``last`` at it."""
    final, temporary = output_dir / name, output_dir / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    save_draft(draft, temporary)
    torch.save(state, temporary / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    pointer = output_dir / f".{LAST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, output_dir / LAST_FILE)
    return final


class Checkpoints:
    """Saves and restores one rank's training state: the step's draft, optimiser and
    schedule, the curriculum sampler's position and the random number states."""

    def __init__(self, output_dir: Path, config: TrainConfig, ranks: Ranks, training_step: TrainingStep,
                 sampler: CurriculumSampler):
        self.output_dir, self.config, self.ranks = output_dir, config, ranks
        self.training_step, self.sampler = training_step, sampler

    def save(self, name: str, step: int, epoch: int, consumed: int) -> Path:
        """Write checkpoint ``name`` after ``step`` steps, in ``epoch``, ``consumed`` sampler
        indices into its rest (collective under FSDP: every rank calls it)."""
        trainee, fsdp = self.training_step, self.config.fsdp
        optimizer_state = full_optimizer_state(trainee.model, trainee.optimizer, fsdp)
        with gathered_weights(trainee.model, fsdp):
            if self.ranks.main:
                state = {"step": step, "epoch": epoch, "sampler": self.sampler.state_dict(consumed),
                         "optimizer": optimizer_state or trainee.optimizer.state_dict(),
                         "scheduler": trainee.scheduler.state_dict(), "rng": rng_states(self.ranks.device),
                         "config": dataclasses.asdict(self.config)}
                _write_checkpoint(self.output_dir, name, trainee.draft, state)
        return self.output_dir / name

    def restore_last(self) -> tuple[Path, dict]:
        """Load the checkpoint ``last`` names into the draft, optimiser, schedule, sampler and
        random number states (collective under FSDP); returns its folder and saved state."""
        folder = last_checkpoint(self.output_dir)
        if folder is None:
            raise FileNotFoundError(f"resume: {self.output_dir} has no checkpoint ({LAST_FILE} is missing)")
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        for key in RESUME_KEYS:
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"resume: the checkpoint was trained with {key}={state['config'][key]}, "
                                 f"this run has {getattr(self.config, key)}")
        trainee, fsdp = self.training_step, self.config.fsdp
        weights = read_state_dict(folder)
        if isinstance(trainee.draft, Eagle3DraftModel):
            weights = eagle3_checkpoint.check_state(weights, trainee.draft.config)
        else:
            weights = check_keys(weights, trainee.draft.config.qkv_bias)
        with writable_weights(trainee.model, fsdp):
            trainee.draft.load_state_dict(weights, strict=False)
        trainee.optimizer.load_state_dict(
            optimizer_state_to_load(trainee.model, trainee.optimizer, state["optimizer"], fsdp))
        trainee.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_states(state["rng"], self.ranks.device)
        return folder, state
