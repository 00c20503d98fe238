"""Tiny Hugging Face models built from configs (no hub access), saved and reloaded with
``from_pretrained`` so tests exercise the real loading path."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# Re-exported for the tests: the draft stand-ins live in the library (the benchmark uses them too).
from msd.testing import ControlledProposals as OracleProposals  # noqa: F401
from msd.testing import random_draft  # noqa: F401

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # the last id stands for "image" in prompts
IMAGE_SIZE, PATCH = 16, 4  # 16 patches: (16 / 4) ** 2 visual tokens per image
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = ["USER", ":", "ASSISTANT", "what", "is", "this", "a", "cat", "and", "dog", "?", ".", "very", "long"]


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


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A fast HF tokenizer over ``tokenizer`` that prepends ``<s>`` (id 1), with the special
    tokens of the tiny models (``<image>`` one of them)."""
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"],
                                   model_input_names=["input_ids", "attention_mask"])  # as Llama's


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the tiny target's vocabulary: one token per word or punctuation mark,
    SPECIAL_TOKENS then WORDS first, fillers ``w<id>`` up to ``<image>`` = IMAGE_TOKEN."""
    names = SPECIAL_TOKENS + WORDS
    vocab = ({name: i for i, name in enumerate(names)} | {f"w{i}": i for i in range(len(names), IMAGE_TOKEN)}
             | {"<image>": IMAGE_TOKEN})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap_tokenizer(words)


def tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None,
                   image_processor: CLIPImageProcessor | None = None,
                   chat_template: str | None = None) -> LlavaProcessor:
    """A LLaVA-1.5 processor for the tiny target: IMAGE_SIZE-pixel square crops (16 image tokens:
    the vision tower's CLS token is dropped by the "default" strategy)."""
    image_processor = image_processor or CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or tiny_tokenizer(),
                          patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)
