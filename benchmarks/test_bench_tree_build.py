"""Op 1 on the CPU: draft-tree assembly and whole-tree construction.

Shapes of an EAGLE-2 draft tree: top_k = 10, depth = 5 (pool of 510 candidates), T = 59
drafted tokens, a 32000-token vocabulary. Assembly is compared with the reference and with
a per-node Python loop in the style of the released MSD/EAGLE-2 code (the baseline).

Run: python3 -m pytest benchmarks/test_bench_tree_build.py --benchmark-enable --benchmark-only
"""

import pytest
import torch

import msd_kernels as mk

TOP_K, DEPTH, NUM_NODES, VOCAB = 10, 5, 59, 32000
BATCHES = [1, 8]


def eagle_style_assemble(pool_tokens, pool_scores, pool_parents, root_token, num_nodes):
    """Tree assembly as the released MSD/EAGLE-2 code does it, per batch row in Python.

    Top-k over the scores, sort the kept pool indices, then a loop over the nodes that
    builds the dense ``(T+1) x (T+1)`` float mask by copying the parent's row, the depth
    list, and the root-to-leaf retrieve indices by walking parents up from every leaf.
    Returns, per batch row, ``(tokens, depth, dense_mask, retrieve_indices)``.
    """
    size = num_nodes + 1
    trees = []
    for b in range(pool_tokens.shape[0]):
        kept = torch.sort(torch.topk(pool_scores[b], num_nodes).indices).values
        tokens = torch.cat([root_token[b : b + 1], pool_tokens[b, kept]])
        pool_parent = pool_parents[b, kept]
        # A parent's tree index is its rank among the kept pool indices, + 1 for the root.
        tree_parent = torch.searchsorted(kept, pool_parent) + 1
        tree_parent[pool_parent == -1] = 0
        parent = [-1] + tree_parent.tolist()

        mask = torch.zeros(size, size)
        mask[0, 0] = 1
        depth = [0] * size
        for i in range(1, size):
            mask[i] = mask[parent[i]]
            mask[i, i] = 1
            depth[i] = depth[parent[i]] + 1

        leaves = sorted(set(range(size)) - set(parent))
        retrieve = torch.full((len(leaves), max(depth) + 1), -1, dtype=torch.int64)
        for row, leaf in enumerate(leaves):
            path = []
            node = leaf
            while node != -1:
                path.append(node)
                node = parent[node]
            retrieve[row, : len(path)] = torch.tensor(path[::-1])
        trees.append((tokens, torch.tensor(depth), mask, retrieve))
    return trees


def _step_logits(batch: int) -> list[torch.Tensor]:
    """Random draft logits of the root step and of the DEPTH later steps."""
    generator = torch.Generator().manual_seed(batch)
    return [
        torch.randn(batch, 1 if step == 0 else TOP_K, VOCAB, generator=generator) * 3
        for step in range(DEPTH + 1)
    ]


def _construct(step_logits, root_token, backend):
    """Expand the root and DEPTH frontiers into a fresh pool, then assemble the tree."""
    batch = root_token.shape[0]
    pool = mk.new_tree_pool(batch, TOP_K, DEPTH)
    scores = torch.zeros(batch, 1)
    index = torch.full((batch, 1), -1, dtype=torch.int64)
    for step, logits in enumerate(step_logits):
        offset = 0 if step == 0 else mk.pool_size(TOP_K, step - 1)
        _, scores, index = mk.tree_expand(logits, scores, index, *pool, offset, TOP_K, backend=backend)
    return pool, mk.tree_assemble(*pool, root_token, NUM_NODES, backend=backend)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["compiled", "reference", "eagle_loop"])
def test_bench_assemble(benchmark, batch, impl):
    root_token = torch.arange(batch)
    pool, tree = _construct(_step_logits(batch), root_token, "compiled")
    # The baseline must do the same work: same tokens, depths and ancestor masks.
    for b, (tokens, depth, mask, _) in enumerate(eagle_style_assemble(*pool, root_token, NUM_NODES)):
        assert torch.equal(tokens, tree[0][b]) and torch.equal(depth, tree[1][b])
        assert torch.equal(mask.bool(), mk.unpack_mask(tree[3][b], NUM_NODES + 1))

    benchmark.group = f"tree_assemble P={mk.pool_size(TOP_K, DEPTH)} T={NUM_NODES} B={batch}"
    if impl == "eagle_loop":
        benchmark(eagle_style_assemble, *pool, root_token, NUM_NODES)
    else:
        benchmark(mk.tree_assemble, *pool, root_token, NUM_NODES, backend=impl)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", mk.BACKENDS)
def test_bench_tree_construction(benchmark, batch, backend):
    step_logits = _step_logits(batch)
    benchmark.group = f"tree construction k={TOP_K} depth={DEPTH} V={VOCAB} T={NUM_NODES} B={batch}"
    benchmark(_construct, step_logits, torch.arange(batch), backend)
