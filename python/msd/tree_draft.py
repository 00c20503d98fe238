"""Growing the EAGLE-2 dynamic draft tree with the MSD draft head (MSD_SPEC.md 3.2).

The draft keeps its own static K/V cache. Committed pairs ``(f_j, x_{j+1})`` of sequence b
sit at rows ``0 .. draft_len[b] - 1``; while a tree grows, expansion step ``d`` writes its
``top_k`` frontier nodes at rows ``draft_len + d * top_k + i`` (scratch, overwritten by the
next commit). A frontier node sees the committed rows, its ancestors' rows and its own: msd's
tree attention with the level's nodes as the last rows of a ``tree_len = (d + 1) * top_k``
tree section whose packed mask holds each node's ancestors among the earlier levels.

Every shape is fixed by (batch, top_k, depth, tree size): the commit of a step's accepted
pairs has the fixed width ``depth + 2`` with per-sequence counts, and the lengths live in
device tensors, so a whole decoding step runs without host synchronisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import msd_kernels
from msd.cache import StaticKVCache
from msd.draft_kinds import DraftModel
from msd.proposers import DraftProposer, Proposer


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
    """Drafts trees of ``num_nodes`` nodes from ``depth`` expansion steps of ``top_k``, for
    ``cache.batch`` sequences; the candidate pool and the root states are allocated once."""

    def __init__(self, draft: DraftModel, cache: StaticKVCache, top_k: int, depth: int, num_nodes: int,
                 proposer: Proposer | None = None):
        self.draft, self.cache = draft, cache
        self.top_k, self.depth, self.num_nodes = top_k, depth, num_nodes
        self.proposer = proposer or DraftProposer()
        device, batch = cache.kv.device, cache.batch
        # Every build rewrites all pool slots (k + depth * k * k), so the pool needs no reset.
        self.pool = msd_kernels.new_tree_pool(batch, top_k, depth, device)
        self.root_hidden = torch.zeros(batch, 1, draft.config.hidden_size, dtype=draft.fc.weight.dtype,
                                       device=device)  # draft output at each sequence's last committed pair
        # Row r: scratch row r's bit alone, packed as tree_attention masks are.
        self._own_bits = msd_kernels.pack_mask(torch.eye(depth * top_k, dtype=torch.bool)).to(device)

    def packed(self, batch: int) -> TreeDrafter:
        """The drafter of the first ``batch`` sequences: over the packed draft cache
        (:meth:`StaticKVCache.packed`) and views of this drafter's pool and root states."""
        drafter = copy.copy(self)
        drafter.cache = self.cache.packed(batch)
        drafter.pool = tuple(slots[:batch] for slots in self.pool)
        drafter.root_hidden = self.root_hidden[:batch]
        return drafter

    def repack(self, batch: int, keep: list[int]) -> None:
        """Move sequences ``keep`` (ascending) of the first ``batch`` to the front (see
        :meth:`StaticKVCache.repack`); the pool is rewritten by every tree anyway."""
        self.cache.repack(batch, keep)
        self.root_hidden[:len(keep)] = self.root_hidden[torch.tensor(keep, device=self.root_hidden.device)]

    def _forward(self, inputs: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, **masks):
        return self.draft(inputs, positions, cache=cache, **masks)

    def commit_prompt(self, row: int, input_ids: torch.Tensor, first_token: torch.Tensor, hidden: torch.Tensor,
                      embeds: torch.Tensor, visual_mask: torch.Tensor) -> None:
        """Sequence ``row``'s prompt pairs after the target's prefill, written from row 0 of its
        draft cache: position j pairs feature ``f_j`` (``hidden`` ``[1, L, F]``) with the next
        input ``x_{j+1}`` (``input_ids`` ``[1, L]``), the last one with the first generated token
        ``[1]``. Visual positions (``visual_mask`` ``[1, L]``) take the raw visual embedding
        (``embeds``: the target's input embeddings, visuals spliced in)."""
        next_ids = torch.cat([input_ids[:, 1:], first_token[:, None]], 1)
        no_image = torch.zeros_like(input_ids[:, :1], dtype=torch.bool)
        visual_mask = torch.cat([visual_mask[:, 1:], no_image], 1)
        visual_embeds = torch.cat([embeds[:, 1:], torch.zeros_like(embeds[:, :1])], 1)
        inputs = self.draft.fuse_inputs(next_ids, hidden, visual_embeds, visual_mask)
        cache = self.cache.row(row)
        cache.prefix_len.zero_()
        positions = torch.arange(next_ids.shape[1], device=inputs.device)[None]
        out = self._forward(inputs, positions, cache)
        cache.advance(next_ids.shape[1])
        self.root_hidden[row] = out[0, -1:]

    def commit(self, input_ids: torch.Tensor, features: torch.Tensor, count: torch.Tensor) -> None:
        """Append each sequence's first ``count[b]`` pairs ``(features[b, j], input_ids[b, j])``
        (``[B, W, F]``, ``[B, W]``; ``count`` ``[B]`` int64, 0 for none) to the draft cache; the
        last one's output becomes the next tree's root. The pairs past ``count`` are computed
        with the rest (fixed width) and land past the new length, where nothing reads them."""
        inputs = self.draft.fuse_inputs(input_ids, features)
        positions = self.cache.prefix_len.long().unsqueeze(1) + torch.arange(input_ids.shape[1], device=inputs.device)
        self.cache.write_offset = 0
        hidden = self._forward(inputs, positions, self.cache)
        last = gather_rows(hidden, (count - 1).clamp(min=0).unsqueeze(1))  # [B, 1, H]
        self.root_hidden.copy_(torch.where((count > 0).view(-1, 1, 1), last, self.root_hidden))
        self.cache.advance(count.to(self.cache.prefix_len.dtype))

    def build(self, root_token: torch.Tensor, start: torch.Tensor) -> DraftTree:
        """Draft a tree under ``root_token`` ``[B]`` (the last emitted token), which sits at index
        ``start`` ``[B]`` of its sequence."""
        batch, k = root_token.shape[0], self.top_k
        device = root_token.device
        draft_len = self.cache.prefix_len.long()  # [B]

        paths = root_token.view(batch, 1, 1)
        logits = self.proposer(self.draft, self.root_hidden, paths, start)
        frontier = msd_kernels.tree_expand(
            logits, torch.zeros(batch, 1, device=device), torch.full((batch, 1), -1, device=device),
            *self.pool, 0, k,
        )  # in the draft's vocabulary: its ids become target ids for embeddings, paths and the tree
        parent_rows = torch.zeros(batch, k, dtype=torch.long, device=device)
        parent_hidden = self.root_hidden
        # ancestors[b, i]: packed bits over the scratch rows, set for node i of the current level
        # and its ancestors (the tree_attention mask of the level, over the levels so far).
        own_bits = self._own_bits.to(device)
        ancestors = torch.zeros(batch, 1, own_bits.shape[1], dtype=torch.long, device=device)
        for step in range(self.depth):
            tokens, scores, pool_index = frontier
            tokens = self.draft.to_target(tokens)
            paths = torch.cat([gather_rows(paths, parent_rows), tokens.unsqueeze(-1)], dim=2)
            ancestors = gather_rows(ancestors, parent_rows) | own_bits[step * k:(step + 1) * k]
            tree_len = (step + 1) * k  # this level's nodes are the last k of the scratch rows so far
            inputs = self.draft.fuse_inputs(tokens, gather_rows(parent_hidden, parent_rows))
            self.cache.write_offset = step * k
            hidden = self._forward(inputs, draft_len[:, None] + step + torch.zeros_like(tokens), self.cache,
                                   tree_mask=ancestors[..., :msd_kernels.mask_words(tree_len)], tree_len=tree_len)
            offset = msd_kernels.pool_size(k, step)
            logits = self.proposer(self.draft, hidden, paths, start)
            frontier = msd_kernels.tree_expand(logits, scores, pool_index, *self.pool, offset, k)
            parent_rows = torch.div(frontier[2] - offset, k, rounding_mode="floor")
            parent_hidden = hidden
        self.cache.write_offset = 0
        tokens, *links = msd_kernels.tree_assemble(*self.pool, root_token, self.num_nodes)
        # The root is the last emitted (target) token; the nodes hold draft ids.
        return DraftTree(torch.cat([tokens[:, :1], self.draft.to_target(tokens[:, 1:])], 1), *links)
