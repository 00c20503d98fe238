"""Op 1, fused draft-tree construction: tree_expand and tree_assemble.

The compiled ops must equal the reference (msd_kernels.reference) on random inputs, and
hand-built trees must give hand-computed outputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msd_kernels as mk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(batch: int, n: int, vocab: int, dtype: torch.dtype, seed: int, device) -> torch.Tensor:
    """Random logits spread widely enough that near-ties between log-probs are improbable."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, vocab, generator=generator) * 3).to(dtype).to(device)


def _assert_same_expand(compiled, reference) -> None:
    """Equal frontier tokens/indices, close scores; ``compiled``/``reference``: op outputs."""
    tokens, scores, index = compiled
    ref_tokens, ref_scores, ref_index = reference
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    torch.testing.assert_close(index, ref_index, rtol=0, atol=0)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def _assert_same_pool(pool, ref_pool) -> None:
    """Equal pool tokens/parents, close scores (unwritten slots keep their -inf)."""
    torch.testing.assert_close(pool[0], ref_pool[0], rtol=0, atol=0)
    torch.testing.assert_close(pool[1], ref_pool[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[2], ref_pool[2], rtol=0, atol=0)


def _assert_same_tree(tree, ref_tree) -> None:
    """All six tree_assemble outputs equal."""
    names = ("tokens", "depth", "parent", "mask", "first_child", "next_sibling")
    for name, value, expected in zip(names, tree, ref_tree):
        assert torch.equal(value.cpu(), expected.cpu()), f"{name}: {value} != {expected}"


def _build_tree(backend, step_logits, top_k, num_nodes, root_token):
    """The whole construction: expand the root, then every later frontier, then assemble.

    Returns (frontiers, pool, tree): the output of each expand step, the final pool and
    the tree_assemble outputs.
    """
    batch, device = root_token.shape[0], root_token.device
    pool = mk.new_tree_pool(batch, top_k, len(step_logits) - 1, device=device)
    scores = torch.zeros(batch, 1, device=device)
    index = torch.full((batch, 1), -1, dtype=torch.int64, device=device)
    frontiers = []
    for step, logits in enumerate(step_logits):
        offset = 0 if step == 0 else mk.pool_size(top_k, step - 1)
        frontier = mk.tree_expand(logits, scores, index, *pool, offset, top_k, backend=backend)
        _, scores, index = frontier
        frontiers.append(frontier)
    tree = mk.tree_assemble(*pool, root_token, num_nodes, backend=backend)
    return frontiers, pool, tree


# --------------------------------------------------------------------------- random inputs
@settings(max_examples=200)
@given(
    batch=st.integers(1, 4),
    top_k=st.integers(1, 16),
    full_frontier=st.booleans(),
    extra_vocab=st.integers(0, 2000),
    dtype=st.sampled_from(DTYPES),
    pool_offset=st.integers(0, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_expand_matches_reference(device, batch, top_k, full_frontier, extra_vocab, dtype, pool_offset, seed):
    n = top_k if full_frontier else 1
    vocab = min(top_k + extra_vocab, 2000)
    generator = torch.Generator().manual_seed(seed + 1)
    logits = _logits(batch, n, vocab, dtype, seed, device)
    frontier_scores = (-torch.rand(batch, n, generator=generator) * 10).to(device)
    # Parents lie before this step's slots (all -1, the root, when pool_offset = 0).
    frontier_index = torch.randint(-1, pool_offset, (batch, n), generator=generator).to(device)
    size = pool_offset + n * top_k + 5
    pools = {}
    outputs = {}
    for backend in mk.BACKENDS:
        pools[backend] = (
            torch.randint(0, 9, (batch, size), generator=torch.Generator().manual_seed(seed)).to(device),
            torch.full((batch, size), -7.0, device=device),
            torch.full((batch, size), -3, dtype=torch.int64, device=device),
        )
        outputs[backend] = mk.tree_expand(
            logits, frontier_scores, frontier_index, *pools[backend], pool_offset, top_k, backend=backend
        )
    _assert_same_expand(outputs["compiled"], outputs["reference"])
    _assert_same_pool(pools["compiled"], pools["reference"])


def _expand_from_root(logits, frontier_scores, top_k, backend):
    """One expansion of the ``n`` frontier rows of ``logits`` into a fresh ``n * top_k`` pool.

    Returns (frontier, pool): the op's outputs and the pool it wrote.
    """
    batch, n, _ = logits.shape
    device = logits.device
    pool = (
        torch.zeros(batch, n * top_k, dtype=torch.int64, device=device),
        torch.zeros(batch, n * top_k, device=device),
        torch.zeros(batch, n * top_k, dtype=torch.int64, device=device),
    )
    index = torch.full((batch, n), -1, dtype=torch.int64, device=device)
    return mk.tree_expand(logits, frontier_scores, index, *pool, 0, top_k, backend=backend), pool


@settings(max_examples=100)
@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 4),
    top_k=st.integers(1, mk.MAX_TOP_K),
    extra_vocab=st.integers(0, 300),
    levels=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_expand_ties_match_reference(device, batch, n, top_k, extra_vocab, levels, dtype, seed):
    """Logits from a few integers: exact ties among a node's children, on both sides of every
    vector block of the CPU kernel, and between nodes (the same row of logits and frontier
    score for all nodes of a sequence: rows that differ only in order would not tie exactly,
    as torch's sum of exponentials depends on the order). Ties go to the lower token id, then
    to the lower pool slot, as in the reference."""
    generator = torch.Generator().manual_seed(seed)
    vocab = top_k + extra_vocab
    row = torch.randint(0, levels + 1, (batch, 1, vocab), generator=generator)
    logits = row.expand(batch, n, vocab).to(dtype).to(device)
    frontier_scores = torch.zeros(batch, n, device=device)
    frontier, pool = _expand_from_root(logits, frontier_scores, top_k, "compiled")
    ref_frontier, ref_pool = _expand_from_root(logits, frontier_scores, top_k, "reference")
    _assert_same_expand(frontier, ref_frontier)
    _assert_same_pool(pool, ref_pool)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [5, 37, 300])
@pytest.mark.parametrize("special", ["nan", "+inf", "all -inf", "some -inf"])
def test_expand_non_finite_logits_match_reference(dtype, vocab, special):
    """On the CPU, whose vectorised passes treat such rows apart: as in torch.log_softmax, a
    NaN or +inf logit, or a row of -inf, makes every log-probability NaN (the children are
    then the first top_k tokens); -inf logits in a finite row only get log-probability -inf."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(2, 3, vocab, generator=generator) * 3
    positions = torch.randint(0, vocab, (2, 3, 4), generator=generator)
    if special == "all -inf":
        logits[0, 1] = -math.inf
    else:
        value = {"nan": math.nan, "+inf": math.inf, "some -inf": -math.inf}[special]
        logits.scatter_(-1, positions, value)
    logits = logits.to(dtype)
    frontier_scores = -torch.rand(2, 3, generator=generator)
    frontier, pool = _expand_from_root(logits, frontier_scores, 4, "compiled")
    ref_frontier, ref_pool = _expand_from_root(logits, frontier_scores, 4, "reference")
    for value, expected in zip(frontier + pool, ref_frontier + ref_pool):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(max_examples=120)
@given(
    batch=st.integers(1, 3),
    top_k=st.integers(1, 8),
    depth=st.integers(0, 4),
    extra_vocab=st.integers(0, 500),
    dtype=st.sampled_from(DTYPES),
    node_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_tree_construction_matches_reference(
    device, batch, top_k, depth, extra_vocab, dtype, node_fraction, seed
):
    vocab = top_k + extra_vocab
    step_logits = [_logits(batch, 1, vocab, dtype, seed, device)]
    step_logits += [_logits(batch, top_k, vocab, dtype, seed + s, device) for s in range(1, depth + 1)]
    size = mk.pool_size(top_k, depth)
    num_nodes = max(1, min(round(node_fraction * size), mk.MAX_TREE_TOKENS - 1))
    root_token = torch.arange(batch, device=device) + 100
    frontiers, pool, tree = _build_tree("compiled", step_logits, top_k, num_nodes, root_token)
    ref_frontiers, ref_pool, ref_tree = _build_tree("reference", step_logits, top_k, num_nodes, root_token)
    for frontier, ref_frontier in zip(frontiers, ref_frontiers):
        _assert_same_expand(frontier, ref_frontier)
    _assert_same_pool(pool, ref_pool)
    _assert_same_tree(tree, ref_tree)


def _random_monotone_pool(batch: int, size: int, tied: bool, seed: int):
    """A pool whose every child scores at most its parent (child = parent - |x|).

    ``tied`` rounds |x| to integers so that many scores tie exactly (and children often
    tie with their parent), exercising the lower-index tie-break.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (batch, size), generator=generator)
    parents = torch.empty(batch, size, dtype=torch.int64)
    scores = torch.empty(batch, size)
    steps = torch.randn(batch, size, generator=generator).abs()
    if tied:
        steps = steps.round()
    for b in range(batch):
        for p in range(size):
            parent = int(torch.randint(-1, p, (1,), generator=generator)) if p > 0 else -1
            parents[b, p] = parent
            scores[b, p] = (0.0 if parent == -1 else scores[b, parent]) - steps[b, p]
    return tokens, scores, parents


