"""The ``llava_v1`` conversation template and its answer-only loss mask (MSD_SPEC.md section 4).

The prompt is the released LLaVA ``llava_v1`` template (separator style TWO: ``sep=" "``,
``sep2="</s>"``) with an EMPTY system prompt, written without LLaVA's leading separator so
that it is byte-identical to the prompts given to the HF LLaVA processors at inference::

    USER: <image>\\nWhat is this? ASSISTANT: A cat.</s>USER: And this? ASSISTANT: A dog.</s>

How the loss mask is made exact: the prompt is tokenized ONCE as a whole, exactly as the target
sees it, and a token is an answer token when its character span (the fast tokenizer's offset
mapping) overlaps an answer's characters. Tokenizing segment by segment and concatenating would
not reproduce the target's tokens for SentencePiece (Llama) tokenizers: each piece gets its own
dummy-prefix "▁" and loses merges across the boundary, which is the source of the "tokenization
mismatch" warnings of the LLaVA training code. An answer is ``" " + message + "</s>"``: the
space after ``ASSISTANT:`` belongs to the answer because at inference the prompt ends with
``ASSISTANT:`` and the target generates that space (Llama: inside the ``"▁word"`` token), and
the closing ``</s>`` is trained on as in LLaVA. BOS, the ``USER: ... ASSISTANT:`` parts and the
``<image>`` placeholder are never in the mask.
"""

from __future__ import annotations

import torch

USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"
IMAGE_PLACEHOLDER = "<image>"

# ShareGPT ("human"/"gpt"), OpenAI-style ("user"/"assistant") and "system" turn roles.
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": None}


class BadSample(ValueError):
    """A record that cannot be trained on; ``reason`` is a short key (the training data counts
    skipped records by it), the message adds the details."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _turns(conversation) -> list[tuple[int, str, str]]:
    """``(index, role, text)`` of each USER/ASSISTANT turn; raises BadSample on a malformed turn."""
    if not isinstance(conversation, list):
        raise BadSample("no conversations", f"a JSON {type(conversation).__name__} instead of a list")
    turns = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("bad turn", f"turn {index} has no text 'value'")
        if turn.get("from") not in _ROLES:
            raise BadSample("bad turn", f"turn {index} has an unknown role {turn.get('from')!r}")
        role = _ROLES[turn["from"]]
        if role is not None:
            turns.append((index, role, turn["value"]))
    return turns


def dialogue(conversation) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs of a ShareGPT/LLaVA ``conversations`` list.

    System turns are ignored; leading assistant turns (nothing to answer) and a trailing
    unanswered user turn (nothing to learn) are dropped, as in the LLaVA/FastChat
    preprocessing. Raises BadSample on a malformed turn, roles that do not alternate, an empty
    conversation or one without an answer.
    """
    turns = _turns(conversation)
    while turns and turns[0][1] == ASSISTANT:
        turns.pop(0)
    if turns and turns[-1][1] == USER:
        turns.pop()
    if not turns:
        raise BadSample("empty conversation" if not conversation else "no answer turn")
    for position, (index, role, _) in enumerate(turns):
        expected = USER if position % 2 == 0 else ASSISTANT
        if role != expected:
            raise BadSample("roles do not alternate", f"turn {index} is {role} where {expected} was expected")
    return [(question[2], answer[2]) for question, answer in zip(turns[::2], turns[1::2])]


def render_llava_v1(conversation) -> list[tuple[str, bool]]:
    """Render a ShareGPT/LLaVA ``conversations`` list as ``llava_v1`` text segments.

    Returns ``[(text, is_answer), ...]`` whose concatenation is the prompt: alternately
    ``"USER: {question} ASSISTANT:"`` (False) and ``" {answer}</s>"`` (True), over the turns
    :func:`dialogue` keeps (it raises BadSample on a bad conversation).
    """
    segments = []
    for question, answer in dialogue(conversation):
        segments += [(f"{USER}: {question}{SEP}{ASSISTANT}:", False), (f" {answer}{SEP2}", True)]
    return segments


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize the concatenated ``segments`` (with the tokenizer's special tokens, e.g. BOS).

    Returns ``input_ids`` int64 ``[L]`` and ``loss_mask`` bool ``[L]``, True on the tokens whose
    characters overlap an ``is_answer`` segment. Needs a fast tokenizer (offset mapping).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_segments needs a fast tokenizer (it uses the offset mapping)")
    text, answer_spans, start = "", [], 0
    for piece, is_answer in segments:
        text += piece
        if is_answer:
            answer_spans.append((start, start + len(piece)))
        start += len(piece)
    encoding = tokenizer(text, return_offsets_mapping=True)
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.int64)
    offsets = torch.tensor(encoding["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
    token_start, token_end = offsets[:, 0], offsets[:, 1]
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for span_start, span_end in answer_spans:
        loss_mask |= (token_end > span_start) & (token_start < span_end)
    # Special tokens added by the tokenizer (BOS) have an empty span and stay out of the mask.
    loss_mask &= token_end > token_start
    return input_ids, loss_mask


def tokenize_conversation(conversation, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``llava_v1`` prompt of ``conversation`` tokenized: ``input_ids`` int64 ``[L]`` and the
    answer-only ``loss_mask`` bool ``[L]`` (see the module docstring)."""
    return tokenize_segments(render_llava_v1(conversation), tokenizer)
