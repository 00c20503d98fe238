"""The demo target's tokenizer and processor, trained on the world's text.

A byte-level BPE (GPT-2 style: every byte is in the alphabet, so nothing is unknown and
decoding gives back the exact text) with the specials ``<unk> <s> </s> <pad> <image>``;
``<s>`` is prepended to every encoding, as for LLaVA-1.5's Llama tokenizer. The processor
pairs it with a CLIP image processor that scales the world's images to the vision tower's
input size and normalises them around the world's background colour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from msd.demo.world import BACKGROUND, TEXT_JSON, WORLD_JSON
from msd.train.template import IMAGE_PLACEHOLDER, render_llava_v1

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER)  # ids 0..4
VISION_IMAGE_SIZE, VISION_PATCH = 48, 16  # 3 x 3 patches: one per grid cell of a scene
# What Llama tokenizers return (no token_type_ids, which LLaVA's generate rejects).
LLAMA_INPUT_NAMES = ["input_ids", "attention_mask"]
IMAGE_STD = 0.5  # pixel scale of the normalised image: a drawn colour is about 1 away from the background


def corpus(world: Path) -> Iterator[str]:
    """The world's conversations as the target reads them (``llava_v1`` prompts), with the
    special tokens cut out: they never reach the BPE model."""
    for name in (TEXT_JSON, WORLD_JSON):
        for record in json.loads((world / name).read_text(encoding="utf-8")):
            text = "".join(piece for piece, _ in render_llava_v1(record["conversations"]))
            for special in SPECIALS:
                text = text.replace(special, " ")
            yield text


def train_tokenizer(world: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on :func:`corpus`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(world), trainer)
    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", SPECIALS.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
                                   model_input_names=LLAMA_INPUT_NAMES)


def make_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The LLaVA processor of the demo target: images scaled (and centre-cropped) to
    ``VISION_IMAGE_SIZE``; one image token per patch (the vision tower's CLS token is dropped
    by the "default" feature strategy). No chat template: prompts are ``llava_v1`` text."""
    # Normalised around the scenes' background: an empty cell is all zeros, so its patch
    # embedding is nothing but the vision tower's position embedding, and a drawn thing is
    # what stands out from it (with CLIP's photo statistics the bright background dominated
    # every patch, and colours and positions drowned in it).
    images = CLIPImageProcessor(size={"shortest_edge": VISION_IMAGE_SIZE},
                                crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
                                image_mean=[channel / 255 for channel in BACKGROUND], image_std=[IMAGE_STD] * 3)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=VISION_PATCH,
                          num_additional_image_tokens=1, vision_feature_select_strategy="default")


def build_processor(world: Path, folder: Path, vocab_size: int = 1024) -> LlavaProcessor:
    """Train the tokenizer on ``world`` and save the processor (tokenizer included) to ``folder``."""
    processor = make_processor(train_tokenizer(world, vocab_size))
    processor.save_pretrained(folder)
    return processor