@settings(max_examples=150)
@given(
    batch=st.integers(1, 4),
    num_nodes=st.sampled_from([1, 62, 63, 64, 127]),  # T + 1 = 2, 63, 64, 65, 128 tree tokens
    extra_pool=st.integers(0, 150),
    tied=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_assemble_matches_reference(device, batch, num_nodes, extra_pool, tied, seed):
    pool = [t.to(device) for t in _random_monotone_pool(batch, num_nodes + extra_pool, tied, seed)]
    root_token = torch.arange(batch, device=device) + 7
    tree = mk.tree_assemble(*pool, root_token, num_nodes, backend="compiled")
    _assert_same_tree(tree, mk.tree_assemble(*pool, root_token, num_nodes, backend="reference"))


# --------------------------------------------------------------------------- hand-built trees
def _expect_tree(tree, tokens, depth, parent, mask_rows, first_child, next_sibling) -> None:
    """Compare batch row 0 of a tree with hand-written lists (mask rows as sets of bits)."""
    size = len(tokens)
    expected_mask = torch.zeros(size, size, dtype=torch.bool)
    for i, row in enumerate(mask_rows):
        expected_mask[i, list(row)] = True
    assert torch.equal(mk.unpack_mask(tree[3][0].cpu(), size), expected_mask), "mask"
    names = ("tokens", "depth", "parent", "first_child", "next_sibling")
    values = (tree[0], tree[1], tree[2], tree[4], tree[5])
    for name, value, expected in zip(names, values, (tokens, depth, parent, first_child, next_sibling)):
        assert value[0].tolist() == expected, name


def test_chain_from_top1_expansion(device):
    """top_k = 1: every step extends a single path; scores sum the chosen log-probs."""
    probs = [[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]
    step_logits = [torch.tensor([[row]], device=device).log() for row in probs]
    root_token = torch.tensor([9], device=device)
    frontiers, pool, tree = _build_tree("compiled", step_logits, 1, 3, root_token)
    expected_scores = [math.log(0.5), math.log(0.5 * 0.4), math.log(0.5 * 0.4 * 0.7)]
    for (tokens, scores, index), token, score, slot in zip(frontiers, [0, 3, 0], expected_scores, range(3)):
        assert tokens.tolist() == [[token]] and index.tolist() == [[slot]]
        assert scores.item() == pytest.approx(score, abs=1e-5)
    assert pool[2].tolist() == [[-1, 0, 1]]
    _expect_tree(
        tree,
        tokens=[9, 0, 3, 0],
        depth=[0, 1, 2, 3],
        parent=[-1, 0, 1, 2],
        mask_rows=[{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}],
        first_child=[1, 2, 3, -1],
        next_sibling=[-1, -1, -1, -1],
    )


def test_long_chain_spans_mask_words(device):
    """A 70-token chain: rows past bit 63 (the int64 sign bit) carry into a second word."""
    size = 69
    tokens = torch.arange(size, device=device).unsqueeze(0) + 1000
    scores = -torch.arange(size, dtype=torch.float32, device=device).unsqueeze(0)
    parents = torch.arange(-1, size - 1, device=device).unsqueeze(0)
    tree = mk.tree_assemble(
        tokens, scores, parents, torch.tensor([5], device=device), size, backend="compiled"
    )
    _expect_tree(
        tree,
        tokens=[5] + list(range(1000, 1000 + size)),
        depth=list(range(size + 1)),
        parent=list(range(-1, size)),
        mask_rows=[set(range(i + 1)) for i in range(size + 1)],
        first_child=list(range(1, size + 1)) + [-1],
        next_sibling=[-1] * (size + 1),
    )
    assert tree[3][0, 63].tolist() == [-1, 0] and tree[3][0, 69].tolist() == [-1, 63]


def test_star_from_one_expansion(device):
    """Depth 1: all kept nodes are children of the root, in rank order; tied logits 3, 3
    rank the lower token id first."""
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0, 2.0, -1.0]]], device=device)
    root_token = torch.tensor([42], device=device)
    (frontier,), _, tree = _build_tree("compiled", [logits], 4, 4, root_token)
    assert frontier[0].tolist() == [[1, 2, 4, 0]] and frontier[2].tolist() == [[0, 1, 2, 3]]
    _expect_tree(
        tree,
        tokens=[42, 1, 2, 4, 0],
        depth=[0, 1, 1, 1, 1],
        parent=[-1, 0, 0, 0, 0],
        mask_rows=[{0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}],
        first_child=[1, -1, -1, -1, -1],
        next_sibling=[-1, 2, 3, 4, -1],
    )
    assert tree[3].flatten().tolist() == [0b1, 0b11, 0b101, 0b1001, 0b10001]


