"""Tiny Hugging Face models built from configs (no hub access), saved and reloaded with
``from_pretrained`` so tests exercise the real loading path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # the last id stands for "image" in prompts
IMAGE_SIZE, PATCH = 16, 4  # 16 patches: (16 / 4) ** 2 visual tokens per image


def tiny_llava_config(hidden=64, heads=4, kv_heads=4, layers=2) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
    )
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava(folder: Path, seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    """Build, save to ``folder`` and reload a tiny random LLaVA-1.5-style target."""
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).save_pretrained(folder)
    return LlavaForConditionalGeneration.from_pretrained(folder).eval()
