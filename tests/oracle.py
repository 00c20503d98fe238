"""Hugging Face as the oracle of losslessness, shared by the engine tests of every family:
greedy output compared with the target's own ``generate`` (with the near-tie rule off the CPU),
and the exact distribution of the first two sampled tokens."""

from __future__ import annotations

from collections import Counter

import torch
from scipy import stats as scipy_stats

from msd.sampling import sampling_probs

# Largest top-2 logit margin, relative to the largest |logit|, at which two implementations
# of the same float32 / bfloat16 model may pick different greedy tokens (see assert_same_greedy).
NEAR_TIE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def with_tokens(inputs: dict, ids: torch.Tensor) -> dict:
    """``inputs`` for the longer sequence ``ids`` ``[1, L + n]``: per-token inputs
    (``attention_mask``, ``mm_token_type_ids``) extended as for text tokens."""
    length = inputs["input_ids"].shape[1]
    longer = {"input_ids": ids}
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            extra = ids.shape[1] - length
            fill = 1 if key == "attention_mask" else 0
            longer[key] = torch.cat([inputs[key], inputs[key].new_full((1, extra), fill)], 1)
    return {**inputs, **longer}


def assert_same_greedy(got: torch.Tensor, expected: torch.Tensor, target, inputs: dict) -> bool:
    """``got`` equals HF's greedy ``expected`` token for token; returns True.

    On the CPU in float32 nothing else is accepted. On CUDA (and in bfloat16) msd's attention
    and HF's SDPA round differently, so the two may part where the target cannot tell its
    top two tokens apart: up to the first difference they must be equal, and there both
    tokens must be the target's top two with a margin within NEAR_TIE (returns False).
    """
    got_ids, expected_ids = got[0].tolist(), expected[0].tolist()
    if got_ids == expected_ids:
        return True
    if target.device.type == "cpu" and target.dtype == torch.float32:
        assert got_ids == expected_ids
    parted = next((i for i, (a, b) in enumerate(zip(got_ids, expected_ids)) if a != b), None)
    assert parted is not None, f"one output is a prefix of the other: {got_ids} vs {expected_ids}"
    assert parted >= inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = target(**with_tokens(inputs, expected[:, :parted])).logits[0, -1].float()
    top2 = logits.topk(2)
    margin = float(top2.values[0] - top2.values[1])
    assert {got_ids[parted], expected_ids[parted]} == set(top2.indices.tolist()), (
        f"token {parted}: msd {got_ids[parted]}, HF {expected_ids[parted]}, target's top two {top2}")
    assert margin <= NEAR_TIE[target.dtype] * float(logits.abs().max()), f"token {parted}: margin {margin}"
    return False


def exact_two_token_distribution(target, inputs, warpers) -> dict[tuple[int, int], float]:
    """P(t1, t2) under the target's processed distribution, by enumerating t1."""
    with torch.no_grad():
        first = sampling_probs(warpers, target(**inputs).logits[:, -1])[0]
        joint = {}
        for t1 in first.nonzero().flatten().tolist():
            ids = torch.cat([inputs["input_ids"], torch.tensor([[t1]], device=target.device)], 1)
            second = sampling_probs(warpers, target(**with_tokens(inputs, ids)).logits[:, -1])[0]
            for t2 in second.nonzero().flatten().tolist():
                joint[(t1, t2)] = float(first[t1] * second[t2])
    return joint


def assert_matches_distribution(samples: list[tuple[int, int]], exact: dict[tuple[int, int], float]) -> None:
    """The sampled pairs follow ``exact``: chi-square p > 1e-3 and total variation < 0.1."""
    runs, counts = len(samples), Counter(samples)
    assert set(counts) <= set(exact), "sampled a pair the target gives probability 0"
    cells = sorted(exact)
    observed = [counts.get(cell, 0) for cell in cells]
    total = sum(exact.values())  # 1 up to float rounding, which chisquare would reject
    expected = [runs * exact[cell] / total for cell in cells]
    # merge rare cells so chi-square's approximation holds
    rare = [i for i, e in enumerate(expected) if e < 5]
    if rare:
        observed = [o for i, o in enumerate(observed) if i not in rare] + [sum(observed[i] for i in rare)]
        expected = [e for i, e in enumerate(expected) if i not in rare] + [sum(expected[i] for i in rare)]
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3
    total_variation = 0.5 * sum(abs(counts.get(c, 0) / runs - exact[c]) for c in cells)
    assert total_variation < 0.1


def record_proposals(monkeypatch) -> list[torch.Tensor]:
    """A list that collects the drafted (non-root) tokens ``[B, T]`` of every tree built from now on."""
    from msd.tree_draft import TreeDrafter

    proposed, build = [], TreeDrafter.build

    def recording_build(drafter, *args):
        tree = build(drafter, *args)
        proposed.append(tree.tokens[:, 1:].clone())
        return tree

    monkeypatch.setattr(TreeDrafter, "build", recording_build)
    return proposed
