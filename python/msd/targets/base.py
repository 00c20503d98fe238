"""What msd needs of a target model, whatever its family: :class:`TargetAdapter`.

An adapter knows a family's visual placeholder ids, how the prompt's text-model inputs are
built and how positions work. It never rebuilds what the model computes: the prompt goes
through the model's own multimodal forward, and the text model's inputs (embeddings with the
visual features spliced in, and the positions the model chose) are captured at the text
model's door (:func:`capture_text_model_inputs`), before any text layer runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from msd.cache import StaticKVCache
from msd.decoder import TextDecoder


class _Captured(Exception):
    """Raised by the capture hook to stop the target's forward at its text model."""


def capture_text_model_inputs(model: nn.Module, text_model: nn.Module, **model_inputs) -> dict:
    """Run ``model(**model_inputs)`` up to the call of ``text_model``; return the keyword
    arguments that call received (``inputs_embeds``, ``position_ids``, ...). No text layer runs."""
    captured: dict = {}

    def stop(module, args, kwargs):
        captured.update(kwargs, positional=args)
        raise _Captured

    handle = text_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**model_inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its text model")
    if captured["positional"] or captured.get("inputs_embeds") is None:
        raise RuntimeError(f"{type(model).__name__} called its text model without inputs_embeds=: "
                           "this transformers release is not supported")
    return captured


# Forward arguments msd sets itself (or that make no sense for generation); the target's other
# named forward arguments are the multimodal inputs generate() passes on (pixel_values, ...).
_ENGINE_OWNED = frozenset({
    "self", "input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "inputs_embeds", "labels",
    "use_cache", "logits_to_keep", "cache_position", "output_attentions", "output_hidden_states", "return_dict",
    "rope_deltas", "mm_encoder_outputs", "kwargs",
})


def model_input_names(model: nn.Module) -> tuple[str, ...]:
    """The multimodal inputs ``model``'s forward takes by name (``pixel_values``, ``image_sizes``,
    ``image_grid_thw``, ...): what its ``generate`` accepts besides ``input_ids`` / ``attention_mask``."""
    return tuple(name for name in inspect.signature(model.forward).parameters if name not in _ENGINE_OWNED)


@dataclass
class PromptInputs:
    """The text model's inputs for one prompt of ``L`` tokens, as the target's forward built them."""

    embeds: torch.Tensor  # [1, L, H] token embeddings, visual features spliced in
    position_ids: torch.Tensor  # what the adapter's rotary takes: [1, L], or [3, 1, L] for M-RoPE
    # int64, what :meth:`TargetAdapter.positions` adds to a later token's plain index: [1] for
    # 1-D positions (zeros), [3, 1] for M-RoPE (one offset per axis).
    rope_delta: torch.Tensor


class TargetAdapter:
    """Base of the per-family adapters: the text model's modules and the decoder over them.

    Subclasses set :attr:`visual_inputs` (placeholder id -> the input that carries its
    pixels) and implement :meth:`rotary`, :meth:`row_inputs` and :meth:`positions`.
    :attr:`input_names` are the multimodal inputs ``generate`` takes besides ``input_ids`` /
    ``attention_mask``: the target's named forward arguments (:func:`model_input_names`).
    """

    family: str = ""
    rope_axes: int = 1  # position axes of the rotary embedding (3 for M-RoPE)

    def __init__(self, model: nn.Module, text_model: nn.Module):
        self.model, self.text_model = model, text_model
        self.text_config = model.config.get_text_config()
        text = self.text_config
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        layers = list(text_model.layers)
        scaling = getattr(layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        self.decoder = TextDecoder(layers, text_model.norm, self.rotary, self.head_dim, scaling)
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.visual_inputs: dict[int, str] = {}
        self.input_names = model_input_names(model)

    # ------------------------------------------------------------------ per family
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin ``[B, Q, D]`` at ``position_ids`` (as :meth:`positions` makes them)."""
        raise NotImplementedError

    def prompt_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    **visual_inputs) -> list[PromptInputs]:
        """The text model's inputs for each prompt of the batch, without its padding (batch 1
        each), from one call of the model's own forward on the whole batch. Prompts are
        left-padded, as processors pad for generation."""
        captured = capture_text_model_inputs(self.model, self.text_model, input_ids=input_ids,
                                             attention_mask=attention_mask, use_cache=False, **visual_inputs)
        lengths = (attention_mask.sum(1).tolist() if attention_mask is not None
                   else [input_ids.shape[1]] * input_ids.shape[0])
        return [self.row_inputs(captured, row, input_ids.shape[1] - length) for row, length in enumerate(lengths)]

    def row_inputs(self, captured: dict, row: int, start: int) -> PromptInputs:
        """Sequence ``row``'s inputs from the captured text-model inputs of the batch; its prompt
        starts at ``start`` (after its left padding)."""
        raise NotImplementedError

    def positions(self, plain_positions: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        """Position ids for the decoder of tokens after the prompt at ``plain_positions``
        ``[B, Q]`` (their index in the sequence; tree nodes: prefix length + depth)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: True where the id is a visual placeholder (image or video)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.visual_inputs:
            mask |= input_ids == token_id
        return mask

    def check_visual_inputs(self, input_ids: torch.Tensor, model_inputs: dict) -> None:
        """``ValueError`` when placeholders and pixel inputs do not come together."""
        for token_id, name in self.visual_inputs.items():
            count = int((input_ids == token_id).sum())
            if count and model_inputs.get(name) is None:
                raise ValueError(f"input_ids hold {count} visual tokens (id {token_id}) but {name} is None")
            if model_inputs.get(name) is not None and not count:
                raise ValueError(f"{name} given but input_ids hold no visual token (id {token_id})")

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        """A static cache for ``batch`` sequences of up to ``max_len`` rows, in the target's dtype."""
        text = self.text_config
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return StaticKVCache(len(self.decoder.layers), batch, num_kv_heads, max_len, self.head_dim, self.dtype,
                             self.device)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ``ValueError`` if the target cannot attend over the whole sequence as msd does."""
        total = prompt_len + max_new_tokens
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            raise ValueError(f"input_ids ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                             f"target's max_position_embeddings ({limit})")
        window = getattr(self.text_config, "sliding_window", None)
        if window is not None and getattr(self.text_config, "use_sliding_window", True) and total > window:
            raise NotImplementedError(
                f"input_ids ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceed the target's "
                f"sliding_window ({window}); msd's attention sees the whole sequence")
