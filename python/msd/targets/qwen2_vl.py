"""Qwen2-VL and Qwen2.5-VL targets (Qwen2 text, M-RoPE positions).

M-RoPE gives every prompt token a (temporal, height, width) position: text tokens have the
same value on the three axes, visual tokens their grid coordinates, and text after an image
continues past the image's largest coordinate. The target's own forward computes them
(``get_rope_index``); they are captured with its inputs. A token after the prompt at plain
index i (cache row i) sits at ``i + continuation[axis]`` on each axis (MSD_SPEC.md 6): the
cache is indexed by the plain index, never by an M-RoPE coordinate.
"""

from __future__ import annotations

import torch
from torch import nn

from msd.hf_compat import mrope_continuation, mrope_cos_sin, mrope_section
from msd.targets.base import PromptInputs, TargetAdapter


class Qwen2VLAdapter(TargetAdapter):
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``: images
    and videos, each placeholder id repeated once per visual token by the processor."""

    family = "Qwen2-VL"
    rope_axes = 3

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model.language_model)
        config = model.config
        self.visual_inputs = {config.image_token_id: "pixel_values", config.video_token_id: "pixel_values_videos"}
        self.mrope_section = mrope_section(self.text_config)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(self.text_model.rotary_emb, hidden, position_ids, self.mrope_section)

    def row_inputs(self, captured: dict, row: int, start: int) -> PromptInputs:
        embeds = captured["inputs_embeds"][row:row + 1, start:]
        positions = captured.get("position_ids")
        if positions is None:  # a text-only prompt: the text model counts 0 .. L-1 on every axis
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(3, 1, -1)
        else:
            if positions.dim() == 2:  # [B, L]: the same on every axis
                positions = positions.unsqueeze(0).expand(3, -1, -1)
            elif positions.shape[0] == 4:  # a plain text row first, for the attention masks
                positions = positions[1:]
            positions = positions[:, row:row + 1, start:]
        return PromptInputs(embeds, positions, mrope_continuation(positions))

    def positions(self, plain_positions: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        """``[3, B, Q]``: ``plain_positions`` ``[B, Q]`` plus each axis's continuation ``[3, B]``."""
        return plain_positions.unsqueeze(0) + rope_delta.unsqueeze(-1)
