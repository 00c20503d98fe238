"""CUDA-only checks of tree_expand, tree_assemble, kv_compact, verify_greedy and
verify_sampling at model sizes, against msd_kernels.reference on the same GPU.

The shared op tests already run on CUDA through the ``device`` fixture; these add what they
do not cover: vocabularies of 32000 and 152064, a 510-candidate pool, 64-plane (32-layer)
caches, a 100k-row statistical test of lossless sampling, every output written (pools and
the allocator's free blocks hold sentinels first), and the in-place device state
(``prefix_len``, ``rng_state``) advanced exactly once.
"""

from __future__ import annotations

import pytest
import torch

import msd_kernels
from msd_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
SENTINEL = -7777


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


def _dirty_allocator() -> None:
    """Fill free blocks of the CUDA caching allocator with a sentinel, so that outputs a
    kernel leaves unwritten hold garbage rather than zeros (best effort: the op's outputs
    are likely, not certain, to reuse these blocks)."""
    blocks = [
        torch.full((numel,), SENTINEL, dtype=torch.int64, device=CUDA)
        for numel in (64, 512, 4096, 32768, 262144)
        for _ in range(8)
    ]
    del blocks


def _poisoned_pool(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.full((batch, size), SENTINEL, dtype=torch.int64, device=CUDA),
        torch.full((batch, size), float(SENTINEL), dtype=torch.float32, device=CUDA),
        torch.full((batch, size), SENTINEL, dtype=torch.int64, device=CUDA),
    )


# --------------------------------------------------------------------------- tree_expand
@pytest.mark.parametrize("vocab", [32000, 152064])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_frontier, top_k", [(1, 10), (10, 10), (4, 64)])
def test_tree_expand_large_vocab(vocab, dtype, num_frontier, top_k):
    gen = _generator(vocab + 7 * num_frontier + top_k)
    batch, pool_offset = 3, 5
    pool_size = pool_offset + num_frontier * top_k + 3
    # Logits on a 1/64 grid: exact ties happen (and must go to the lower id), but distinct
    # logits never round to the same log-probability in either implementation.
    logits = (torch.randn(batch, num_frontier, vocab, generator=gen, device=CUDA) * 256).round() / 64
    logits = logits.to(dtype)
    frontier_scores = -4 * torch.rand(batch, num_frontier, generator=gen, device=CUDA)
    frontier_pool_index = torch.randint(-1, pool_offset, (batch, num_frontier), generator=gen, device=CUDA)
    ref_pool = _poisoned_pool(batch, pool_size)
    pool = _poisoned_pool(batch, pool_size)

    ref = msd_kernels.tree_expand(logits, frontier_scores, frontier_pool_index, *ref_pool, pool_offset, top_k,
                                  backend="reference")
    _dirty_allocator()
    tokens, scores, pool_index = msd_kernels.tree_expand(
        logits, frontier_scores, frontier_pool_index, *pool, pool_offset, top_k, backend="compiled"
    )

    # Children per node: exact tokens and parents, scores up to float32 rounding of log(sum).
    torch.testing.assert_close(pool[0], ref_pool[0], rtol=0, atol=0)
    torch.testing.assert_close(pool[2], ref_pool[2], rtol=0, atol=0)
    torch.testing.assert_close(pool[1], ref_pool[1], rtol=1e-5, atol=1e-5)
    # Next frontier: candidates of different nodes can sit within rounding of each other, so
    # check what was picked by its reference score rather than by its index.
    torch.testing.assert_close(scores, ref[1], rtol=1e-5, atol=1e-5)
    assert bool(((pool_index >= pool_offset) & (pool_index < pool_offset + num_frontier * top_k)).all())
    assert all(len(set(row)) == top_k for row in pool_index.tolist()), "a candidate was picked twice"
    torch.testing.assert_close(ref_pool[1].gather(1, pool_index), ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, ref_pool[0].gather(1, pool_index), rtol=0, atol=0)


