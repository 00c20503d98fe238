"""Typed, validated entry points of the msd ops.

Each function checks its arguments (raising ``TypeError``/``ValueError`` that name the
argument) and runs either the compiled op ``torch.ops.msd.<name>`` (C++ on CPU, CUDA on
GPU) or its pure-PyTorch reference. The backend is chosen explicitly, never silently:
the ``backend=`` argument, else the ``MSD_KERNELS_BACKEND`` environment variable
(``compiled``, the default, or ``reference``). One documented exception within
``compiled``: CUDA tree attention on inputs its kernel is not specialised for (float32,
head dims other than 64/80/96/128) runs :func:`msd_kernels.composite.tree_attention_sdpa`.

Semantics of every op: :mod:`msd_kernels.reference`.
"""

from __future__ import annotations

import os

import torch

from msd_kernels import _checks, composite, reference
from msd_kernels._checks import FLOAT_DTYPES

BACKENDS = ("compiled", "reference")
# Limits shared by every implementation (the CUDA kernels size shared memory by them).
MAX_TOP_K = 64
MAX_TREE_TOKENS = 1024  # T + 1
MAX_POOL_SIZE = 16384

_I64 = (torch.int64,)
_I32 = (torch.int32,)
_F32 = (torch.float32,)


def default_backend() -> str:
    """The backend named by ``MSD_KERNELS_BACKEND`` (default ``compiled``)."""
    backend = os.environ.get("MSD_KERNELS_BACKEND", "compiled")
    if backend not in BACKENDS:
        raise ValueError(f"MSD_KERNELS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def _use_reference(backend: str | None) -> bool:
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "compiled":
        from msd_kernels import _loader

        _loader.load_library()
    return backend == "reference"


def pool_size(top_k: int, depth: int) -> int:
    """Candidates in the pool of a tree with ``depth`` expansion steps: k + depth*k*k."""
    return top_k + depth * top_k * top_k


def new_tree_pool(
    batch: int, top_k: int, depth: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty candidate pool ``(tokens, scores, parents)``, each ``[batch, pool_size]``."""
    size = pool_size(top_k, depth)
    return (
        torch.zeros(batch, size, dtype=torch.int64, device=device),
        torch.full((batch, size), float("-inf"), dtype=torch.float32, device=device),
        torch.full((batch, size), -1, dtype=torch.int64, device=device),
    )


# --------------------------------------------------------------------------- op 1
def tree_expand(
    logits: torch.Tensor,
    frontier_scores: torch.Tensor,
    frontier_pool_index: torch.Tensor,
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    pool_offset: int,
    top_k: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One depth step of the dynamic draft tree (see :func:`reference.tree_expand`).

    Args:
        logits: ``[B, n, V]`` float32/float16/bfloat16 draft logits of the frontier.
        frontier_scores: ``[B, n]`` float32 cumulative log-probabilities.
        frontier_pool_index: ``[B, n]`` int64 pool index of each frontier node, -1 = root.
        pool_tokens, pool_scores, pool_parents: ``[B, P]`` int64/float32/int64,
            contiguous; slots ``pool_offset .. pool_offset + n*top_k`` are written.
        pool_offset: first slot written, ``0 <= pool_offset <= P - n*top_k``.
        top_k: children per node and next frontier size, ``1 <= top_k <= min(V, 64)``.

    Returns:
        ``(frontier_tokens int64, frontier_scores float32, frontier_pool_index int64)``,
        each ``[B, top_k]``, best first.
    """
    logits = _checks.tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    batch, n, vocab = logits.shape
    device = logits.device
    _checks.tensor("frontier_scores", frontier_scores, shape=(batch, n), dtypes=_F32, device=device)
    _checks.tensor("frontier_pool_index", frontier_pool_index, shape=(batch, n), dtypes=_I64, device=device)
    _checks.tensor("pool_tokens", pool_tokens, ndim=2, dtypes=_I64, device=device, contiguous=True)
    size = pool_tokens.shape[1]
    _checks.tensor("pool_tokens", pool_tokens, shape=(batch, size))
    _checks.tensor("pool_scores", pool_scores, shape=(batch, size), dtypes=_F32, device=device, contiguous=True)
    _checks.tensor("pool_parents", pool_parents, shape=(batch, size), dtypes=_I64, device=device, contiguous=True)
    _checks.integer("top_k", top_k, low=1, high=min(vocab, MAX_TOP_K))
    _checks.integer("pool_offset", pool_offset, low=0, high=size - n * top_k)
    if _use_reference(backend):
        return reference.tree_expand(
            logits, frontier_scores, frontier_pool_index, pool_tokens, pool_scores, pool_parents,
            pool_offset, top_k,
        )
    return torch.ops.msd.tree_expand(
        logits, frontier_scores, frontier_pool_index, pool_tokens, pool_scores, pool_parents,
        pool_offset, top_k,
    )


def tree_assemble(
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    root_token: torch.Tensor,
    num_nodes: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``num_nodes`` best candidates and build the tree (see :func:`reference.tree_assemble`).

    Args:
        pool_tokens, pool_scores, pool_parents: ``[B, P]`` int64/float32/int64.
        root_token: ``[B]`` int64.
        num_nodes: T, ``1 <= T <= P`` and ``T + 1 <= 1024``.

    Returns:
        ``(tokens, depth, parent, mask, first_child, next_sibling)``: ``[B, T+1]`` int64
        each, except ``mask`` ``[B, T+1, ceil((T+1)/64)]`` int64 (packed ancestors).
    """
    _checks.tensor("pool_tokens", pool_tokens, ndim=2, dtypes=_I64)
    batch, size = pool_tokens.shape
    device = pool_tokens.device
    _checks.tensor("pool_scores", pool_scores, shape=(batch, size), dtypes=_F32, device=device)
    _checks.tensor("pool_parents", pool_parents, shape=(batch, size), dtypes=_I64, device=device)
    _checks.tensor("root_token", root_token, shape=(batch,), dtypes=_I64, device=device)
    if size > MAX_POOL_SIZE:
        raise ValueError(f"pool_tokens: pool size {size} exceeds the maximum {MAX_POOL_SIZE}")
    _checks.integer("num_nodes", num_nodes, low=1, high=min(size, MAX_TREE_TOKENS - 1))
    if _use_reference(backend):
        return reference.tree_assemble(pool_tokens, pool_scores, pool_parents, root_token, num_nodes)
    return torch.ops.msd.tree_assemble(pool_tokens, pool_scores, pool_parents, root_token, num_nodes)


# --------------------------------------------------------------------------- op 2
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
    tree_len: int | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Tree-masked (or causal-chunk) attention over a static KV cache.

    See :func:`reference.tree_attention`. ``q`` ``[B, Hq, Q, D]``; ``k_cache``/``v_cache``
    ``[B, Hkv, S_max, D]`` (same dtype as ``q``, ``Hq % Hkv == 0``, ``Q <= S_max``, the
    tree section's K/V already at ``prefix_len .. prefix_len + tree_len - 1``, the queries'
    own rows last); ``prefix_len`` ``[B]`` int32; ``tree_mask``
    ``[B, Q, ceil(tree_len/64)]`` int64 or None (causal); ``tree_len`` an int in
    ``[Q, S_max]``, default ``Q`` (the queries are the whole tree section).
    Returns ``[B, Hq, Q, D]`` in ``q``'s dtype.

    On CUDA the hand-written kernel serves float16/bfloat16 with head_dim 64/80/96/128;
    other inputs run the sync-free SDPA composition in :mod:`msd_kernels.composite`.
    """
    q = _checks.tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    batch, num_q_heads, num_new, head_dim = q.shape
    device = q.device
    _checks.tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
    _, num_kv_heads, max_len, _ = k_cache.shape
    _checks.tensor("k_cache", k_cache, shape=(batch, None, None, head_dim))
    _checks.tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtypes=(q.dtype,), device=device)
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"k_cache: query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    if num_new == 0:
        raise ValueError("q: needs at least one query (q.shape[2] >= 1)")
    if num_new > max_len:
        raise ValueError(f"q: {num_new} new tokens do not fit in a cache of {max_len} rows (k_cache)")
    # The queries are the last Q rows of the tree section, which must fit in the cache.
    tree_rows = num_new if tree_len is None else _checks.integer("tree_len", tree_len, low=num_new, high=max_len)
    _checks.tensor("prefix_len", prefix_len, shape=(batch,), dtypes=_I32, device=device)
    if tree_mask is not None:
        words = reference.mask_words(tree_rows)
        _checks.tensor("tree_mask", tree_mask, shape=(batch, num_new, words), dtypes=_I64, device=device)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if _use_reference(backend):
        _check_fits("prefix_len", prefix_len, tree_rows, max_len)
        return reference.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, scale, tree_len)
    if q.is_cuda and not composite.cuda_attention_kernel_covers(q):
        return composite.tree_attention_sdpa(q, k_cache, v_cache, prefix_len, tree_mask, scale, tree_len)
    return torch.ops.msd.tree_attention(
        q, k_cache, v_cache, prefix_len, tree_mask, None if scale is None else float(scale), tree_len
    )


def _check_fits(name: str, prefix_len: torch.Tensor, extra: int, max_len: int) -> None:
    """Reference backend only (eager): prefix_len + extra rows must fit in the cache."""
    if bool((prefix_len < 0).any()) or bool((prefix_len + extra > max_len).any()):
        raise ValueError(
            f"{name}: every prefix_len must be >= 0 and leave room for {extra} more rows in a "
            f"cache of {max_len}, got {prefix_len.tolist()}"
        )


# --------------------------------------------------------------------------- op 3
def kv_compact(
    kv_cache: torch.Tensor,
    accepted_index: torch.Tensor,
    num_accepted: torch.Tensor,
    prefix_len: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Move accepted K/V rows next to the prefix in all planes; advance ``prefix_len``.

    See :func:`reference.kv_compact`. ``kv_cache`` ``[N, B, H, S_max, D]`` contiguous
    (all layers' K and V planes); ``accepted_index`` ``[B, A]`` int64 (root first);
    ``num_accepted`` ``[B]`` int64 (< A); ``prefix_len`` ``[B]`` int32 (updated).
    """
    _checks.tensor("kv_cache", kv_cache, ndim=5, contiguous=True)
    batch, max_len = kv_cache.shape[1], kv_cache.shape[3]
    device = kv_cache.device
    _checks.tensor("accepted_index", accepted_index, ndim=2, dtypes=_I64, device=device)
    _checks.tensor("accepted_index", accepted_index, shape=(batch, None))
    _checks.tensor("num_accepted", num_accepted, shape=(batch,), dtypes=_I64, device=device)
    _checks.tensor("prefix_len", prefix_len, shape=(batch,), dtypes=_I32, device=device, contiguous=True)
    if _use_reference(backend):
        width = accepted_index.shape[1]
        if bool((num_accepted < 0).any()) or bool((num_accepted >= width).any()):
            raise ValueError(f"num_accepted: values must be in [0, {width - 1}], got {num_accepted.tolist()}")
        for b in range(batch):
            rows = accepted_index[b, : int(num_accepted[b]) + 1]
            prefix = int(prefix_len[b])
            if prefix < 0 or bool((rows < 0).any()) or bool((prefix + rows >= max_len).any()):
                raise ValueError(f"accepted_index: row {b} points outside the cache of {max_len} rows")
            if prefix + len(rows) > max_len:
                raise ValueError(f"prefix_len: sequence {b} would exceed the cache of {max_len} rows")
        reference.kv_compact(kv_cache, accepted_index, num_accepted, prefix_len)
        return
    torch.ops.msd.kv_compact(kv_cache, accepted_index, num_accepted, prefix_len)


# --------------------------------------------------------------------------- op 4
def _check_tree_links(
    name: str, rows: torch.Tensor, tree_tokens: torch.Tensor, first_child: torch.Tensor,
    next_sibling: torch.Tensor,
) -> None:
    batch, size = rows.shape[0], rows.shape[1]
    device = rows.device
    _checks.tensor("tree_tokens", tree_tokens, shape=(batch, size), dtypes=_I64, device=device)
    _checks.tensor("first_child", first_child, shape=(batch, size), dtypes=_I64, device=device)
    _checks.tensor("next_sibling", next_sibling, shape=(batch, size), dtypes=_I64, device=device)
    if size > MAX_TREE_TOKENS:
        raise ValueError(f"{name}: {size} tree tokens exceed the maximum {MAX_TREE_TOKENS}")


def verify_greedy(
    logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification (see :func:`reference.verify_greedy`).

    ``logits`` ``[B, T+1, V]`` float; tree tensors ``[B, T+1]`` int64. Returns
    ``(accepted_index [B, T+1], num_accepted [B], bonus_token [B])``, all int64.
    """
    _checks.tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    _check_tree_links("logits", logits, tree_tokens, first_child, next_sibling)
    if _use_reference(backend):
        return reference.verify_greedy(logits, tree_tokens, first_child, next_sibling)
    return torch.ops.msd.verify_greedy(logits, tree_tokens, first_child, next_sibling)


def verify_sampling(
    probs: torch.Tensor,
    tree_tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    rng_state: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless sampling verification (see :func:`reference.verify_sampling`).

    ``probs`` ``[B, T+1, V]`` float32 processed target probabilities; tree tensors
    ``[B, T+1]`` int64; ``rng_state`` ``[2]`` int64 ``(seed, offset)`` on the same device,
    whose offset is incremented in place. Returns as :func:`verify_greedy`.
    """
    _checks.tensor("probs", probs, ndim=3, dtypes=_F32)
    _check_tree_links("probs", probs, tree_tokens, first_child, next_sibling)
    _checks.tensor("rng_state", rng_state, shape=(2,), dtypes=_I64, device=probs.device, contiguous=True)
    if _use_reference(backend):
        return reference.verify_sampling(probs, tree_tokens, first_child, next_sibling, rng_state)
    return torch.ops.msd.verify_sampling(probs, tree_tokens, first_child, next_sibling, rng_state)
