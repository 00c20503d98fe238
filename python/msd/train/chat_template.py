"""Training prompts in a processor's own chat template, with an exact answer-only loss mask
(Qwen2-VL / Qwen2.5-VL targets, MSD_SPEC.md 6).

A ShareGPT/LLaVA conversation becomes chat messages with content lists: a user turn's
``<image>`` placeholders become ``{"type": "image"}`` parts and the text between them
``{"type": "text"}`` parts, stripped of the whitespace around the placeholders (LLaVA data
writes ``"<image>\\nWhat is this?"``), which is exactly the message ``msd generate`` builds for
``--image x --prompt "What is this?"``. Answers are kept as they are.

Where the answers are: for the k-th answer the template renders the conversation up to the
k-th question with ``add_generation_prompt=True`` (what the model sees when it starts to
answer) and up to the k-th answer; the second must extend the first, and the difference is
what the model produces: the answer and the template's end of turn. The trailing whitespace
of that difference (Qwen's ``"\\n"`` after ``<|im_end|>``) is left out of the answer: the model
stops at its end-of-turn token, the separator after it belongs to the template. With Qwen's
template a turn therefore reads (``[...]`` the answer segment)::

    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\\n
    <|im_start|>assistant\\n[A cat.<|im_end|>]\\n

Everything else (system prompt, roles, questions, image placeholders) is out of the mask.
:func:`msd.train.template.tokenize_segments` then tokenizes the whole prompt once, as the
target sees it.
"""

from __future__ import annotations

from msd.train.template import IMAGE_PLACEHOLDER, BadSample, dialogue


def user_content(question: str) -> list[dict]:
    """A user turn's chat content parts: images where ``<image>`` was, the text between them
    stripped (empty pieces dropped)."""
    content = []
    for index, text in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if index:
            content.append({"type": "image"})
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
    return content


class ChatTemplate:
    """Renders conversations with ``processor``'s chat template into ``[(text, is_answer), ...]``
    segments (the format of :func:`msd.train.template.render_llava_v1`); see the module
    docstring. Raises BadSample on a bad conversation, or when the template renders a turn
    that does not extend the conversation before it (such a template cannot train this way)."""

    def __init__(self, processor):
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template")
        self.processor = processor

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, conversation) -> list[tuple[str, bool]]:
        messages, segments, rendered = [], [], ""
        for question, answer in dialogue(conversation):
            messages.append({"role": "user", "content": user_content(question)})
            prompt = self.render(messages, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            full = self.render(messages, add_generation_prompt=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise BadSample("chat template mismatch",
                                f"turn {len(messages) // 2}: the rendering does not extend the turns before it")
            reply = full[len(prompt):].rstrip()
            segments += [(prompt[len(rendered):], False), (reply, True)]
            rendered = prompt + reply
        if full[len(rendered):]:
            segments.append((full[len(rendered):], False))
        return segments
