"""Fake (meta) implementations: output shapes and dtypes of every op, so the compiled
ops trace under ``torch.compile(fullgraph=True)`` without running."""

from __future__ import annotations

import torch

from msd_kernels.reference import mask_words

_I64 = torch.int64


@torch.library.register_fake("msd::tree_expand")
def _tree_expand(logits, frontier_scores, frontier_pool_index, pool_tokens, pool_scores,
                 pool_parents, pool_offset, top_k):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch, top_k), dtype=_I64),
        logits.new_empty((batch, top_k), dtype=torch.float32),
        logits.new_empty((batch, top_k), dtype=_I64),
    )


@torch.library.register_fake("msd::tree_assemble")
def _tree_assemble(pool_tokens, pool_scores, pool_parents, root_token, num_nodes):
    batch, size = pool_tokens.shape[0], num_nodes + 1
    row = lambda: pool_tokens.new_empty((batch, size))  # noqa: E731
    mask = pool_tokens.new_empty((batch, size, mask_words(size)))
    return row(), row(), row(), mask, row(), row()


@torch.library.register_fake("msd::tree_attention")
def _tree_attention(q, k_cache, v_cache, prefix_len, tree_mask=None, scale=None, tree_len=None):
    # Contiguous, as both kernels return it (q is often a transposed view; empty_like would
    # copy its strides, and a later view() valid on those would fail on the real output).
    return q.new_empty(q.shape)


@torch.library.register_fake("msd::kv_compact")
def _kv_compact(kv_cache, accepted_index, num_accepted, prefix_len):
    return None


def _verify_outputs(rows, tree_tokens):
    batch, size = tree_tokens.shape
    return (
        tree_tokens.new_empty((batch, size)),
        tree_tokens.new_empty((batch,)),
        tree_tokens.new_empty((batch,)),
    )


@torch.library.register_fake("msd::verify_greedy")
def _verify_greedy(logits, tree_tokens, first_child, next_sibling):
    return _verify_outputs(logits, tree_tokens)


@torch.library.register_fake("msd::verify_sampling")
def _verify_sampling(probs, tree_tokens, first_child, next_sibling, rng_state):
    return _verify_outputs(probs, tree_tokens)