def test_two_level_tree_by_hand(device):
    """Pool slots 0, 1 are root children; 2, 3 children of slot 0; 4, 5 children of slot 1.

    Slots 1, 4 and 5 tie at -1.0: with T = 4 the kept set is {0 (-0.5), 2 (-0.7), 1, 4}.
    In pool order 0, 1, 2, 4 they become tree nodes 1, 2, 3, 4.
    """
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15]], device=device)
    scores = torch.tensor([[-0.5, -1.0, -0.7, -3.0, -1.0, -1.0]], device=device)
    parents = torch.tensor([[-1, -1, 0, 0, 1, 1]], device=device)
    tree = mk.tree_assemble(tokens, scores, parents, torch.tensor([99], device=device), 4, backend="compiled")
    _expect_tree(
        tree,
        tokens=[99, 10, 11, 12, 14],
        depth=[0, 1, 1, 2, 2],
        parent=[-1, 0, 0, 1, 2],
        mask_rows=[{0}, {0, 1}, {0, 2}, {0, 1, 3}, {0, 2, 4}],
        first_child=[1, 3, 4, -1, -1],
        next_sibling=[-1, 2, -1, -1, -1],
    )
    assert tree[3].flatten().tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10101]


# --------------------------------------------------------------------------- invalid values
def _small_pool(parents):
    """A 4-slot pool with decreasing scores and the given parent pool indices."""
    return (
        torch.tensor([[1, 2, 3, 4]]),
        torch.tensor([[-1.0, -2.0, -3.0, -4.0]]),
        torch.tensor([parents]),
    )


