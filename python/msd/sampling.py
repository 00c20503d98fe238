"""Turning target logits into the distribution generation samples from.

The same Hugging Face logits warpers ``generate`` applies for sampling (temperature,
top-k, top-p, in that order), so speculative sampling preserves exactly the distribution
of ``target.generate(do_sample=True, ...)``.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def logits_warpers(config: GenerationConfig) -> LogitsProcessorList:
    """The warpers ``generate`` uses for sampling with ``config`` (empty when greedy)."""
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


def sampling_probs(warpers: LogitsProcessorList, logits: torch.Tensor) -> torch.Tensor:
    """Processed probabilities ``[..., V]`` float32 of target logits ``[..., V]``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    flat = warpers(None, flat)
    return torch.softmax(flat, dim=-1).reshape(logits.shape)
