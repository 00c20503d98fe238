"""Sync-free PyTorch compositions of an op, for inputs its hand-written kernel does not cover.

The CUDA tree attention kernel is specialised for the shapes that matter for speed
(float16/bfloat16, head_dim 64/80/96/128). Other inputs on CUDA (a float32 target, a tiny
test model's head_dim 16) still get the op's exact semantics here, from PyTorch's SDPA
with a dense mask over the whole cache: slower, but with no host sync and no
data-dependent shapes, so it is safe inside CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msd_kernels.reference import tree_visibility

CUDA_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
CUDA_ATTENTION_HEAD_DIMS = (64, 80, 96, 128)


def cuda_attention_kernel_covers(q: torch.Tensor) -> bool:
    """Whether the CUDA tree attention kernel serves queries like ``q`` ``[B, Hq, Q, D]``."""
    return q.dtype in CUDA_ATTENTION_DTYPES and q.shape[-1] in CUDA_ATTENTION_HEAD_DIMS


def tree_attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
    tree_len: int | None = None,
) -> torch.Tensor:
    """:func:`msd_kernels.reference.tree_attention` as one SDPA call over all ``S_max`` rows.

    Shapes as the reference: ``q`` ``[B, Hq, Q, D]``, caches ``[B, Hkv, S_max, D]``,
    ``prefix_len`` ``[B]`` int32, ``tree_mask`` ``[B, Q, ceil(tree_len/64)]`` int64 or
    None, ``tree_len`` (default ``Q``) the rows of the tree section, whose last Q are the
    queries. Unlike the kernels, it reads the unused cache rows (with weight 0), so they
    must be finite, as a cache's zero-initialised or stale rows are.
    """
    batch, num_q_heads, num_new, _ = q.shape
    max_len = k_cache.shape[2]
    tree_len = num_new if tree_len is None else tree_len
    allowed_tree = tree_visibility(tree_mask, batch, num_new, tree_len, q.device)  # [B, Q, tree_len]
    # Each cache row's position relative to its sequence's first tree row: < 0 is prefix,
    # 0 .. tree_len-1 is a tree row (seen where the mask allows), >= tree_len is unused.
    relative = torch.arange(max_len, device=q.device) - prefix_len.to(torch.int64)[:, None]  # [B, S_max]
    is_tree = (relative >= 0) & (relative < tree_len)
    tree_columns = relative.clamp(0, tree_len - 1)[:, None, :].expand(batch, num_new, max_len)
    allowed = (relative < 0)[:, None, :] | (allowed_tree.gather(2, tree_columns) & is_tree[:, None, :])  # [B, Q, S]
    out = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=allowed[:, None], scale=scale,
        enable_gqa=num_q_heads != k_cache.shape[1],
    )
    # SDPA leaves rows that see nothing as NaN; the op's contract makes them zeros.
    return out.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)
