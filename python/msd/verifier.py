"""Acceptance: which draft tokens the target keeps, and the token it adds (MSD_SPEC.md 3.4).

Greedy: the longest path whose tokens are the target's argmax at their parents, plus the
target's argmax at the last accepted node. Sampling: the lossless sibling-by-sibling rule on
the target's processed distribution (temperature, top-k, top-p as ``generate`` applies them),
random numbers from a device-side Philox state. Both run as msd kernels, without host syncs.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

import msd_kernels
from msd.sampling import logits_warpers, sampling_probs
from msd.tree_draft import DraftTree


class Verifier:
    """Acceptance under the options of ``config`` (greedy unless ``do_sample``)."""

    def __init__(self, config: GenerationConfig):
        self.do_sample = bool(config.do_sample)
        self.warpers = logits_warpers(config)

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt, ``[B]``, from the target's last prompt logits ``[B, V]``."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(sampling_probs(self.warpers, logits), 1)[:, 0]

    def __call__(self, logits: torch.Tensor, tree: DraftTree, rng_state: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(accepted [B, T+1] tree rows root first (-1 padded), num_accepted [B], bonus [B])``
        from the target's logits at the tree tokens ``[B, T+1, V]``."""
        if self.do_sample:
            return msd_kernels.verify_sampling(sampling_probs(self.warpers, logits), tree.tokens, tree.first_child,
                                               tree.next_sibling, rng_state)
        return msd_kernels.verify_greedy(logits, tree.tokens, tree.first_child, tree.next_sibling)