@pytest.mark.parametrize("parents", [[-1, 0, 3, -1], [-1, 0, 1, -2], [-1, 1, 0, 0]])
def test_assemble_rejects_parent_not_preceding_child(parents):
    """Checked on the CPU only: a CUDA kernel cannot raise without a host sync."""
    with pytest.raises(RuntimeError, match=r"pool_parents\[0, \d\] = -?\d is not a smaller pool index"):
        mk.tree_assemble(*_small_pool(parents), torch.tensor([0]), 4, backend="compiled")


@pytest.mark.parametrize("backend", mk.BACKENDS)
def test_assemble_rejects_kept_node_with_dropped_parent(backend):
    """Slot 3 (score -1.5) is kept with T = 2 but its parent, slot 2 (score -3), is not."""
    tokens, _, parents = _small_pool([-1, 0, 1, 2])
    scores = torch.tensor([[-1.0, -2.0, -3.0, -1.5]])
    error = RuntimeError if backend == "compiled" else ValueError
    with pytest.raises(error, match="pool_scores: kept candidate 3 .*parent \\(2\\) that is not kept"):
        mk.tree_assemble(tokens, scores, parents, torch.tensor([0]), 2, backend=backend)


@pytest.mark.parametrize("bad_index", [2, 5, -2])
def test_expand_rejects_frontier_not_before_pool_offset(bad_index):
    """A frontier node is a parent of the new slots, so it must lie before pool_offset = 2."""
    pool = mk.new_tree_pool(1, 2, 1)
    with pytest.raises(
        RuntimeError, match=r"frontier_pool_index\[0, 1\] = -?\d is neither -1 nor a pool slot"
    ):
        mk.tree_expand(
            torch.zeros(1, 2, 8),
            torch.zeros(1, 2),
            torch.tensor([[0, bad_index]]),
            *pool,
            2,
            2,
            backend="compiled",
        )
