"""msd: Multimodal Speculative Decoding for vision-language models.

The kernels live in :mod:`msd_kernels`; this package holds the engine (``SpeculativeLLaVA``,
also reachable as the family-neutral ``SpeculativeVLM``: LLaVA, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL and Qwen2.5-VL targets), the draft model and its checkpoints, and training.
"""

__version__ = "0.1.0"

from msd.draft import MSDDraftModel  # noqa: E402
from msd.draft_checkpoint import load_draft, save_draft  # noqa: E402
from msd.draft_eagle3 import Eagle3DraftModel  # noqa: E402
from msd.engine import GenerationStats, SpeculativeLLaVA  # noqa: E402

# The name users know stays; this one says what it serves.
SpeculativeVLM = SpeculativeLLaVA

__all__ = ["Eagle3DraftModel", "GenerationStats", "MSDDraftModel", "SpeculativeLLaVA", "SpeculativeVLM",
           "load_draft", "save_draft"]
