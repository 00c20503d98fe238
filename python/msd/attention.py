"""One decoder layer's self-attention over msd's static cache, with the layer's own modules.

The projections are the layer's ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (whatever
they are: plain, quantised or adapter-wrapped linears), rotary embedding is applied as
Llama / Qwen2 do it (``x * cos + rotate_half(x) * sin``), and the attention itself is msd's
tree attention over the cache: each query sees the committed prefix and, for a tree, its
ancestors (``tree_mask``, ``tree_len``), or, for a plain chunk, the chunk causally
(``tree_mask=None``).
"""

from __future__ import annotations

import torch
from torch import nn

import msd_kernels
from msd.cache import StaticKVCache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (the RoPE pairing of Llama / Qwen2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, Q, D]`` by ``cos`` / ``sin`` ``[B, Q, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def project_qkv(attn: nn.Module, hidden: torch.Tensor, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[B, Hq, Q, D]`` and keys ``[B, Hkv, Q, D]`` (both rotated) and values
    ``[B, Hkv, Q, D]`` of ``hidden`` ``[B, Q, H]``."""
    batch, length, _ = hidden.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, -1, head_dim).transpose(1, 2)

    queries, keys, values = heads(attn.q_proj(hidden)), heads(attn.k_proj(hidden)), heads(attn.v_proj(hidden))
    return apply_rotary(queries, cos, sin), apply_rotary(keys, cos, sin), values


def cached_self_attention(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache: StaticKVCache, layer: int, *, head_dim: int, scaling: float,
                          tree_mask: torch.Tensor | None = None, tree_len: int | None = None) -> torch.Tensor:
    """Self-attention output ``[B, Q, H]`` of ``hidden`` ``[B, Q, H]``, whose K/V rows are
    written to ``cache`` at ``prefix_len + write_offset``.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
        cos, sin: ``[B, Q, D]`` rotary tables at the chunk's positions.
        tree_mask: ``[B, Q, ceil(tree_len/64)]`` int64 packed mask over the rows after the
            prefix, or None for a causal chunk.
        tree_len: rows after the prefix the queries may see through the mask, the queries being
            the last Q of them (the draft's tree levels see their ancestors among earlier
            levels); None for Q (the queries are the whole tree).
    """
    batch, length, _ = hidden.shape
    queries, keys, values = project_qkv(attn, hidden, head_dim, cos, sin)
    key_buffer, value_buffer = cache.write(layer, keys, values)
    out = msd_kernels.tree_attention(queries, key_buffer, value_buffer, cache.prefix_len, tree_mask, scaling,
                                     tree_len=tree_len)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
