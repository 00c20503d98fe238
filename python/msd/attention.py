"""msd's tree attention as a Hugging Face attention implementation.

Registered with ``transformers.AttentionInterface`` under :data:`ATTENTION_NAME`. The
engine switches a model's text attention to it only for its own forward calls
(:func:`tree_attention_mode`), so the target keeps working unchanged elsewhere (e.g. for
its own ``generate``). The K/V passed in are the whole static cache buffers returned by
:class:`msd.cache.StaticKVCache`; where the new tokens sit and what they see come from
the keyword arguments the engine passes through the model's forward:

- ``msd_prefix_len``: ``[B]`` int32, rows already in the cache before this chunk;
- ``msd_tree_mask``: ``[B, Q, ceil(Q/64)]`` int64 packed tree mask, or None (causal chunk);
- ``msd_dense_mask``: ``[B, Q, S_max]`` bool, instead of the two above, for queries that
  are not the last rows written (the draft's tree levels: each sees its ancestors among
  earlier levels). The draft is one small layer, so PyTorch's SDPA serves it.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

import msd_kernels

ATTENTION_NAME = "msd_tree"


def msd_tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    msd_prefix_len: torch.Tensor | None = None,
    msd_tree_mask: torch.Tensor | None = None,
    msd_dense_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query ``[B, Hq, Q, D]``, key/value ``[B, Hkv, S_max, D]`` -> ``([B, Q, Hq, D], None)``."""
    if msd_dense_mask is not None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=msd_dense_mask.unsqueeze(1), scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2), None
    if msd_prefix_len is None:
        raise RuntimeError(
            f"the {ATTENTION_NAME!r} attention needs msd_prefix_len: it only runs inside msd's engine"
        )
    out = msd_kernels.tree_attention(query, key, value, msd_prefix_len, msd_tree_mask, scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, msd_tree_attention)


@contextlib.contextmanager
def tree_attention_mode(config):
    """Run the text model of ``config`` on msd's attention inside the block."""
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
