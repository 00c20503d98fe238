"""The stage-2 curriculum: multimodal samples are introduced gradually (MSD_SPEC.md 4).

Epochs are numbered ``1..E`` as in the spec (unlike ``DistributedSampler``'s 0-based ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def multimodal_probability(epoch: int, total_epochs: int) -> float:
    """``r(e)``: the probability of drawing a multimodal sample in epoch ``e`` of ``E``.

    ``0`` for ``e <= E/2``, ``(e - E/2) / (E/2)`` for ``E/2 < e < E`` and ``1`` at ``e = E``.
    """
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in [1, {total_epochs}] (1-based), got {epoch}")
    if epoch == total_epochs:
        return 1.0
    return max(0.0, (2 * epoch - total_epochs) / total_epochs)  # (e - E/2) / (E/2), exact for odd E


class CurriculumSampler(Sampler[int]):
    """Indices into ``ConcatDataset([text, multimodal])`` (text first) for one epoch.

    Each slot of the epoch is a multimodal sample with probability ``r(epoch)``, else a
    text sample. Within a kind, samples come from successive random permutations of it,
    so none repeats before all of that kind have been drawn.

    Epoch length: ``samples_per_epoch`` slots over all ranks (default
    ``text_size + multimodal_size``, i.e. as many draws as the two data sets hold together,
    whatever the mix). Like ``DistributedSampler``, rank ``rank`` of ``num_replicas`` takes
    slots ``rank, rank + R, ...`` of one global stream of ``ceil(samples_per_epoch / R) * R``
    slots: every rank gets the same number of slots and no slot goes to two ranks. The
    stream depends only on ``(seed, epoch)``.

    ``probability`` replaces ``r(epoch)`` by a fixed value for every epoch: 0 to train on the
    text data only, 1 on the multimodal data only (a stage without the other kind of data).

    Resuming: ``state_dict(consumed)`` records how many indices this rank has trained on in
    the current epoch; after ``load_state_dict`` the next iteration starts right after them.
    """

    def __init__(self, text_size: int, multimodal_size: int, epoch: int, total_epochs: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, samples_per_epoch: int | None = None,
                 probability: float | None = None):
        if text_size < 0 or multimodal_size < 0 or text_size + multimodal_size == 0:
            raise ValueError(f"data set sizes must be >= 0 and not both 0, got {text_size}, {multimodal_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.text_size, self.multimodal_size = text_size, multimodal_size
        self.samples_per_epoch = samples_per_epoch or text_size + multimodal_size
        self.total_epochs, self.seed = total_epochs, seed
        self.fixed_probability = probability
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(self.samples_per_epoch / num_replicas)  # per rank
        self._start = 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the curriculum epoch (1-based) of the next iteration, from its start."""
        probability = multimodal_probability(epoch, self.total_epochs)
        if self.fixed_probability is not None:
            probability = self.fixed_probability
        if probability > 0 and self.multimodal_size == 0:
            raise ValueError(f"epoch {epoch} draws multimodal samples (r = {probability}) but there are none")
        if probability < 1 and self.text_size == 0:
            raise ValueError(f"epoch {epoch} draws text samples (r = {probability}) but there are none")
        self.epoch, self.probability, self._start = epoch, probability, 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        indices = self._global_stream()[self.rank::self.num_replicas]
        return iter(indices[self._start:].tolist())

    def _global_stream(self) -> torch.Tensor:
        """``[num_samples * num_replicas]`` dataset indices of this epoch, all ranks."""
        slots = self.num_samples * self.num_replicas
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        multimodal = torch.rand(slots, generator=generator) < self.probability
        stream = torch.empty(slots, dtype=torch.long)
        num_multimodal = int(multimodal.sum())
        stream[~multimodal] = _permutations(self.text_size, slots - num_multimodal, generator)
        stream[multimodal] = self.text_size + _permutations(self.multimodal_size, num_multimodal, generator)
        return stream

    def state_dict(self, consumed: int) -> dict:
        """The position after ``consumed`` indices of the current epoch on this rank. Only
        the training loop knows ``consumed``: a DataLoader iterates the sampler ahead."""
        if not 0 <= self._start + consumed <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples - self._start}], got {consumed}")
        return {"seed": self.seed, "epoch": self.epoch, "total_epochs": self.total_epochs,
                "samples_per_epoch": self.samples_per_epoch, "num_replicas": self.num_replicas,
                "start": self._start + consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where :meth:`state_dict` was taken (same data sizes and ranks)."""
        for key in ("seed", "total_epochs", "samples_per_epoch", "num_replicas"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
        self.set_epoch(state["epoch"])
        self._start = state["start"]


def _permutations(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices in ``[0, size)``: successive random permutations, concatenated."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    rounds = math.ceil(count / size)
    return torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:count]