def test_tree_expand_ties_go_to_lower_token_id():
    vocab, top_k = 32000, 8
    logits = torch.zeros(2, 1, vocab, device=CUDA)
    hot = torch.tensor([31999, 17, 20000, 5, 17000, 9, 300, 12345, 77], device=CUDA)
    logits[:, 0, hot] = 3.0  # nine equal maxima: the eight lowest ids win, in id order
    pool = _poisoned_pool(2, top_k)
    tokens, _, pool_index = msd_kernels.tree_expand(
        logits, torch.zeros(2, 1, device=CUDA), torch.full((2, 1), -1, dtype=torch.int64, device=CUDA), *pool, 0,
        top_k, backend="compiled",
    )
    expected = hot.sort().values[:top_k]
    assert tokens.tolist() == [expected.tolist()] * 2
    assert pool_index.tolist() == [list(range(top_k))] * 2
    assert pool[2].tolist() == [[-1] * top_k] * 2


# --------------------------------------------------------------------------- tree_assemble
def _expanded_pool(batch: int, top_k: int, depth: int, vocab: int, seed: int):
    """A pool grown by `depth` reference expansion steps on random logits."""
    gen = _generator(seed)
    pool = msd_kernels.new_tree_pool(batch, top_k, depth, device=CUDA)
    scores = torch.zeros(batch, 1, device=CUDA)
    index = torch.full((batch, 1), -1, dtype=torch.int64, device=CUDA)
    offset = 0
    for _ in range(depth + 1):
        logits = torch.randn(batch, scores.shape[1], vocab, generator=gen, device=CUDA) * 3
        _, scores, index = reference.tree_expand(logits, scores, index, *pool, offset, top_k)
        offset += logits.shape[1] * top_k
    return pool


