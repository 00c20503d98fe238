"""LLaVA-1.5 and LLaVA-NeXT targets (Llama, Mistral or Vicuna text; 1-D RoPE)."""

from __future__ import annotations

import torch
from torch import nn

from msd.targets.base import PromptInputs, TargetAdapter


class LlavaAdapter(TargetAdapter):
    """``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.

    Positions are the plain token index; visual positions hold the image token id (the
    processor expands each image into as many ids as it has visual tokens).
    """

    family = "LLaVA"

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model.language_model)
        self.visual_inputs = {model.config.image_token_id: "pixel_values"}
        if getattr(model.config, "video_token_id", None) is not None:  # LLaVA-OneVision
            self.visual_inputs[model.config.video_token_id] = "pixel_values_videos"

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model.rotary_emb(hidden, position_ids)

    def row_inputs(self, captured: dict, row: int, start: int) -> PromptInputs:
        embeds = captured["inputs_embeds"][row:row + 1, start:]
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        return PromptInputs(embeds, positions, torch.zeros(1, dtype=torch.long, device=embeds.device))

    def positions(self, plain_positions: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        return plain_positions
