"""Pure-PyTorch reference implementations: the readable specification of every op.

Each function here defines what the compiled kernels (C++ CPU in ``csrc/cpu``, CUDA in
``csrc/cuda``) must compute. They favour clarity over speed (Python loops over the
batch and over tree nodes are fine here) and are used by the tests as the oracle and,
on request, as a fallback backend (``MSD_KERNELS_BACKEND=reference``).

Conventions shared by all ops (see ARCHITECTURE.md):
- token ids, tree/pool indices, counts: int64; ``prefix_len``: int32.
- a tree of ``T + 1`` nodes has the root at index 0 and its nodes ordered so that a
  parent always comes before its children.
- packed masks: int64 words, bit ``j % 64`` of word ``j // 64`` in row ``i`` is set iff
  node ``j`` is node ``i`` or one of its ancestors.
- ties in every top-k/sort are broken towards the lower index (stable sorts).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "mask_words",
    "pack_mask",
    "unpack_mask",
    "philox_uniform",
    "tree_expand",
    "tree_assemble",
    "tree_visibility",
    "tree_attention",
    "kv_compact",
    "verify_greedy",
    "verify_sampling",
]


# --------------------------------------------------------------------------- masks
def mask_words(num_tokens: int) -> int:
    """Number of 64-bit words per row of a packed mask over ``num_tokens`` tokens."""
    return (num_tokens + 63) // 64


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask ``[..., N]`` into int64 words ``[..., ceil(N / 64)]``."""
    n = mask.shape[-1]
    words = mask_words(n)
    padded = torch.zeros(*mask.shape[:-1], words * 64, dtype=torch.bool, device=mask.device)
    padded[..., :n] = mask
    bits = padded.reshape(*mask.shape[:-1], words, 64).to(torch.int64)
    # 1 << 63 wraps to the sign bit of int64, which is exactly the bit pattern we want.
    weights = torch.ones(64, dtype=torch.int64, device=mask.device) << torch.arange(
        64, device=mask.device
    )
    return (bits * weights).sum(-1)


def unpack_mask(packed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: int64 words ``[..., W]`` -> bool ``[..., num_tokens]``."""
    shifts = torch.arange(64, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :num_tokens].bool()


# --------------------------------------------------------------------------- random
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox_uniform(seed: int, offset: int, row: int, draw: int) -> float:
    """Uniform float32 in [0, 1) from Philox4x32-10; identical to ``msd/philox.h``.

    counter = (draw, row, offset_lo, offset_hi), key = (seed_lo, seed_hi); the first
    output word's top 24 bits give the number (exactly representable in float32).
    """
    c = [draw & _U32, row & _U32, offset & _U32, (offset >> 32) & _U32]
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        p0 = _PHILOX_M0 * c[0]
        p1 = _PHILOX_M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & _U32, p1 & _U32, ((p0 >> 32) ^ c[3] ^ k1) & _U32, p0 & _U32]
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return (c[0] >> 8) * (1.0 / 16777216.0)


# --------------------------------------------------------------------------- op 1
def _stable_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending, ties towards the lower index."""
    sorted_values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], order[..., :k]


