"""Growing the EAGLE-2 dynamic draft tree with the MSD draft head (MSD_SPEC.md 3.2).

The draft keeps its own static K/V cache. Committed pairs ``(f_j, x_{j+1})`` sit at
rows ``0 .. draft_len - 1``; while a tree grows, expansion step ``d`` writes its ``top_k``
frontier nodes at rows ``draft_len + d * top_k + i`` (scratch, overwritten by the next
commit). A frontier node sees the committed rows, its ancestors' rows and its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import msd_kernels
from msd.cache import StaticKVCache
from msd.draft import MSDDraftModel

# Test seam: (emitted tokens [B, N], root-to-frontier paths [B, n, d], draft logits
# [B, n, V]) -> the logits to expand instead. Lets tests plant known continuations.
ProposalHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values[b, rows[b, i]]`` for every ``i``: ``[B, N, ...]`` and ``[B, n]`` -> ``[B, n, ...]``."""
    index = rows.reshape(*rows.shape, *([1] * (values.dim() - 2))).expand(*rows.shape, *values.shape[2:])
    return values.gather(1, index)


@dataclass
class DraftTree:
    """A tree to verify: all ``[B, T+1]`` int64 except ``mask`` ``[B, T+1, W]``."""

    tokens: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor
    mask: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor


class TreeDrafter:
    """Drafts trees of ``num_nodes`` nodes from ``depth`` expansion steps of ``top_k``."""

    def __init__(self, draft: MSDDraftModel, cache: StaticKVCache, top_k: int, depth: int, num_nodes: int,
                 proposal_hook: ProposalHook | None = None):
        self.draft, self.cache = draft, cache
        self.top_k, self.depth, self.num_nodes = top_k, depth, num_nodes
        self.proposal_hook = proposal_hook
        self.root_hidden: torch.Tensor | None = None  # [B, 1, H] draft output at the root pair

    def _forward(self, inputs: torch.Tensor, positions: torch.Tensor, **masks) -> torch.Tensor:
        return self.draft(inputs, positions, cache=self.cache, **masks)

    def commit(self, input_ids: torch.Tensor, features: torch.Tensor,
               visual_embeds: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None) -> None:
        """Append pairs ``(features[:, j], input_ids[:, j])`` (``[B, n, H]``, ``[B, n]``)
        to the draft cache; the last one's output becomes the next tree's root."""
        inputs = self.draft.fuse_inputs(input_ids, features, visual_embeds, visual_mask)
        positions = self.cache.prefix_len.long().unsqueeze(1) + torch.arange(input_ids.shape[1], device=inputs.device)
        self.cache.write_offset = 0
        hidden = self._forward(inputs, positions)
        self.cache.advance(input_ids.shape[1])
        self.root_hidden = hidden[:, -1:]

    def commit_prompt(self, input_ids: torch.Tensor, first_token: torch.Tensor, hidden: torch.Tensor,
                      embeds: torch.Tensor, visual_mask: torch.Tensor) -> None:
        """The prompt's pairs after the target's prefill: position j pairs feature ``f_j``
        (``hidden`` ``[B, L, H]``) with the next input ``x_{j+1}``, the last one with the
        first generated token ``[B]``. Visual positions (``visual_mask`` ``[B, L]``) take the
        raw visual embedding (``embeds``: the target's input embeddings, visuals spliced in)."""
        next_ids = torch.cat([input_ids[:, 1:], first_token[:, None]], 1)
        no_image = torch.zeros_like(input_ids[:, :1], dtype=torch.bool)
        visual_mask = torch.cat([visual_mask[:, 1:], no_image], 1)
        visual_embeds = torch.cat([embeds[:, 1:], torch.zeros_like(embeds[:, :1])], 1)
        self.commit(next_ids, hidden, visual_embeds, visual_mask)

    def build(self, root_token: torch.Tensor, emitted: torch.Tensor | None = None) -> DraftTree:
        """Draft a tree under ``root_token`` ``[B]`` (the last emitted token)."""
        batch, k = root_token.shape[0], self.top_k
        device = root_token.device
        pool = msd_kernels.new_tree_pool(batch, k, self.depth, device)
        draft_len = self.cache.prefix_len.long()  # [B]
        cols = torch.arange(self.cache.max_len, device=device)
        committed = cols < draft_len[:, None]  # [B, S_max]

        paths = root_token.view(batch, 1, 1)
        logits = self._proposals(emitted, paths, self.draft.compute_logits(self.root_hidden))
        frontier = msd_kernels.tree_expand(
            logits, torch.zeros(batch, 1, device=device), torch.full((batch, 1), -1, device=device),
            *pool, 0, k,
        )
        parent_rows = torch.zeros(batch, k, dtype=torch.long, device=device)
        parent_hidden = self.root_hidden
        ancestors = torch.zeros(batch, 1, self.cache.max_len, dtype=torch.bool, device=device)
        for step in range(self.depth):
            tokens, scores, pool_index = frontier
            if self.proposal_hook is not None:
                paths = torch.cat([gather_rows(paths, parent_rows), tokens.unsqueeze(-1)], dim=2)
            # Each node: its parent's ancestors plus its own row.
            own_rows = draft_len[:, None] + step * k + torch.arange(k, device=device)  # [B, k]
            ancestors = gather_rows(ancestors, parent_rows)
            ancestors = ancestors | (cols == own_rows.unsqueeze(-1))
            hidden_of_parent = gather_rows(parent_hidden, parent_rows)
            inputs = self.draft.fuse_inputs(tokens, hidden_of_parent)
            self.cache.write_offset = step * k
            hidden = self._forward(inputs, draft_len[:, None] + step + torch.zeros_like(tokens),
                                   dense_mask=committed[:, None] | ancestors)
            offset = msd_kernels.pool_size(k, step)
            logits = self._proposals(emitted, paths, self.draft.compute_logits(hidden))
            frontier = msd_kernels.tree_expand(logits, scores, pool_index, *pool, offset, k)
            parent_rows = torch.div(frontier[2] - offset, k, rounding_mode="floor")
            parent_hidden = hidden
        self.cache.write_offset = 0
        return DraftTree(*msd_kernels.tree_assemble(*pool, root_token, self.num_nodes))

    def _proposals(self, emitted, paths, logits):
        if self.proposal_hook is None:
            return logits
        return self.proposal_hook(emitted, paths, logits)
