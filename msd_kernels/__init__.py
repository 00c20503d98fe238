"""msd_kernels: the kernels behind msd's speculative decoding.

Ops (semantics in :mod:`msd_kernels.reference`, registered as ``torch.ops.msd.*``):

- :func:`tree_expand`, :func:`tree_assemble`: fused draft-tree construction
- :func:`tree_attention`: tree-masked / causal-chunk attention over a static KV cache
- :func:`kv_compact`: move accepted K/V rows in every layer, advance ``prefix_len``
- :func:`verify_greedy`, :func:`verify_sampling`: tree verification and acceptance

The compiled extension is loaded (or built, on first use) lazily by the first op
call or by :func:`load_library`; ``MSD_KERNELS_BACKEND=reference`` runs the
pure-PyTorch reference instead.
"""

from msd_kernels import reference
from msd_kernels._loader import load_library
from msd_kernels.ops import (
    BACKENDS,
    MAX_POOL_SIZE,
    MAX_TOP_K,
    MAX_TREE_TOKENS,
    default_backend,
    kv_compact,
    new_tree_pool,
    pool_size,
    tree_assemble,
    tree_attention,
    tree_expand,
    verify_greedy,
    verify_sampling,
)
from msd_kernels.reference import mask_words, pack_mask, unpack_mask

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MAX_POOL_SIZE",
    "MAX_TOP_K",
    "MAX_TREE_TOKENS",
    "default_backend",
    "kv_compact",
    "load_library",
    "mask_words",
    "new_tree_pool",
    "pack_mask",
    "pool_size",
    "reference",
    "tree_assemble",
    "tree_attention",
    "tree_expand",
    "unpack_mask",
    "verify_greedy",
    "verify_sampling",
]
