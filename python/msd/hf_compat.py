"""Everything msd must know about which transformers release it runs on, in one place.

msd supports the range declared in pyproject.toml (CI tests its oldest and its newest
release). The engine calls only public modules and methods; where those differ between
releases, the difference is handled here, one function per difference, each saying which
releases do what. Nothing else in msd looks at ``transformers.__version__``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_MAJOR = Version(transformers.__version__).major


def rope_theta_and_scaling(config) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of a text config; ``rope_scaling`` is None for plain RoPE.

    transformers 5 keeps both in one ``config.rope_parameters`` dict (``rope_theta`` and
    ``rope_type`` inside, ``"default"`` meaning plain RoPE); 4.x has ``config.rope_theta`` and
    ``config.rope_scaling`` (None for plain RoPE).
    """
    parameters = getattr(config, "rope_parameters", None)
    if parameters is not None:  # transformers >= 5
        parameters = dict(parameters)
        theta = parameters.pop("rope_theta")
        return theta, (None if parameters.get("rope_type", "default") == "default" else parameters)
    return config.rope_theta, getattr(config, "rope_scaling", None)


def mrope_section(config) -> list[int]:
    """The M-RoPE section sizes of a Qwen2-VL / Qwen2.5-VL text config (temporal, height, width;
    they sum to head_dim / 2). 5.x keeps them in ``rope_parameters``, 4.x in ``rope_scaling``."""
    for parameters in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if parameters and "mrope_section" in parameters:
            return list(parameters["mrope_section"])
    raise ValueError(f"{type(config).__name__} has no mrope_section: not an M-RoPE text config")


def mrope_cos_sin(rotary_emb, hidden: torch.Tensor, position_ids: torch.Tensor, section: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[B, Q, D]`` of a Qwen2-VL-style rotary module at 3-D ``position_ids``
    ``[3, B, Q]``: each frequency band takes the axis its ``section`` gives it.

    5.x's rotary module interleaves the sections itself and returns ``[B, Q, D]``; 4.x's
    returns one table per axis, ``[3, B, Q, D]``, and its attention interleaves them
    (``apply_multimodal_rotary_pos_emb``), which is done here the same way.
    """
    cos, sin = rotary_emb(hidden, position_ids)
    if cos.dim() == 3:  # transformers >= 5
        return cos, sin
    bands = section * 2  # the table is [freqs, freqs]: the sections repeat in its second half

    def interleave(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([band[axis % 3] for axis, band in enumerate(table.split(bands, dim=-1))], dim=-1)

    return interleave(cos), interleave(sin)


def mrope_continuation(prompt_positions: torch.Tensor) -> torch.Tensor:
    """``[3, B]``: what each M-RoPE axis adds to a later token's plain index (L + k for the
    k-th token after a prompt of L), as the target's own ``generate`` positions it.

    5.x's ``generate`` continues every axis from the prompt's last position (last + 1, + 2,
    ...); 4.x's adds the prompt's ``rope_deltas`` (its largest position + 1 - L) to the plain
    index on all three axes. They agree whenever the prompt ends with text (every chat
    template's generation prompt does); they part only after a prompt ending in visual tokens.
    """
    length = prompt_positions.shape[-1]
    if TRANSFORMERS_MAJOR >= 5:
        return prompt_positions[:, :, -1] + 1 - length
    largest = prompt_positions.amax(dim=(0, 2))  # [B]
    return (largest + 1 - length).expand(3, -1)
