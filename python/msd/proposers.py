"""Proposers: what turns the draft head's hidden states into the logits a draft tree grows from.

The engine's drafter asks its proposer once per tree level. :class:`DraftProposer` is what
serves users: the draft head's own logits. Tests and the controlled benchmark inject others
(``msd.testing.ControlledProposals``) through ``SpeculativeLLaVA(proposer=...)``, so the hot
loop has no test branch. A proposer sees, besides the hidden states, the tree level's
root-to-node paths and where each sequence's tree starts, all device tensors.
"""

from __future__ import annotations

from typing import Protocol

import torch

from msd.draft_kinds import DraftModel


class Proposer(Protocol):
    """Logits ``[B, n, V]`` (V: the draft's vocabulary) of a tree level.

    Args:
        draft: the draft head.
        hidden: ``[B, n, H]`` the draft's outputs at the level's ``n`` nodes.
        paths: ``[B, n, d + 1]`` int64 the tokens from the root (the last emitted token) to
            each node, root first.
        start: ``[B]`` int64 the root's index in its sequence (its plain position).
    """

    def __call__(self, draft: DraftModel, hidden: torch.Tensor, paths: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor: ...

    def select_rows(self, rows: list[int]) -> None:
        """From now on row ``i`` of the step's batch is sequence ``rows[i]`` of the batch
        ``generate`` got (called when decoding starts, and when finished sequences leave)."""


class DraftProposer:
    """The draft head's own proposals: its logits over its vocabulary."""

    def __call__(self, draft: DraftModel, hidden: torch.Tensor, paths: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor:
        return draft.compute_logits(hidden)

    def select_rows(self, rows: list[int]) -> None:
        """The draft head needs no row map."""
