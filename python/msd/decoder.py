"""msd's forward of a target's text model: the target's own layers, msd's cache and attention.

The layer loop is the pre-norm decoder that Llama, Mistral and Qwen2 share::

    h = h + o_proj(attention(input_layernorm(h)))
    h = h + mlp(post_attention_layernorm(h))

and the final norm at the end. Every module is the target's (so quantised or adapter-wrapped
linear layers keep working); only the attention is msd's (:mod:`msd.attention`), over a
:class:`~msd.cache.StaticKVCache`, at explicit positions. Which rotary tables the positions
select is the target family's business: the adapter passes a ``rotary`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from msd.attention import cached_self_attention
from msd.cache import StaticKVCache

# (hidden [B, Q, H] for the dtype, position ids) -> (cos, sin), each [B, Q, D].
Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TextShape:
    """What the cache needs to know of a text model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class TextDecoder:
    """Runs the decoder ``layers`` (each with ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm``, ``mlp``) and ``final_norm`` of a text model.

    Args:
        layers: the text model's decoder layers, in order.
        final_norm: its final norm (its output feeds the lm_head and is the draft's feature).
        rotary: cos/sin tables for the position ids the caller passes.
        head_dim: the attention head size; ``scaling`` the softmax scale (``head_dim ** -0.5``).
    """

    def __init__(self, layers: Sequence[nn.Module], final_norm: nn.Module, rotary: Rotary, head_dim: int,
                 scaling: float):
        self.layers, self.final_norm, self.rotary = list(layers), final_norm, rotary
        self.head_dim, self.scaling = head_dim, scaling

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache,
                 tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Post-norm hidden states ``[B, Q, H]`` of the chunk ``embeds`` ``[B, Q, H]``.

        Its K/V rows go to ``cache.prefix_len + ..``; each query attends to the committed
        prefix and, with ``tree_mask`` (``[B, Q, ceil(Q/64)]`` packed ancestors), to its tree
        ancestors, or without it to the chunk causally. The caller commits the rows
        (``cache.advance`` / ``cache.compact``).
        """
        return self.run(embeds, position_ids, cache, tree_mask)[0]

    def run(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache,
            tree_mask: torch.Tensor | None = None, capture: tuple[int, ...] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`__call__`, also returning the draft's features: with ``capture`` (hidden-state
        indices as Hugging Face's ``output_hidden_states`` counts them: i = the state entering
        layer i, the residual stream before its norm), those states concatenated ``[B, Q, len * H]``;
        without, the post-norm hidden states themselves."""
        cos, sin = self.rotary(embeds, position_ids)
        hidden, captured = embeds, []
        for index, layer in enumerate(self.layers):
            if capture is not None and index in capture:
                captured.append(hidden)
            hidden = hidden + cached_self_attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, cache, index,
                head_dim=self.head_dim, scaling=self.scaling, tree_mask=tree_mask)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if capture is not None and len(self.layers) in capture:  # the state after the last layer
            captured.append(hidden)
        hidden = self.final_norm(hidden)
        if capture is None:
            return hidden, hidden
        # In the order asked for (low, middle, high), each index once per occurrence.
        by_index = dict(zip(sorted(set(capture)), captured))
        return hidden, torch.cat([by_index[index] for index in capture], dim=-1)
