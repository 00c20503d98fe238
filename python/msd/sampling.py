"""Turning target logits into the distribution generation samples from.

The same Hugging Face logits warpers ``generate`` applies for sampling (temperature,
top-k, top-p, in that order), so speculative sampling preserves exactly the distribution
of ``target.generate(do_sample=True, ...)``.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Options of GenerationConfig msd does not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "penalty_alpha": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


def check_supported(config: GenerationConfig) -> None:
    """Raise ``NotImplementedError`` naming any option msd cannot honour losslessly."""
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = getattr(config, name, off)
        if value is not None and value != off:
            raise NotImplementedError(f"SpeculativeLLaVA.generate does not support {name}={value!r}")
    if (config.min_length or 0) > 0:
        raise NotImplementedError(f"SpeculativeLLaVA.generate does not support min_length={config.min_length}")


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
