"""msd: Multimodal Speculative Decoding for LLaVA-style models.

The kernels live in :mod:`msd_kernels`; the engine (``SpeculativeLLaVA``), the draft
model and training arrive in this package.
"""

__version__ = "0.1.0"

from msd.draft import MSDDraftModel  # noqa: E402
from msd.draft_checkpoint import load_draft, save_draft  # noqa: E402
from msd.engine import GenerationStats, SpeculativeLLaVA  # noqa: E402

__all__ = ["GenerationStats", "MSDDraftModel", "SpeculativeLLaVA", "load_draft", "save_draft"]
