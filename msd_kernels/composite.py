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

from msd_kernels.reference import unpack_mask

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
) -> torch.Tensor:
    """:func:`msd_kernels.reference.tree_attention` as one SDPA call over all ``S_max`` rows.

    Shapes as the reference: ``q`` ``[B, Hq, Q, D]``, caches ``[B, Hkv, S_max, D]``,
    ``prefix_len`` ``[B]`` int32, ``tree_mask`` ``[B, Q, ceil(Q/64)]`` int64 or None.
    Unlike the kernels, it reads the unused cache rows (with weight 0), so they must be
    finite, as a cache's zero-initialised or stale rows are.
    """
    batch, num_q_heads, num_new, _ = q.shape
    max_len = k_cache.shape[2]
    if tree_mask is None:
        allowed_new = torch.ones(num_new, num_new, dtype=torch.bool, device=q.device).tril()
        allowed_new = allowed_new.expand(batch, num_new, num_new)
    else:
        allowed_new = unpack_mask(tree_mask, num_new)  # [B, Q, Q]
    # Each cache row's position relative to its sequence's first new row: < 0 is prefix,
    # 0 .. Q-1 is a new token (seen where the mask allows), >= Q is unused.
    relative = torch.arange(max_len, device=q.device) - prefix_len.to(torch.int64)[:, None]  # [B, S_max]
    is_new = (relative >= 0) & (relative < num_new)
    new_columns = relative.clamp(0, num_new - 1)[:, None, :].expand(batch, num_new, max_len)
    allowed = (relative < 0)[:, None, :] | (allowed_new.gather(2, new_columns) & is_new[:, None, :])  # [B, Q, S]
    out = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=allowed[:, None], scale=scale,
        enable_gqa=num_q_heads != k_cache.shape[1],
    )
    # SDPA leaves rows that see nothing as NaN; the op's contract makes them zeros.
    return out.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)
