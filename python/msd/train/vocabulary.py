"""The reduced draft vocabulary of an EAGLE-3-style draft, from token frequencies of its data.

As SpecForge and EAGLE-3 build it (shared/EAGLE3_LAYOUT.md, "d2t / t2d"): count the tokens the
loss is computed on (the answers), keep the ``draft_vocab_size`` most frequent, fill up with the
lowest unused ids when fewer were seen, sort ascending; then ``d2t[i] = kept[i] - i`` (target
id = draft id + d2t) and ``t2d[t]`` = t is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch


def count_answer_tokens(items: Iterable[dict | None]) -> Counter[int]:
    """Token counts over the loss-masked positions of dataset items (``input_ids`` ``[L]``,
    ``loss_mask`` ``[L]``); skipped items (None) count nothing."""
    counts: Counter[int] = Counter()
    for item in items:
        if item is not None:
            counts.update(item["input_ids"][item["loss_mask"].bool()].tolist())
    return counts


def vocabulary_maps(counts: Counter[int], draft_vocab_size: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t [Vd] int64, t2d [V] bool)`` of the ``draft_vocab_size`` most frequent ids of
    ``counts`` (ties: the lower id first), filled with the lowest ids never seen."""
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab_size}], got {draft_vocab_size}")
    if any(not 0 <= token < vocab_size for token in counts):
        raise ValueError(f"token counts hold ids outside the target's vocabulary of {vocab_size}")
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:draft_vocab_size]
    kept = set(ranked)
    filler = (token for token in range(vocab_size) if token not in kept)
    while len(kept) < draft_vocab_size:
        kept.add(next(filler))
    ids = torch.tensor(sorted(kept), dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(draft_vocab_size), t2d
