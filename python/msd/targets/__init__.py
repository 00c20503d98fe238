"""Target adapters, one per model family: :func:`adapter_for` picks the target's."""

from __future__ import annotations

from torch import nn

from msd.targets.base import PromptInputs, TargetAdapter
from msd.targets.llava import LlavaAdapter

# config.model_type -> adapter.
ADAPTERS: dict[str, type[TargetAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaAdapter,
}


def adapter_for(model: nn.Module) -> TargetAdapter:
    """The adapter of ``model``'s family; ``ValueError`` listing the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"target: {type(model).__name__} (model_type {model_type!r}) is not a supported family; "
                         f"supported model types: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "LlavaAdapter", "PromptInputs", "TargetAdapter", "adapter_for"]
