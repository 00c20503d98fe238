"""msd: Multimodal Speculative Decoding for LLaVA-style models.

The kernels live in :mod:`msd_kernels`; the engine (``SpeculativeLLaVA``), the draft
model and training arrive in this package.
"""

__version__ = "0.1.0"
