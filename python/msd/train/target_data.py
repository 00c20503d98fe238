"""What the training data of a target family looks like: the prompt template and the check of
a processed image against the target's vision tower. The trainer, ``msd features`` and the
training-time evaluation take both from here, so the three agree.

- LLaVA-1.5 / LLaVA-NeXT (:class:`msd.targets.LlavaAdapter`): the ``llava_v1`` template with
  an empty system prompt, the released MSD drafts' (MSD_SPEC.md 4); a processed image (or each
  tile of one) must have the vision tower's input size, else the processor expands it into
  another number of image tokens than the tower produces (a processor without its center crop
  gives a wide image twice the tokens of a square one).
- Qwen2-VL / Qwen2.5-VL (:class:`msd.targets.Qwen2VLAdapter`): the processor's chat template,
  the answer spans found exactly (:class:`msd.train.chat_template.ChatTemplate`, MSD_SPEC.md
  6); the processed patches must have the vision tower's patch layout and the processor's
  image tokens must be the tower's merged patches (grid t * h * w / spatial_merge_size ** 2).

Both checks read only the target's config, not the processor's own arithmetic, so a processor
that disagrees with the model is caught before its sample reaches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from msd.targets import ADAPTERS, Qwen2VLAdapter
from msd.train.chat_template import ChatTemplate
from msd.train.template import BadSample, render_llava_v1

ImageCheck = Callable[[Mapping[str, torch.Tensor], int], None]


def _uses_chat_template(config) -> bool:
    """Whether the target family trains on its processor's chat template (Qwen2-VL / 2.5-VL)."""
    if config.model_type not in ADAPTERS:
        raise ValueError(f"target: model_type {config.model_type!r} is not a supported family; "
                         f"supported model types: {', '.join(sorted(ADAPTERS))}")
    return issubclass(ADAPTERS[config.model_type], Qwen2VLAdapter)


def prompt_template(config, processor) -> Callable[[list], list[tuple[str, bool]]]:
    """The renderer of the target's training prompts (conversation -> ``[(text, is_answer)]``)
    for the target of ``config`` (its ``PretrainedConfig``) and its ``processor``."""
    if not _uses_chat_template(config):
        return render_llava_v1
    try:
        return ChatTemplate(processor)
    except ValueError as error:
        raise ValueError(f"{config.model_type} targets train on their processor's chat template: {error}") from None


def image_check(config) -> ImageCheck:
    """``check(processed, image_tokens)`` for one processed image of the target of ``config``:
    ``processed`` is the processor's output for the sample, ``image_tokens`` the image tokens
    it put in ``input_ids``. Raises BadSample when the target's vision tower would not produce
    that many tokens from those pixels."""
    vision = config.vision_config
    if not _uses_chat_template(config):
        size = (vision.image_size, vision.image_size)

        def check_size(processed: Mapping[str, torch.Tensor], image_tokens: int) -> None:
            made = tuple(processed["pixel_values"].shape[-2:])
            if made != size:
                raise BadSample("image size mismatch", f"the processor made {made[0]}x{made[1]} images, the vision "
                                                       f"tower takes {size[0]}x{size[1]}")

        return check_size

    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    merged = vision.spatial_merge_size ** 2

    def check_patches(processed: Mapping[str, torch.Tensor], image_tokens: int) -> None:
        values = processed["pixel_values"].shape[-1]
        if values != patch_values:
            raise BadSample("image patch mismatch", f"the processor made patches of {values} values, the vision "
                                                    f"tower takes {patch_values}")
        model_tokens = int(processed["image_grid_thw"].prod(-1).sum()) // merged
        if image_tokens != model_tokens:
            raise BadSample("image token count mismatch",
                            f"the processor gave {image_tokens} image tokens, the model takes {model_tokens}")

    return check_patches
