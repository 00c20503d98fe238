"""Tiny Hugging Face models built from configs (no hub access), saved and reloaded with
``from_pretrained`` so tests exercise the real loading path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import config_from_dict

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


def tiny_llava_next(folder: Path, seed: int = 0, **config_kwargs) -> LlavaNextForConditionalGeneration:
    """A tiny LLaVA-NeXT target (any-resolution tiles of IMAGE_SIZE pixels)."""
    base = tiny_llava_config(**config_kwargs)
    config = LlavaNextConfig(
        text_config=base.text_config, vision_config=base.vision_config, image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                              [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    return LlavaNextForConditionalGeneration.from_pretrained(folder).eval()


def image_token_counts(target, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
    """How many image tokens each image takes in the prompt (what a processor would expand)."""
    extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
    with torch.no_grad():
        features = target.model.get_image_features(pixel_values=pixel_values, **extra)
    features = getattr(features, "pooler_output", features)
    return [f.shape[0] for f in features]


def random_draft(target, seed: int = 0) -> MSDDraftModel:
    """An untrained MSD draft head of the target's width, sharing its embeddings and head."""
    text = target.config.text_config
    config = config_from_dict({
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
    })
    torch.manual_seed(seed)
    return MSDDraftModel(config, target.get_input_embeddings(), target.get_output_embeddings()).eval()


class OracleProposals:
    """Test seam for the draft: propose the target's own greedy continuation ``reference``
    (prompt + new tokens), except that with probability ``corruption`` a node's true next
    token is removed from its proposals; other proposals are random. This makes every
    acceptance length happen while exercising the whole engine."""

    def __init__(self, reference: list[int], corruption: float, seed: int = 0):
        self.reference, self.corruption = reference, corruption
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, emitted: torch.Tensor, paths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        proposals = torch.randn(logits.shape, generator=self.generator)
        for b in range(paths.shape[0]):
            for node in range(paths.shape[1]):
                sequence = emitted[b].tolist() + paths[b, node, 1:].tolist()
                if len(sequence) >= len(self.reference) or self.reference[: len(sequence)] != sequence:
                    continue
                corrupt = torch.rand((), generator=self.generator) < self.corruption
                proposals[b, node, self.reference[len(sequence)]] = -100.0 if corrupt else 100.0
        return proposals.to(logits)