def tree_expand(
    logits: torch.Tensor,
    frontier_scores: torch.Tensor,
    frontier_pool_index: torch.Tensor,
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    pool_offset: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One depth step of the EAGLE-2 dynamic tree.

    Args:
        logits: ``[B, n, V]`` draft logits of the ``n`` frontier nodes (n = 1 for the
            first step, whose only "frontier node" is the root).
        frontier_scores: ``[B, n]`` float32 cumulative log-probabilities of the frontier
            (0 for the root).
        frontier_pool_index: ``[B, n]`` int64 pool index of each frontier node (-1 for
            the root).
        pool_tokens / pool_scores / pool_parents: ``[B, P]`` int64 / float32 / int64
            candidate pool, written in place at ``pool_offset .. pool_offset + n*top_k``:
            candidate ``c`` (0-based rank) of frontier node ``i`` goes to
            ``pool_offset + i * top_k + c``, its parent is ``frontier_pool_index[:, i]``.
        pool_offset: first pool slot of this step (k + (step-1)*k*k for step >= 1).
        top_k: children per node and size of the next frontier.

    Returns:
        ``(frontier_tokens, frontier_scores, frontier_pool_index)``, each ``[B, top_k]``
        (int64, float32, int64): the global top-k of the ``n * top_k`` new candidates by
        cumulative score, best first.
    """
    batch, n, _ = logits.shape
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    child_log_probs, child_tokens = _stable_topk(log_probs, top_k)  # [B, n, k]
    cand_scores = frontier_scores.float().unsqueeze(-1) + child_log_probs  # [B, n, k]

    end = pool_offset + n * top_k
    pool_tokens[:, pool_offset:end] = child_tokens.reshape(batch, -1)
    pool_scores[:, pool_offset:end] = cand_scores.reshape(batch, -1)
    pool_parents[:, pool_offset:end] = (
        frontier_pool_index.unsqueeze(-1).expand(batch, n, top_k).reshape(batch, -1)
    )

    best_scores, best = _stable_topk(cand_scores.reshape(batch, -1), top_k)
    return (
        child_tokens.reshape(batch, -1).gather(1, best),
        best_scores,
        best + pool_offset,
    )


def tree_assemble(
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    root_token: torch.Tensor,
    num_nodes: int,
) -> tuple[torch.Tensor, ...]:
    """Keep the ``num_nodes`` (T) best pool candidates and build the verification tree.

    Args:
        pool_tokens / pool_scores / pool_parents: ``[B, P]`` int64 / float32 / int64, as
            written by :func:`tree_expand`; a parent's pool index is smaller than its
            child's and -1 means "child of the root".
        root_token: ``[B]`` int64, the token at the tree root (the last emitted token).
        num_nodes: T, with ``1 <= T <= P``.

    Kept nodes are the T highest scores (ties: lower pool index), ordered by pool index.
    The kept set must contain the parent of every kept node (true whenever a child's
    score is at most its parent's, as cumulative log-probabilities are).

    Returns:
        tokens ``[B, T+1]`` int64 (root first), depth ``[B, T+1]`` int64 (root 0),
        parent ``[B, T+1]`` int64 (tree index, -1 for the root), mask
        ``[B, T+1, ceil((T+1)/64)]`` int64 packed ancestor mask, first_child and
        next_sibling ``[B, T+1]`` int64 (tree indices, -1 for none; siblings in
        tree-index order).
    """
    batch = pool_tokens.shape[0]
    size = num_nodes + 1
    device = pool_tokens.device
    tokens = torch.empty(batch, size, dtype=torch.int64, device=device)
    depth = torch.zeros(batch, size, dtype=torch.int64, device=device)
    parent = torch.full((batch, size), -1, dtype=torch.int64, device=device)
    first_child = torch.full((batch, size), -1, dtype=torch.int64, device=device)
    next_sibling = torch.full((batch, size), -1, dtype=torch.int64, device=device)
    dense_mask = torch.zeros(batch, size, size, dtype=torch.bool, device=device)

    for b in range(batch):
        _, best = _stable_topk(pool_scores[b].float(), num_nodes)
        kept = torch.sort(best).values.tolist()
        tree_index = {pool_index: i + 1 for i, pool_index in enumerate(kept)}
        tokens[b, 0] = root_token[b]
        dense_mask[b, 0, 0] = True
        last_child = [-1] * size
        for i, pool_index in enumerate(kept, start=1):
            pool_parent = int(pool_parents[b, pool_index])
            if pool_parent == -1:
                p = 0
            elif pool_parent in tree_index:
                p = tree_index[pool_parent]
            else:
                raise ValueError(
                    f"pool_scores: kept candidate {pool_index} has a parent ({pool_parent}) "
                    "that is not kept; scores must not increase from parent to child"
                )
            tokens[b, i] = pool_tokens[b, pool_index]
            parent[b, i] = p
            depth[b, i] = depth[b, p] + 1
            dense_mask[b, i] = dense_mask[b, p]
            dense_mask[b, i, i] = True
            if last_child[p] == -1:
                first_child[b, p] = i
            else:
                next_sibling[b, last_child[p]] = i
            last_child[p] = i
    return tokens, depth, parent, pack_mask(dense_mask), first_child, next_sibling


# --------------------------------------------------------------------------- op 2
def tree_visibility(
    tree_mask: torch.Tensor | None, batch: int, num_new: int, tree_len: int, device: torch.device
) -> torch.Tensor:
    """Which tree rows each query sees: bool ``[B, Q, tree_len]``.

    ``tree_mask`` ``[B, Q, ceil(tree_len/64)]`` unpacked, or for None the causal rule: the
    queries are the last ``Q`` tree rows and query ``i`` sees tree rows
    ``0 .. tree_len - Q + i`` (up to and including its own).
    """
    if tree_mask is not None:
        return unpack_mask(tree_mask, tree_len)
    causal = torch.ones(num_new, tree_len, dtype=torch.bool, device=device).tril(tree_len - num_new)
    return causal.expand(batch, num_new, tree_len)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
    tree_len: int | None = None,
) -> torch.Tensor:
    """Attention of ``Q`` queries, the last rows of a tree section, over a static KV cache.

    Args:
        q: ``[B, Hq, Q, D]`` queries of the new tokens.
        k_cache / v_cache: ``[B, Hkv, S_max, D]``; for each sequence ``b`` rows
            ``0 .. prefix_len[b] - 1`` hold the prefix and rows
            ``prefix_len[b] .. prefix_len[b] + tree_len - 1`` the tree section, whose last
            ``Q`` rows are the queries' own tokens (query ``i`` is tree row
            ``tree_len - Q + i``). ``Hq % Hkv == 0`` (grouped-query attention: query head
            h reads kv head ``h // (Hq // Hkv)``).
        prefix_len: ``[B]`` int32.
        tree_mask: ``[B, Q, ceil(tree_len/64)]`` int64 packed mask over the tree rows (bit j
            of row i: tree row j is visible to query i), or None for a causal chunk (query
            i sees tree rows ``0 .. tree_len - Q + i``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        tree_len: rows of the tree section, ``Q <= tree_len``; default (None) ``Q``: the
            queries are the whole section, the new tokens of a verification or a chunk.
            Larger for the draft's tree levels: level d of a tree of top-k k has its k
            nodes after the d*k rows of the earlier levels (``tree_len = (d+1)*k``).

    Every query sees the whole prefix plus the tree rows its mask row allows. A row
    that sees nothing (empty prefix and empty mask row) outputs zeros.

    Returns:
        ``[B, Hq, Q, D]`` in the dtype of ``q``; accumulation in float32.
    """
    batch, num_q_heads, num_new, head_dim = q.shape
    group = num_q_heads // k_cache.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    tree_len = num_new if tree_len is None else tree_len
    allowed_tree = tree_visibility(tree_mask, batch, num_new, tree_len, q.device)  # [B, Q, tree_len]

    out = torch.empty_like(q)
    for b in range(batch):
        prefix = int(prefix_len[b])
        total = prefix + tree_len
        keys = k_cache[b, :, :total].float().repeat_interleave(group, dim=0)
        values = v_cache[b, :, :total].float().repeat_interleave(group, dim=0)
        allowed = torch.ones(num_new, total, dtype=torch.bool, device=q.device)
        allowed[:, prefix:] = allowed_tree[b]
        scores = (q[b].float() @ keys.transpose(-1, -2)) * scale  # [Hq, Q, total]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zeros
        out[b] = (probs @ values).to(q.dtype)
    return out


# --------------------------------------------------------------------------- op 3
def kv_compact(
    kv_cache: torch.Tensor,
    accepted_index: torch.Tensor,
    num_accepted: torch.Tensor,
    prefix_len: torch.Tensor,
) -> None:
    """Move the K/V rows of accepted tree nodes next to the prefix, in place.

    Args:
        kv_cache: ``[N, B, H, S_max, D]``: all layers' K and V planes (N = 2 * layers,
            any order) of a static cache, edited in place.
        accepted_index: ``[B, A]`` int64 tree indices of the accepted path, root first;
            entries past ``num_accepted[b] + 1`` are ignored.
        num_accepted: ``[B]`` int64, a = accepted draft nodes (root excluded), ``a < A``.
        prefix_len: ``[B]`` int32, updated in place to ``prefix_len + a + 1``.

    For every plane and sequence ``b``: rows ``prefix_len[b] + accepted_index[b, j]`` for
    ``j = 0 .. a`` are copied to ``prefix_len[b] + j``. All sources are read before any
    destination is written, so overlapping ranges are safe.
    """
    for b in range(kv_cache.shape[1]):
        prefix = int(prefix_len[b])
        count = int(num_accepted[b]) + 1
        source = prefix + accepted_index[b, :count].to(torch.long)
        rows = kv_cache[:, b, :, source].clone()  # gather before scatter
        kv_cache[:, b, :, prefix : prefix + count] = rows
        prefix_len[b] = prefix + count


# --------------------------------------------------------------------------- op 4
def _children(first_child: torch.Tensor, next_sibling: torch.Tensor, node: int):
    child = int(first_child[node])
    while child != -1:
        yield child
        child = int(next_sibling[child])


def verify_greedy(
    logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification: longest path on which the target agrees.

    Args:
        logits: ``[B, T+1, V]`` target logits at every tree node.
        tree_tokens: ``[B, T+1]`` int64 tree tokens (root first).
        first_child / next_sibling: ``[B, T+1]`` int64 tree links (from tree_assemble).

    From the root, repeatedly move to the first child (in sibling order) whose token
    equals the target's argmax (ties: lowest token id) at the current node; stop when
    none does. The bonus token is the argmax at the last accepted node.

    Returns:
        accepted_index ``[B, T+1]`` int64 (root first, then the accepted nodes, -1
        padded), num_accepted ``[B]`` int64 (accepted draft nodes, root excluded),
        bonus_token ``[B]`` int64.
    """
    batch, size = tree_tokens.shape
    argmax = logits.argmax(dim=-1)  # [B, T+1]
    accepted = torch.full((batch, size), -1, dtype=torch.int64, device=logits.device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=logits.device)
    bonus = torch.empty(batch, dtype=torch.int64, device=logits.device)
    for b in range(batch):
        node, path = 0, [0]
        while True:
            target = int(argmax[b, node])
            match = next(
                (c for c in _children(first_child[b], next_sibling[b], node)
                 if int(tree_tokens[b, c]) == target),
                None,
            )
            if match is None:
                break
            node = match
            path.append(node)
        accepted[b, : len(path)] = torch.tensor(path)
        num_accepted[b] = len(path) - 1
        bonus[b] = argmax[b, node]
    return accepted, num_accepted, bonus


def verify_sampling(
    probs: torch.Tensor,
    tree_tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    rng_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless tree verification for sampling (MSD_SPEC.md 3.4).

    Args:
        probs: ``[B, T+1, V]`` float32 processed target probabilities (temperature,
            top-k, top-p already applied; each row sums to 1).
        tree_tokens / first_child / next_sibling: as in :func:`verify_greedy`.
        rng_state: ``[2]`` int64 ``(seed, offset)``; this call uses ``offset`` and then
            increments it in place by one.

    At the current node with distribution p (mass m = 1): for each child x in sibling
    order draw u; accept x iff ``u * m < p(x)`` (float32), else ``m -= p(x)`` and
    ``p(x) = 0``. If a child is accepted, continue from it. Otherwise the bonus token is
    drawn from what is left of p: the first token v whose float64 running sum of p
    (rejected tokens as 0) exceeds ``u * m`` (falling back to the last token with
    p > 0 left, then to argmax p). Draw number n of row b uses
    ``philox_uniform(seed, offset, b, n)``, n counting from 0 over the whole row.

    Returns:
        accepted_index, num_accepted, bonus_token as :func:`verify_greedy`.
    """
    batch, size = tree_tokens.shape
    seed, offset = int(rng_state[0]), int(rng_state[1])
    accepted = torch.full((batch, size), -1, dtype=torch.int64, device=probs.device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=probs.device)
    bonus = torch.empty(batch, dtype=torch.int64, device=probs.device)
    f32 = torch.float32
    for b in range(batch):
        node, path, draw = 0, [0], 0
        while True:
            p = probs[b, node].float()
            mass = torch.tensor(1.0, dtype=f32)
            rejected: set[int] = set()
            next_node = None
            for child in _children(first_child[b], next_sibling[b], node):
                token = int(tree_tokens[b, child])
                p_token = torch.tensor(0.0 if token in rejected else float(p[token]), dtype=f32)
                u = torch.tensor(philox_uniform(seed, offset, b, draw), dtype=f32)
                draw += 1
                if u * mass < p_token:
                    next_node = child
                    break
                mass = mass - p_token
                rejected.add(token)
            if next_node is None:
                break
            node = next_node
            path.append(node)

        u = torch.tensor(philox_uniform(seed, offset, b, draw), dtype=f32)
        residual = p.double().clone()
        if rejected:
            residual[torch.tensor(sorted(rejected))] = 0.0
        threshold = float(u * mass)
        above = (torch.cumsum(residual, 0) > threshold).nonzero()
        if len(above) > 0:
            token = int(above[0])
        elif bool((residual > 0).any()):
            token = int((residual > 0).nonzero()[-1])
        else:
            token = int(p.argmax())
        accepted[b, : len(path)] = torch.tensor(path)
        num_accepted[b] = len(path) - 1
        bonus[b] = token
    rng_state[1] += 1
    return accepted, num_accepted, bonus
