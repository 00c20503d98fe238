"""Op 1 on the CPU: draft-tree expansion, assembly and whole-tree construction.

Shapes of an EAGLE-2 draft tree: top_k = 10, depth = 5 (pool of 510 candidates), T = 59
drafted tokens, a 32000-token vocabulary. Baselines in the style of the released
MSD/EAGLE-2 code: expansion in plain torch ops (log_softmax + topk per node, then the
global top-k), assembly as a per-node Python loop; the reference too. Expansion and whole
trees are timed on one thread and on torch's default thread count.

Run: python3 -m pytest benchmarks/test_bench_tree_build.py --benchmark-enable --benchmark-only
"""

import pytest
import torch

import msd_kernels as mk

TOP_K, DEPTH, NUM_NODES, VOCAB = 10, 5, 59, 32000
BATCHES = [1, 8]


@pytest.fixture(params=["1", "default"])
def threads(request):
    """Torch's thread count during the test: 1, or left at its default (restored after)."""
    default = torch.get_num_threads()
    if request.param == "1":
        torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(default)


def torch_ops_expand(logits, frontier_scores, top_k):
    """One depth step in plain torch ops, as the released MSD/EAGLE-2 code expands a level.

    ``logits`` ``[B, n, V]``, ``frontier_scores`` ``[B, n]``. Returns the level's candidates,
    tokens and cumulative scores ``[B, n*top_k]``, and the next frontier: the candidates'
    positions and scores ``[B, top_k]``.
    """
    batch = logits.shape[0]
    child_scores, child_tokens = torch.topk(torch.log_softmax(logits, dim=-1), top_k, dim=-1)  # [B, n, k]
    scores = (frontier_scores.unsqueeze(-1) + child_scores).view(batch, -1)
    best_scores, best = torch.topk(scores, top_k, dim=-1)
    return child_tokens.view(batch, -1), scores, best, best_scores


def torch_ops_tree(step_logits):
    """The whole construction in plain torch ops, as the released code builds it: every
    level's candidates (tokens, scores, parent positions) kept in lists, then the T best in
    candidate order. Less work than tree_assemble: no mask, depths or links.

    Returns the kept candidates' positions, tokens and parent positions, each ``[B, T]``.
    """
    batch = step_logits[0].shape[0]
    frontier_scores = torch.zeros(batch, 1)
    frontier = torch.full((batch, 1), -1)  # candidate positions of the frontier, -1 = root
    tokens, scores, parents = [], [], []
    offset = 0
    for logits in step_logits:
        level_tokens, level_scores, best, frontier_scores = torch_ops_expand(logits, frontier_scores, TOP_K)
        tokens.append(level_tokens)
        scores.append(level_scores)
        parents.append(frontier.repeat_interleave(TOP_K, dim=1))
        frontier = best + offset
        offset += level_tokens.shape[1]
    kept = torch.sort(torch.topk(torch.cat(scores, 1), NUM_NODES, dim=-1).indices, dim=-1).values
    return kept, torch.cat(tokens, 1).gather(1, kept), torch.cat(parents, 1).gather(1, kept)


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


@pytest.mark.parametrize("impl", ["compiled", "torch_ops"])
def test_bench_expand_level(benchmark, threads, impl):
    """One level of a full tree: the 10 frontier nodes of one sequence."""
    logits = _step_logits(1)[1]
    frontier_scores = -torch.rand(1, TOP_K, generator=torch.Generator().manual_seed(0))
    frontier_index = torch.arange(TOP_K).unsqueeze(0)
    pool = mk.new_tree_pool(1, TOP_K, 1)
    # The baseline must do the same work: same next frontier.
    tokens, _, index = mk.tree_expand(logits, frontier_scores, frontier_index, *pool, TOP_K, TOP_K)
    level_tokens, _, best, _ = torch_ops_expand(logits, frontier_scores, TOP_K)
    assert torch.equal(level_tokens.gather(1, best), tokens) and torch.equal(best + TOP_K, index)

    benchmark.group = f"tree_expand level n={TOP_K} V={VOCAB} B=1 threads={threads}"
    if impl == "torch_ops":
        benchmark(torch_ops_expand, logits, frontier_scores, TOP_K)
    else:
        benchmark(mk.tree_expand, logits, frontier_scores, frontier_index, *pool, TOP_K, TOP_K)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["compiled", "torch_ops", "reference"])
def test_bench_tree_construction(benchmark, threads, batch, impl):
    if impl == "reference" and threads == "1":
        pytest.skip("the reference is timed at the default thread count only")
    step_logits = _step_logits(batch)
    root_token = torch.arange(batch)
    # The baseline must do the same work: same candidates (positions = pool slots) kept.
    pool, tree = _construct(step_logits, root_token, "compiled")
    kept, tokens, parents = torch_ops_tree(step_logits)
    assert torch.equal(tokens, tree[0][:, 1:]) and torch.equal(parents, pool[2].gather(1, kept))

    benchmark.group = f"tree construction k={TOP_K} depth={DEPTH} V={VOCAB} T={NUM_NODES} B={batch} threads={threads}"
    if impl == "torch_ops":
        benchmark(torch_ops_tree, step_logits)
    else:
        benchmark(_construct, step_logits, root_token, impl)
