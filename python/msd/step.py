"""One speculative decoding step as a fixed-shape device program (ARCHITECTURE.md, "The step").

commit the previous step's accepted pairs to the draft (fixed width ``depth + 2``, per-row
counts) -> draft the tree -> verify it with the target -> accept -> compact the target cache.

Every tensor the step reads or writes lives in :class:`StepState` or the two caches, allocated
once per (batch, max length) and updated in place; every size that changes from step to step
(lengths, accepted counts) stays in device tensors. So the step never waits for the host, it
compiles with ``torch.compile(fullgraph=True)``, and on a GPU it can be captured once in a CUDA
graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msd.cache import StaticKVCache
from msd.targets import TargetAdapter
from msd.tree_draft import TreeDrafter, gather_rows
from msd.verifier import Verifier


@dataclass
class StepState:
    """The per-sequence state a step reads and leaves for the next (``W = depth + 2``)."""

    root: torch.Tensor  # [B] int64: the last emitted token, root of the next tree
    commit_tokens: torch.Tensor  # [B, W] int64: the last step's accepted tokens then its bonus token
    commit_features: torch.Tensor  # [B, W, F] the target's features paired with them (root's first)
    commit_count: torch.Tensor  # [B] int64: how many of those pairs are real (0: none)
    rope_delta: torch.Tensor  # [B] or [3, B] int64: what the adapter adds to plain positions
    active: torch.Tensor  # [B] bool: False freezes a finished sequence (its lengths stop growing)
    rng_state: torch.Tensor  # [2] int64 (seed, offset) of the sampling verifier's Philox stream

    @classmethod
    def empty(cls, batch: int, width: int, features: int, dtype: torch.dtype, device: torch.device,
              rope_axes: int) -> StepState:
        rope_shape = (rope_axes, batch) if rope_axes > 1 else (batch,)
        long = {"dtype": torch.long, "device": device}
        return cls(torch.zeros(batch, **long), torch.zeros(batch, width, **long),
                   torch.zeros(batch, width, features, dtype=dtype, device=device), torch.zeros(batch, **long),
                   torch.zeros(rope_shape, **long), torch.ones(batch, dtype=torch.bool, device=device),
                   torch.zeros(2, **long))

    def packed(self, batch: int) -> StepState:
        """The state of the first ``batch`` sequences: views of this one's rows (the RNG shared)."""
        return StepState(self.root[:batch], self.commit_tokens[:batch], self.commit_features[:batch],
                         self.commit_count[:batch], self.rope_delta[..., :batch], self.active[:batch], self.rng_state)

    def repack(self, keep: list[int]) -> None:
        """Move sequences ``keep`` (ascending) to rows ``0 .. len(keep) - 1``."""
        source, rows = torch.tensor(keep, device=self.root.device), len(keep)
        for values in (self.root, self.commit_tokens, self.commit_features, self.commit_count, self.active):
            values[:rows] = values[source]
        self.rope_delta[..., :rows] = self.rope_delta[..., source]


class DecodeStep:
    """``step()`` -> ``(tokens [B, W], count [B])``: the tokens each sequence gained (its accepted
    draft tokens then the bonus token; the first ``count[b]`` are real, 0 when frozen). The
    returned tensors are the state's own buffers: copy them before the next step runs."""

    def __init__(self, adapter: TargetAdapter, drafter: TreeDrafter, cache: StaticKVCache, state: StepState,
                 verifier: Verifier, feature_layers: tuple[int, ...] | None = None):
        self.adapter, self.drafter, self.cache, self.state, self.verifier = adapter, drafter, cache, state, verifier
        self.feature_layers = feature_layers  # the target states the draft's features are made of

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        state, cache, adapter = self.state, self.cache, self.adapter
        self.drafter.commit(state.commit_tokens, state.commit_features, state.commit_count)
        start = cache.prefix_len.long()  # the root's index: its K/V row is written by this verification
        tree = self.drafter.build(state.root, start)
        positions = adapter.positions(start.unsqueeze(1) + tree.depth, state.rope_delta)
        hidden, features = adapter.decoder.run(adapter.embed_tokens(tree.tokens), positions, cache, tree.mask,
                                               capture=self.feature_layers)
        accepted, num_accepted, bonus = self.verifier(adapter.lm_head(hidden), tree, state.rng_state)
        before = cache.prefix_len.clone()
        cache.compact(accepted, num_accepted)
        cache.prefix_len.copy_(torch.where(state.active, cache.prefix_len, before))

        # Next commit: pair j is (feature of accepted row j, token of accepted row j + 1), and the
        # bonus token after the last accepted row; fixed width W, root first.
        width = state.commit_tokens.shape[1]
        rows = torch.nn.functional.pad(accepted, (0, max(0, width + 1 - accepted.shape[1])), value=-1)[:, :width + 1]
        tokens = tree.tokens.gather(1, rows[:, 1:].clamp(min=0))
        column = torch.arange(width, device=tokens.device)
        state.commit_tokens.copy_(torch.where(column == num_accepted.unsqueeze(1), bonus.unsqueeze(1), tokens))
        state.commit_features.copy_(gather_rows(features, rows[:, :width].clamp(min=0)))
        state.commit_count.copy_((num_accepted + 1) * state.active)
        state.root.copy_(torch.where(state.active, bonus, state.root))
        return state.commit_tokens, state.commit_count
