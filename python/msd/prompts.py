"""Model inputs for one user turn about zero or more images, as ``msd generate`` builds them."""

from __future__ import annotations

# The LLaVA-1.5 conversation format, for processors that ship no chat template.
PLAIN_TEMPLATE = "USER: {images}{prompt} ASSISTANT:"


def encode_prompt(processor, prompt: str, images: list):
    """Model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) for one user turn
    holding ``images`` then ``prompt``, in the processor's chat template when it has one (Qwen2-VL,
    llava-hf), else in :data:`PLAIN_TEMPLATE`."""
    if getattr(processor, "chat_template", None) is not None:
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")
    text = PLAIN_TEMPLATE.format(images=f"{processor.image_token}\n" * len(images), prompt=prompt)
    return processor(images=images or None, text=text, return_tensors="pt")
