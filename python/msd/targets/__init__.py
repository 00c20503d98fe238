"""Target adapters, one per model family: :func:`adapter_for` picks the target's."""

from __future__ import annotations

from torch import nn

from msd.targets.base import PromptInputs, TargetAdapter
from msd.targets.llava import LlavaAdapter
from msd.targets.qwen2_vl import Qwen2VLAdapter

# config.model_type -> adapter.
ADAPTERS: dict[str, type[TargetAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaAdapter,
    "llava_onevision": LlavaAdapter,  # Qwen2 text, 1-D RoPE: LLaVA's adapter as it is
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
}


def adapter_for(model: nn.Module) -> TargetAdapter:
    """The adapter of ``model``'s family; ``ValueError`` listing the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"target: {type(model).__name__} (model_type {model_type!r}) is not a supported family; "
                         f"supported model types: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "LlavaAdapter", "PromptInputs", "Qwen2VLAdapter", "TargetAdapter", "adapter_for"]
