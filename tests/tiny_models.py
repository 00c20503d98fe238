"""Tiny Hugging Face models built from configs (no hub access), saved and reloaded with
``from_pretrained`` so tests exercise the real loading path."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    SiglipVisionConfig,
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


def tiny_llava_onevision(folder: Path, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """A tiny LLaVA-OneVision target: Qwen2 text (1-D RoPE), a SigLIP tower over IMAGE_SIZE tiles,
    images (any-resolution) and videos (IMAGE_TOKEN - 1 is the video token)."""
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, video_token_index=ONEVISION_VIDEO,
        image_grid_pinpoints=[[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                              [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()


ONEVISION_VIDEO = IMAGE_TOKEN - 1


def onevision_video_tokens(frames: int) -> int:
    """Video tokens of ``frames`` IMAGE_SIZE frames, as the OneVision processor counts them: each
    frame's patch grid pooled 2 x 2, then one newline token for the video."""
    pooled = math.ceil(IMAGE_SIZE // PATCH / 2)
    return frames * pooled ** 2 + 1


# Qwen2-VL / Qwen2.5-VL: the tiny models keep the real models' id layout at the end of the
# vocabulary (<|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>) and Qwen's
# vision geometry scaled down: 4-pixel patches, 2 x 2 patches merged into one visual token,
# 2 frames per temporal patch.
QWEN_VOCAB = 160
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 150, 151, 152, 153
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
QWEN_PATCH_VALUES = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH  # one flattened patch of pixel_values


def qwen_text_config(hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> dict:
    head_dim = hidden // heads
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    section.append(head_dim // 2 - sum(section))  # temporal, height, width: sums to head_dim / 2
    return dict(vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                rope_theta=10000.0, rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": section})


def _qwen_ids() -> dict:
    return dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
                vision_end_token_id=QWEN_VISION_END, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_qwen2_vl_config(**text_kwargs) -> Qwen2VLConfig:
    vision = dict(depth=1, embed_dim=32, hidden_size=text_kwargs.get("hidden", 64), num_heads=2, mlp_ratio=2,
                  patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE)
    return Qwen2VLConfig(text_config=qwen_text_config(**text_kwargs), vision_config=vision, **_qwen_ids())


def tiny_qwen2_vl(folder: Path, seed: int = 0, **text_kwargs) -> Qwen2VLForConditionalGeneration:
    """Build, save to ``folder`` and reload a tiny random Qwen2-VL target."""
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config(**text_kwargs)).save_pretrained(folder)
    return Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()


def tiny_qwen2_5_vl(folder: Path, seed: int = 0, **text_kwargs) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny random Qwen2.5-VL target (window attention in one vision block, full in the other;
    videos timed by ``second_per_grid_ts``)."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_kwargs.get(
        "hidden", 64), patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE,
        window_size=4 * QWEN_PATCH, fullatt_block_indexes=[1], tokens_per_second=4)
    config = Qwen2_5_VLConfig(text_config=qwen_text_config(**text_kwargs), vision_config=vision, **_qwen_ids())
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()


def qwen_inputs(target, text: list[list[int]], images: list[tuple[int, int]] = (),
                video: tuple[int, int, int] | None = None, seed: int = 0, end_on_visual: bool = False) -> dict:
    """Inputs as a Qwen processor makes them: ``text[0]``, then each image (a (height, width)
    patch grid, both even) wrapped in vision start/end, then ``text[1]``, then the video (a
    (temporal, height, width) grid) and ``text[2]``; pixel values random. ``mm_token_type_ids``
    (1 image, 2 video) is added where this transformers' ``get_rope_index`` takes it, as its
    processor does. ``end_on_visual``: the prompt ends on the last visual token (its vision
    end is dropped, and any text after it)."""
    gen = torch.Generator().manual_seed(seed)
    ids, inputs, pieces = list(text[0]), {}, list(text[1:]) + [[]] * 2
    if images:
        grids = torch.tensor([[1, h, w] for h, w in images])
        inputs |= {"pixel_values": torch.randn(int(grids.prod(-1).sum()), QWEN_PATCH_VALUES, generator=gen),
                   "image_grid_thw": grids}
        for _, h, w in grids.tolist():
            ids += [QWEN_VISION_START] + [QWEN_IMAGE] * (h * w // QWEN_MERGE ** 2) + [QWEN_VISION_END]
    ids += pieces[0]
    if video is not None:
        grid = torch.tensor([video])
        inputs |= {"pixel_values_videos": torch.randn(int(grid.prod()), QWEN_PATCH_VALUES, generator=gen),
                   "video_grid_thw": grid}
        if "second_per_grid_ts" in inspect.signature(target.forward).parameters:
            inputs["second_per_grid_ts"] = torch.tensor([1.5])
        ids += [QWEN_VISION_START] + [QWEN_VIDEO] * (int(grid.prod()) // QWEN_MERGE ** 2) + [QWEN_VISION_END]
    ids += pieces[1]
    if end_on_visual:
        ids = ids[:max(i for i, token in enumerate(ids) if token in (QWEN_IMAGE, QWEN_VIDEO)) + 1]
    inputs["input_ids"] = torch.tensor([ids])
    if "mm_token_type_ids" in inspect.signature(target.model.get_rope_index).parameters:
        inputs["mm_token_type_ids"] = ((inputs["input_ids"] == QWEN_IMAGE).int()
                                       + 2 * (inputs["input_ids"] == QWEN_VIDEO).int())
    return {key: value.to(target.device, dtype=target.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()}


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


# ---------------------------------------------------------------------- a tiny Qwen2-VL processor
# Qwen's tokenizer at the tiny Qwen models' ids: a byte-level BPE with Qwen2's own pre-tokenizer
# (transformers 5 rebuilds a Qwen2 tokenizer from its vocabulary and merges with exactly this
# pipeline, 4.x loads tokenizer.json as is: both tokenize alike). <|endoftext|> (padding) is 0,
# <|im_start|> 1 and <|im_end|> 2 (the tiny configs' eos_token_id); the vision tokens sit at
# QWEN_IMAGE .. QWEN_VISION_END. Every other id is a byte-level symbol or a word: " " + each of
# QWEN_WORDS is one token, built by merges from the left (so " cat" makes " c" and " ca" too).
QWEN_SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|image_pad|>": QWEN_IMAGE,
                "<|video_pad|>": QWEN_VIDEO, "<|vision_start|>": QWEN_VISION_START,
                "<|vision_end|>": QWEN_VISION_END}
QWEN_SYMBOLS = ["Ġ", "Ċ", "?", "."] + [chr(c) for c in range(ord("a"), ord("z") + 1)]  # Ġ: space, Ċ: newline
QWEN_WORDS = ["what", "this", "cat", "dog", "red", "and", "?", "."] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                    r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# The real Qwen2-VL chat template, shortened (no vision ids, no videos by URL) and with a
# lower-case default system prompt the tiny vocabulary spells.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The tiny image processor: 4-pixel patches, 2 x 2 merged, images resized to multiples of 8 pixels
# between 8 x 8 and 32 x 32 (1 to 16 visual tokens).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 8 * 8, 32 * 32


def qwen_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (token -> id) and merges of the tiny Qwen tokenizer; the ids left over
    below QWEN_VOCAB are two-letter words " xy" (also one token each)."""
    free = iter([i for i in range(QWEN_VOCAB) if i not in QWEN_SPECIAL.values()])
    vocab = dict(QWEN_SPECIAL) | {symbol: next(free) for symbol in QWEN_SYMBOLS}
    merges = []

    def add_word(word: str) -> bool:
        """Add the merges of "Ġ" + word; False when the ids ran out."""
        token = "Ġ"
        for char in word:
            if token + char not in vocab:
                new_id = next(free, None)
                if new_id is None:
                    return False
                merges.append((token, char))
                vocab[token + char] = new_id
            token += char
        return True

    for word in QWEN_WORDS:
        add_word(word)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pairs = (first + second for first in letters for second in letters)
    while add_word(next(pairs)):
        pass
    return vocab, merges


def tiny_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Qwen's tokenizer pipeline over the tiny vocabulary (see ``qwen_vocabulary``)."""
    vocab, merges = qwen_vocabulary()
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>",
                              additional_special_tokens=[t for t in QWEN_SPECIAL if t != "<|endoftext|>"])


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which needs torchvision (not installed
    here): every image and text path is Qwen2VLProcessor's own."""

    attributes = ["image_processor", "tokenizer"]  # transformers 4.x; 5.x reads __init__'s arguments

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class _TinyQwen2VLProcessorKey(PretrainedConfig):
    """Only registers TinyQwen2VLProcessor's name with AutoProcessor (which finds a saved
    processor by the class name in its processor_config.json)."""

    model_type = "tiny-qwen2-vl-processor"


AutoProcessor.register(_TinyQwen2VLProcessorKey, TinyQwen2VLProcessor)


def tiny_qwen_processor(merge_size: int = QWEN_MERGE) -> TinyQwen2VLProcessor:
    """A Qwen2-VL processor for the tiny Qwen targets: their patch geometry (``merge_size`` other
    than theirs makes a misconfigured one), Qwen's chat template and tokenizer pipeline."""
    images = Qwen2VLImageProcessor(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, merge_size=merge_size,
                                   min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return TinyQwen2VLProcessor(image_processor=images, tokenizer=tiny_qwen_tokenizer(),
                                chat_template=QWEN_CHAT_TEMPLATE)