def _random_pool(batch: int, size: int, seed: int):
    """Pool of a random tree: parent before child, child score below its parent's."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.empty(batch, size, dtype=torch.int64)
    scores = torch.empty(batch, size)
    for j in range(size):
        parents[:, j] = torch.randint(-1, j, (batch,), generator=gen) if j > 0 else -1
        above = scores.gather(1, parents[:, j : j + 1].clamp(min=0)).squeeze(1)
        scores[:, j] = torch.where(parents[:, j] == -1, 0.0, above) - torch.rand(batch, generator=gen)
    tokens = torch.randint(0, 32000, (batch, size), generator=gen)
    return tokens.to(CUDA), scores.to(CUDA), parents.to(CUDA)


def _check_assemble(pool, num_nodes: int) -> None:
    root = torch.arange(pool[0].shape[0], device=CUDA) + 1000
    expected = reference.tree_assemble(*pool, root, num_nodes)
    _dirty_allocator()
    actual = msd_kernels.tree_assemble(*pool, root, num_nodes, backend="compiled")
    names = ("tokens", "depth", "parent", "mask", "first_child", "next_sibling")
    for name, got, want in zip(names, actual, expected):
        assert torch.equal(got, want), f"tree_assemble: {name} differs from the reference"


@pytest.mark.parametrize("num_nodes", [59, 127])
def test_tree_assemble_pool_510(num_nodes):
    _check_assemble(_expanded_pool(batch=4, top_k=10, depth=5, vocab=1000, seed=num_nodes), num_nodes)


def test_tree_assemble_score_ties():
    tokens, scores, parents = _expanded_pool(batch=3, top_k=10, depth=5, vocab=50, seed=3)
    # Flooring keeps child <= parent, and a tie with the parent goes to the parent's lower index.
    _check_assemble((tokens, torch.floor(scores * 2) / 2, parents), 59)


def test_tree_assemble_chain_of_1024():
    # k = 1: 1023 nodes in a chain, 16 mask words per row.
    _check_assemble(_expanded_pool(batch=2, top_k=1, depth=1023, vocab=100, seed=1), 1023)


def test_tree_assemble_largest_pool():
    _check_assemble(_random_pool(batch=2, size=msd_kernels.MAX_POOL_SIZE, seed=2), 1023)


# --------------------------------------------------------------------------- kv_compact
def _check_kv_compact(kv_cache, accepted_index, num_accepted, prefix_len) -> None:
    expected_cache, expected_prefix = kv_cache.clone(), prefix_len.clone()
    reference.kv_compact(expected_cache, accepted_index, num_accepted, expected_prefix)
    msd_kernels.kv_compact(kv_cache, accepted_index, num_accepted, prefix_len, backend="compiled")
    assert torch.equal(prefix_len, expected_prefix)
    assert torch.equal(kv_cache, expected_cache)


def _compaction_case(planes: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, storage_offset=0):
    """Three sequences: overlapping moves ([0, 2, 3]: 2 -> 1 while 3 -> 2), nothing to move,
    and a long path ending at the last cache row; plus a non-monotonic row [0, 5, 5, 1]."""
    gen = _generator(head_dim)
    numel = planes * 4 * heads * max_len * head_dim
    storage = torch.randint(-100, 100, (numel + storage_offset,), generator=gen, device=CUDA).to(dtype)
    kv_cache = storage[storage_offset:].view(planes, 4, heads, max_len, head_dim)
    accepted_index = torch.tensor(
        [[0, 2, 3, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1, -1],
         [0, 1, 4, 6, 9, -1, -1, -1], [0, 5, 5, 1, -1, -1, -1, -1]],
        device=CUDA,
    )
    num_accepted = torch.tensor([2, 0, 4, 3], device=CUDA)
    prefix_len = torch.tensor([0, 17, max_len - 10, 40], dtype=torch.int32, device=CUDA)
    return kv_cache, accepted_index, num_accepted, prefix_len


def test_kv_compact_32_layers():
    _check_kv_compact(*_compaction_case(planes=64, heads=8, max_len=300, head_dim=128, dtype=torch.float16))


@pytest.mark.parametrize(
    "head_dim, dtype, storage_offset",
    [
        (128, torch.bfloat16, 0),  # 16-byte words
        (12, torch.bfloat16, 0),   # 24-byte rows: 8-byte words
        (3, torch.float32, 0),     # 4-byte words
        (5, torch.float16, 0),     # 2-byte words
        (7, torch.uint8, 0),       # bytes
        (128, torch.float16, 1),   # base address off by 2 bytes: 2-byte words
        (64, torch.float32, 0),
    ],
)
def test_kv_compact_row_layouts(head_dim, dtype, storage_offset):
    _check_kv_compact(*_compaction_case(4, 2, 64, head_dim, dtype, storage_offset))


def test_kv_compact_bad_sequence_left_untouched():
    kv_cache, accepted_index, num_accepted, prefix_len = _compaction_case(4, 2, 64, 16, torch.float16)
    accepted_index[1, 1] = 63  # sequence 1 moves a row past the end of its cache
    num_accepted[1] = 1
    before, before_prefix = kv_cache.clone(), prefix_len.clone()
    good = [0, 2, 3]
    msd_kernels.kv_compact(kv_cache, accepted_index, num_accepted, prefix_len, backend="compiled")
    assert torch.equal(kv_cache[:, 1], before[:, 1])
    assert prefix_len[1] == before_prefix[1]
    expected_cache, expected_prefix = before[:, good].clone(), before_prefix[good].clone()
    reference.kv_compact(expected_cache, accepted_index[good], num_accepted[good], expected_prefix)
    assert torch.equal(kv_cache[:, good], expected_cache)
    assert torch.equal(prefix_len[good], expected_prefix)


# --------------------------------------------------------------------------- verification
def _tree(batch: int, num_nodes: int, seed: int):
    """tokens, first_child, next_sibling of assembled trees ([B, T+1] each)."""
    pool = _expanded_pool(batch, top_k=10, depth=max(1, num_nodes // 10), vocab=32000, seed=seed)
    root = torch.zeros(batch, dtype=torch.int64, device=CUDA)
    tokens, _, parent, _, first_child, next_sibling = reference.tree_assemble(*pool, root, num_nodes)
    return tokens, parent, first_child, next_sibling


def _favour_random_paths(rows: torch.Tensor, tokens, parent, value: float, seed: int) -> None:
    """rows [B, T+1, V]: at every node, give `value` to the token of one random child, so
    that long paths get accepted."""
    gen = torch.Generator().manual_seed(seed)
    for b, (row_tokens, row_parent) in enumerate(zip(tokens.tolist(), parent.tolist())):
        for node in range(len(row_tokens)):
            children = [child for child, p in enumerate(row_parent) if p == node]
            if children and torch.rand(1, generator=gen).item() < 0.8:
                child = children[torch.randint(len(children), (1,), generator=gen).item()]
                rows[b, node, row_tokens[child]] = value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_nodes", [59, 127])
def test_verify_greedy_32000(dtype, num_nodes):
    batch, vocab = 4, 32000
    tokens, parent, first_child, next_sibling = _tree(batch, num_nodes, seed=num_nodes)
    logits = torch.randn(batch, num_nodes + 1, vocab, generator=_generator(1), device=CUDA)
    _favour_random_paths(logits, tokens, parent, 10.0, seed=2)
    logits = logits.to(dtype)
    expected = reference.verify_greedy(logits, tokens, first_child, next_sibling)
    _dirty_allocator()
    actual = msd_kernels.verify_greedy(logits, tokens, first_child, next_sibling, backend="compiled")
    for got, want in zip(actual, expected):
        assert torch.equal(got, want)
    assert int(expected[1].max()) >= 2, "the test should accept paths of several nodes"


def test_verify_greedy_argmax_ties_go_to_lowest_id():
    tokens, parent, first_child, next_sibling = _tree(2, 59, seed=5)
    logits = torch.zeros(2, 60, 32000, dtype=torch.float16, device=CUDA)
    _favour_random_paths(logits, tokens, parent, 1.0, seed=6)
    # Every row's maximum 1.0 is shared by the favoured child's token and id 31999 (row 0:
    # the child wins, paths get accepted) and also by id 3 (row 1: id 3 wins, nothing is).
    logits[:, :, 31999] = 1.0
    logits[1, :, 3] = 1.0
    expected = reference.verify_greedy(logits, tokens, first_child, next_sibling)
    actual = msd_kernels.verify_greedy(logits, tokens, first_child, next_sibling, backend="compiled")
    for got, want in zip(actual, expected):
        assert torch.equal(got, want)


def _sampling_probs(tokens, parent, vocab: int, seed: int) -> torch.Tensor:
    batch, size = tokens.shape
    probs = torch.randn(batch, size, vocab, generator=_generator(seed), device=CUDA).mul(2).softmax(-1)
    favoured = torch.zeros_like(probs)
    _favour_random_paths(favoured, tokens, parent, 1.0, seed=seed)
    return (probs + favoured) / (1 + favoured.sum(-1, keepdim=True))


def test_verify_sampling_matches_reference_and_advances_offset():
    tokens, parent, first_child, next_sibling = _tree(16, 59, seed=7)
    probs = _sampling_probs(tokens, parent, 32000, seed=8)
    rng_state = torch.tensor([1234567, 42], dtype=torch.int64, device=CUDA)
    ref_state = rng_state.clone()
    for _ in range(2):  # the second call must use the advanced offset
        expected = reference.verify_sampling(probs, tokens, first_child, next_sibling, ref_state)
        _dirty_allocator()
        actual = msd_kernels.verify_sampling(probs, tokens, first_child, next_sibling, rng_state, backend="compiled")
        for got, want in zip(actual, expected):
            assert torch.equal(got, want)
        assert torch.equal(rng_state, ref_state)
    assert rng_state.tolist() == [1234567, 44]


def test_verify_sampling_empty_batch_still_advances_offset():
    rng_state = torch.tensor([1, 2**40], dtype=torch.int64, device=CUDA)
    empty = torch.empty(0, 3, dtype=torch.int64, device=CUDA)
    msd_kernels.verify_sampling(torch.empty(0, 3, 5, device=CUDA), empty, empty, empty, rng_state, backend="compiled")
    assert rng_state.tolist() == [1, 2**40 + 1]


def test_verify_sampling_is_lossless_over_100k_rows():
    """The first emitted token follows the root's distribution, and the second, given that
    the first child was accepted, follows that child's distribution."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rows, vocab = 100_000, 8
    # root 0 -> children 1 (token 3), 2 (token 1), 3 (token 5); node 1 -> 4 (token 2), 5 (token 3).
    tree_tokens = torch.tensor([0, 3, 1, 5, 2, 3], device=CUDA).expand(rows, 6).contiguous()
    first_child = torch.tensor([1, 4, -1, -1, -1, -1], device=CUDA).expand(rows, 6).contiguous()
    next_sibling = torch.tensor([-1, 2, 3, -1, 5, -1], device=CUDA).expand(rows, 6).contiguous()
    node_probs = torch.randn(6, vocab, generator=_generator(9), device=CUDA).softmax(-1)
    node_probs[0] = (node_probs[0] + torch.nn.functional.one_hot(torch.tensor(3), vocab).to(CUDA)) / 2
    probs = node_probs.expand(rows, 6, vocab).contiguous()
    rng_state = torch.tensor([2024, 0], dtype=torch.int64, device=CUDA)

    accepted, num_accepted, bonus = msd_kernels.verify_sampling(
        probs, tree_tokens, first_child, next_sibling, rng_state, backend="compiled"
    )
    emitted = torch.cat([tree_tokens.gather(1, accepted.clamp(min=0))[:, 1:], bonus[:, None]], 1)
    emitted = torch.where(torch.arange(6, device=CUDA) < num_accepted[:, None], emitted,
                          bonus[:, None].expand(rows, 6))  # path tokens, then the bonus

    def check(samples: torch.Tensor, expected: torch.Tensor, max_tv: float) -> None:
        counts = torch.bincount(samples, minlength=vocab).double().cpu()
        expected = expected.double().cpu()
        expected /= expected.sum()
        _, p_value = scipy_stats.chisquare(counts.numpy(), (expected * counts.sum()).numpy())
        tv = 0.5 * (counts / counts.sum() - expected).abs().sum().item()
        assert p_value > 1e-4 and tv < max_tv, f"p = {p_value:.2e}, TV = {tv:.4f}"

    check(emitted[:, 0], node_probs[0], 0.01)
    first_child_taken = emitted[:, 0] == 3  # token 3 is emitted first only when node 1 is accepted
    check(emitted[first_child_taken, 1], node_probs[1], 0.02)
    assert rng_state.tolist() == [2024, 1]

    # The same rows, replayed by the reference on a few of them.
    ref_state = torch.tensor([2024, 0], dtype=torch.int64, device=CUDA)
    expected = reference.verify_sampling(probs[:64], tree_tokens[:64], first_child[:64], next_sibling[:64], ref_state)
    assert torch.equal(accepted[:64], expected[0])
    assert torch.equal(num_accepted[:64], expected[1])
    assert torch.equal(bonus[:64], expected[2])


