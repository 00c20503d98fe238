"""Stand-ins for a trained draft, shared by the tests and the end-to-end benchmark.

``random_draft`` gives an untrained draft head of the right shape; ``ControlledProposals``
replaces its proposals (through ``SpeculativeLLaVA(proposal_hook=...)``) with the target's
own continuation, corrupted at a chosen rate, so that the acceptance length is set by hand
while the whole engine (draft forwards included) still runs.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import draft_config_for


def random_draft(target: PreTrainedModel, seed: int = 0) -> MSDDraftModel:
    """An untrained MSD draft head of the target's width, sharing its embeddings and head
    (on the target's device, in its dtype)."""
    config = draft_config_for(target)
    torch.manual_seed(seed)
    embeddings = target.get_input_embeddings()
    with torch.device(embeddings.weight.device):  # a 7B-wide layer: initialise it where it will run
        draft = MSDDraftModel(config, embeddings, target.get_output_embeddings())
    return draft.to(embeddings.weight.dtype).eval()


class ControlledProposals:
    """Proposal hook: propose the target's own greedy continuation ``reference`` (prompt +
    new tokens), except that with probability ``corruption`` a node's true next token is
    removed from its proposals; other proposals are random. Each draft token is then
    accepted with probability ``1 - corruption`` given its parent was, which makes every
    acceptance length happen while exercising the whole engine."""

    def __init__(self, reference: list[int], corruption: float, seed: int = 0):
        self.reference, self.corruption = reference, corruption
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, emitted: torch.Tensor, paths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        proposals = torch.randn(logits.shape, generator=self.generator)
        # One device-to-host copy each, rather than one per node.
        emitted_rows, path_rows = emitted.tolist(), paths[:, :, 1:].tolist()
        for b, (prefix, node_paths) in enumerate(zip(emitted_rows, path_rows)):
            for node, path in enumerate(node_paths):
                sequence = prefix + path
                if len(sequence) >= len(self.reference) or self.reference[: len(sequence)] != sequence:
                    continue
                corrupt = torch.rand((), generator=self.generator) < self.corruption
                proposals[b, node, self.reference[len(sequence)]] = -100.0 if corrupt else 100.0
        return proposals.to(logits)
