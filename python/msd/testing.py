"""Stand-ins for a trained draft, shared by the tests and the end-to-end benchmark.

``random_draft`` gives an untrained draft head of the right shape; ``ControlledProposals``
replaces its proposals (through ``SpeculativeLLaVA(proposer=...)``) with the target's
own continuation, corrupted at a chosen rate, so that the acceptance length is set by hand
while the whole engine (draft forwards included) still runs.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import draft_config_for
from msd.draft_eagle3 import Eagle3DraftModel
from msd.draft_kinds import DraftModel
from msd.eagle3_checkpoint import eagle3_config_for


def random_draft(target: PreTrainedModel, seed: int = 0) -> MSDDraftModel:
    """An untrained MSD draft head of the target's width, sharing its embeddings and head
    (on the target's device, in its dtype)."""
    config = draft_config_for(target)
    torch.manual_seed(seed)
    embeddings = target.get_input_embeddings()
    with torch.device(embeddings.weight.device):  # a 7B-wide layer: initialise it where it will run
        draft = MSDDraftModel(config, embeddings, target.get_output_embeddings())
    return draft.to(embeddings.weight.dtype).eval()


def random_eagle3_draft(target: PreTrainedModel, draft_vocab_size: int | None = None,
                        feature_layers: tuple[int, ...] | None = None, seed: int = 0) -> Eagle3DraftModel:
    """An untrained EAGLE-3-style draft for ``target`` (its embeddings shared, on its device, in
    its dtype); with ``draft_vocab_size``, its vocabulary is that many random target ids (d2t)."""
    config = eagle3_config_for(target, draft_vocab_size, feature_layers)
    generator = torch.Generator().manual_seed(seed)
    embeddings = target.get_input_embeddings()
    torch.manual_seed(seed)
    with torch.device(embeddings.weight.device):
        draft = Eagle3DraftModel(config, embeddings)
    vocab, draft_vocab = config.vocab_size, config.draft_vocab_size
    kept = torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values
    draft.d2t.copy_(kept - torch.arange(draft_vocab))
    draft.t2d.zero_()
    draft.t2d[kept.to(draft.t2d.device)] = True
    return draft.to(embeddings.weight.dtype).eval()


class ControlledProposals:
    """A proposer (:mod:`msd.proposers`): propose the target's own greedy continuation
    ``reference`` (prompt + new tokens; one list per sequence of the batch, or one list for a
    batch of one), except that with probability ``corruption`` a node's true next token is
    removed from its proposals; other proposals are random. Each draft token is then accepted
    with probability ``1 - corruption`` given its parent was, which makes every acceptance
    length happen while exercising the whole engine (the draft head still runs)."""

    def __init__(self, reference: list[int] | list[list[int]], corruption: float, seed: int = 0):
        rows = [reference] if reference and isinstance(reference[0], int) else reference
        width = max(len(row) for row in rows)
        self.all_rows = torch.tensor([list(row) + [-1] * (width - len(row)) for row in rows])  # [B, N], -1 pad
        self.reference = self.all_rows  # the rows of the sequences the step runs on
        self.corruption = corruption
        self.generator = torch.Generator().manual_seed(seed)
        self.seconds = 0.0  # time spent planting proposals (the draft's own logits not included)

    def __call__(self, draft: DraftModel, hidden: torch.Tensor, paths: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor:
        logits = draft.compute_logits(hidden)
        _synchronize(logits.device)
        started = time.perf_counter()
        proposals = self._plant(logits, paths, start, draft.to_draft)
        _synchronize(logits.device)
        self.seconds += time.perf_counter() - started
        return proposals

    def select_rows(self, rows: list[int]) -> None:
        self.reference = self.all_rows[rows]

    def _plant(self, logits: torch.Tensor, paths: torch.Tensor, start: torch.Tensor, to_draft) -> torch.Tensor:
        batch, nodes, vocab = logits.shape
        device = logits.device
        reference = self.reference.to(device)
        length = paths.shape[2]  # root + the node's ancestors + the node
        index = start.unsqueeze(1) + torch.arange(length + 1, device=device)  # the path's places, then the next
        known = index < reference.shape[1]
        sequence = torch.where(known, reference.gather(1, index.clamp(max=reference.shape[1] - 1)), -1)
        true_next = to_draft(sequence[:, length].clamp(min=0))  # [B] the draft's id of the true next token
        true_next = torch.where(sequence[:, length] >= 0, true_next, -1)
        on_reference = (paths == sequence[:, None, :length]).all(-1) & ((true_next >= 0) & (true_next < vocab))[:, None]
        proposals = torch.randn(logits.shape, generator=self.generator).to(device)
        corrupt = (torch.rand(batch, nodes, generator=self.generator) < self.corruption).to(device)
        planted = torch.where(corrupt, -100.0, 100.0)
        column = true_next.clamp(0, vocab - 1).view(batch, 1, 1).expand(batch, nodes, 1)
        current = proposals.gather(2, column).squeeze(2)
        proposals.scatter_(2, column, torch.where(on_reference, planted, current).unsqueeze(2))
        return proposals.to(logits.dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