# --------------------------------------------------------------------------- torch glue
def _i64(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.int64, device=CUDA)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.msd.tree_expand(torch.zeros(1, 1, 100, device=CUDA), torch.zeros(1, 1, device=CUDA),
                                           _i64(1, 1), *_poisoned_pool(1, 200), 0, 65), "top_k"),
        (lambda: torch.ops.msd.tree_assemble(_i64(1, 20000), torch.zeros(1, 20000, device=CUDA), _i64(1, 20000),
                                             _i64(1), 10), "pool size"),
        (lambda: torch.ops.msd.kv_compact(torch.zeros(2, 1, 1, 8, 4, device=CUDA), _i64(1, 2000), _i64(1),
                                          torch.zeros(1, dtype=torch.int32, device=CUDA)), "accepted_index"),
        (lambda: torch.ops.msd.verify_greedy(torch.zeros(1, 3, 5, dtype=torch.float64, device=CUDA), _i64(1, 3),
                                             _i64(1, 3), _i64(1, 3)), "logits"),
        (lambda: torch.ops.msd.verify_sampling(torch.zeros(1, 3, 5, device=CUDA), _i64(1, 3), _i64(1, 3), _i64(1, 3),
                                               torch.zeros(2, dtype=torch.int64)), "rng_state"),
    ],
)
def test_glue_rejects_bad_arguments(call, message):
    """The CUDA ops called directly (no Python wrapper) still name the bad argument."""
    msd_kernels.load_library()
    with pytest.raises(RuntimeError, match=message):
        call()
