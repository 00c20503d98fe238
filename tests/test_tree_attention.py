"""tree_attention (op 2): compiled kernel vs the reference, and vs independent attention.

The independent checks follow vLLM's tree-attention test: every tree row must equal plain
attention over the prefix plus its own root-to-node path, computed with
``torch.nn.functional.scaled_dot_product_attention`` over exactly those keys. With
``tree_len > Q`` (the draft's tree levels: the queries are the last rows of a longer tree
section) each query must equal attention over the prefix and the tree rows its mask names.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import msd_kernels
from msd_kernels import composite

# (rtol, atol) against the float32-accumulating reference: float32 sums in another order (a
# large scale amplifies the logits' rounding); half types also round the output.
TOLERANCE = {torch.float32: (1e-5, 5e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}


def random_parents(num_new: int, generator: torch.Generator) -> list[int]:
    """A random tree over ``num_new`` nodes in topological order: node 0 is the root."""
    return [-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, num_new)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Bool ``[Q, Q]``: row i = node i and its ancestors (its parent's row plus its own bit)."""
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def path(parents: list[int], node: int) -> list[int]:
    """Root-to-node list of tree indices."""
    nodes = []
    while node >= 0:
        nodes.append(node)
        node = parents[node]
    return nodes[::-1]


def make_inputs(batch, num_q_heads, num_kv_heads, num_new, head_dim, prefix, dtype, device, seed, slack=3,
                tree_len=None):
    """Random q / k_cache / v_cache with room for ``prefix[b] + tree_len`` rows (default
    ``tree_len = num_new``), plus slack."""
    generator = torch.Generator().manual_seed(seed)
    max_len = max(prefix) + (num_new if tree_len is None else tree_len) + slack
    q = torch.randn(batch, num_q_heads, num_new, head_dim, generator=generator)
    k_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=generator)
    v_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=generator)
    prefix_len = torch.tensor(prefix, dtype=torch.int32)
    return [
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (q, k_cache, v_cache, prefix_len)
    ]


# The implementations checked against the reference: the compiled op (the CUDA kernel where
# it covers the input, else the SDPA composition) and the SDPA composition on its own.
IMPLEMENTATIONS = {
    "compiled": lambda *args: msd_kernels.tree_attention(*args, backend="compiled"),
    "sdpa": composite.tree_attention_sdpa,
}


def run_both(*args, implementation="compiled"):
    """An implementation and the reference on the same arguments."""
    return IMPLEMENTATIONS[implementation](*args), msd_kernels.tree_attention(*args, backend="reference")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol)


def sdpa(q, keys, values, mask=None, scale=None, is_causal=False):
    """float32 SDPA with grouped-query heads: q ``[Hq, L, D]``, keys/values ``[Hkv, S, D]``."""
    return F.scaled_dot_product_attention(
        q.float(),
        keys.float(),
        values.float(),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=True,
    )


# --------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=100)
@given(
    batch=st.integers(1, 3),
    heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]),
    head_dim=st.sampled_from([16, 64, 80, 128]),
    num_new=st.sampled_from([1, 2, 7, 63, 64, 65, 128]),
    mask_kind=st.sampled_from(["tree", "random", "none"]),
    scale=st.none() | st.floats(0.01, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_matches_reference(implementation, device, batch, heads, head_dim, num_new, mask_kind, scale, dtype, data):
    prefix = data.draw(st.lists(st.sampled_from([0, 1, 5, 64, 70, 130]), min_size=batch, max_size=batch))
    seed = data.draw(st.integers(0, 2**31 - 1))
    q, k_cache, v_cache, prefix_len = make_inputs(
        batch, *heads, num_new, head_dim, prefix, dtype, device, seed
    )
    generator = torch.Generator().manual_seed(seed)
    if mask_kind == "tree":
        allowed = torch.stack([ancestor_mask(random_parents(num_new, generator)) for _ in range(batch)])
    else:  # arbitrary bits, empty rows included: the kernel must not assume a tree
        allowed = torch.rand(batch, num_new, num_new, generator=generator) < 0.3
    tree_mask = None if mask_kind == "none" else msd_kernels.pack_mask(allowed).to(device)
    compiled, expected = run_both(q, k_cache, v_cache, prefix_len, tree_mask, scale, implementation=implementation)
    assert compiled.dtype == dtype and compiled.shape == q.shape
    assert_close(compiled, expected, dtype)


# --------------------------------------------------------------------------- tree_len
# The queries are the last Q of tree_len >= Q tree rows, as in the draft's tree levels.
def tree_len_choices(num_new: int) -> list[int]:
    """tree_len values worth testing for Q = num_new: Q itself, one more, and around the
    64-bit word boundaries (one to three mask words, the queries anywhere in them)."""
    return sorted({num_new, num_new + 1, 63, 64, 65, 128, 130} - set(range(num_new)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=60)
@given(
    batch=st.integers(1, 3),
    heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]),
    head_dim=st.sampled_from([16, 64, 80]),
    num_new=st.sampled_from([1, 2, 7, 64]),
    mask_kind=st.sampled_from(["tree", "random", "none"]),
    scale=st.none() | st.floats(0.01, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_tree_len_matches_reference(implementation, device, batch, heads, head_dim, num_new, mask_kind, scale,
                                    dtype, data):
    tree_len = data.draw(st.sampled_from(tree_len_choices(num_new)))
    prefix = data.draw(st.lists(st.sampled_from([0, 1, 5, 64, 70, 130]), min_size=batch, max_size=batch))
    seed = data.draw(st.integers(0, 2**31 - 1))
    q, k_cache, v_cache, prefix_len = make_inputs(
        batch, *heads, num_new, head_dim, prefix, dtype, device, seed, tree_len=tree_len
    )
    generator = torch.Generator().manual_seed(seed)
    if mask_kind == "tree":  # the queries are the last Q nodes of a random tree of tree_len nodes
        allowed = torch.stack(
            [ancestor_mask(random_parents(tree_len, generator))[tree_len - num_new :] for _ in range(batch)]
        )
    else:  # arbitrary bits, empty rows included
        allowed = torch.rand(batch, num_new, tree_len, generator=generator) < 0.3
    tree_mask = None if mask_kind == "none" else msd_kernels.pack_mask(allowed).to(device)
    args = (q, k_cache, v_cache, prefix_len, tree_mask, scale, tree_len)
    compiled, expected = run_both(*args, implementation=implementation)
    assert compiled.dtype == dtype and compiled.shape == q.shape
    assert_close(compiled, expected, dtype)


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "reference"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_len_equal_to_q_is_exactly_the_default(device, implementation, masked, dtype):
    q, k_cache, v_cache, prefix_len = make_inputs(2, 8, 2, 70, 64, [0, 9], dtype, device, 17)
    generator = torch.Generator().manual_seed(17)
    allowed = torch.stack([ancestor_mask(random_parents(70, generator)) for _ in range(2)])
    tree_mask = msd_kernels.pack_mask(allowed).to(device) if masked else None
    run = {**IMPLEMENTATIONS, "reference": lambda *a: msd_kernels.tree_attention(*a, backend="reference")}
    default = run[implementation](q, k_cache, v_cache, prefix_len, tree_mask, None)
    explicit = run[implementation](q, k_cache, v_cache, prefix_len, tree_mask, None, 70)
    assert torch.equal(default, explicit)


# --------------------------------------------------------------------------- independent checks
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("num_new", [5, 70])
def test_tree_row_equals_attention_over_its_path(device, heads, num_new):
    prefix = [0, 9]
    q, k_cache, v_cache, prefix_len = make_inputs(2, *heads, num_new, 32, prefix, torch.float32, device, 7)
    generator = torch.Generator().manual_seed(1)
    parents = [random_parents(num_new, generator) for _ in prefix]
    tree_mask = msd_kernels.pack_mask(torch.stack([ancestor_mask(p) for p in parents])).to(device)
    out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, backend="compiled")
    for b, start in enumerate(prefix):
        for i in range(num_new):
            rows = list(range(start)) + [start + node for node in path(parents[b], i)]
            expected = sdpa(q[b, :, i : i + 1], k_cache[b, :, rows], v_cache[b, :, rows])
            assert_close(out[b, :, i : i + 1], expected, torch.float32)


@pytest.mark.parametrize("num_new, tree_len", [(1, 2), (5, 12), (6, 70), (64, 130)])
@pytest.mark.parametrize("masked", [True, False])
def test_query_sees_the_prefix_and_its_visible_tree_rows(device, num_new, tree_len, masked):
    """With tree_len > Q, query i (tree row tree_len - Q + i) equals SDPA over the prefix and
    exactly the tree rows its mask row names, or tree rows 0 .. tree_len - Q + i without a mask."""
    prefix = [0, 9]
    q, k_cache, v_cache, prefix_len = make_inputs(
        2, 8, 2, num_new, 32, prefix, torch.float32, device, 21, tree_len=tree_len
    )
    allowed = torch.rand(2, num_new, tree_len, generator=torch.Generator().manual_seed(2)) < 0.5
    tree_mask = msd_kernels.pack_mask(allowed).to(device) if masked else None
    out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, tree_len=tree_len, backend="compiled")
    for b, start in enumerate(prefix):
        for i in range(num_new):
            if masked:
                visible = [j for j in range(tree_len) if allowed[b, i, j]]
            else:
                visible = list(range(tree_len - num_new + i + 1))
            rows = list(range(start)) + [start + j for j in visible]
            if rows:
                expected = sdpa(q[b, :, i : i + 1], k_cache[b, :, rows], v_cache[b, :, rows])
            else:  # empty prefix, empty mask row
                expected = torch.zeros(8, 1, 32)
            assert_close(out[b, :, i : i + 1], expected, torch.float32)


def draft_level_parents(batch: int, top_k: int, depth: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A real draft tree grown by tree_expand as msd.tree_draft grows it: per level d,
    ``[B, k]`` index of each node's parent among level d - 1 (-1 at level 0: the root, whose
    K/V are already committed, has no tree row)."""
    vocab = 20
    pool = msd_kernels.new_tree_pool(batch, top_k, depth)
    frontier = msd_kernels.tree_expand(
        torch.randn(batch, 1, vocab, generator=generator), torch.zeros(batch, 1),
        torch.full((batch, 1), -1), *pool, 0, top_k,
    )
    parents = [torch.full((batch, top_k), -1)]
    for step in range(depth - 1):
        offset = msd_kernels.pool_size(top_k, step)
        logits = torch.randn(batch, top_k, vocab, generator=generator)
        frontier = msd_kernels.tree_expand(logits, frontier[1], frontier[2], *pool, offset, top_k)
        parents.append(torch.div(frontier[2] - offset, top_k, rounding_mode="floor"))
    return parents


@pytest.mark.parametrize("top_k, depth", [(1, 4), (4, 3), (8, 10)])
def test_draft_level_equals_attention_over_its_path(device, top_k, depth):
    # Level d's k nodes are tree rows d*k .. d*k + k - 1, after the earlier levels' rows: Q = k,
    # tree_len = (d+1)*k, a node's mask row is its ancestors among earlier levels plus itself.
    # Rows of later levels already sit in the cache and must stay invisible.
    prefix = [3, 40]
    q, k_cache, v_cache, prefix_len = make_inputs(
        2, 8, 2, top_k, 32, prefix, torch.float32, device, 5, tree_len=depth * top_k
    )
    parents = draft_level_parents(2, top_k, depth, torch.Generator().manual_seed(top_k))
    seen = torch.zeros(2, top_k, 0, dtype=torch.bool)  # [B, k, d*k]: tree rows seen by level d's nodes
    for d in range(depth):
        tree_len = (d + 1) * top_k
        inherited = seen.gather(1, parents[d].clamp(min=0)[..., None].expand_as(seen))  # the parent's row
        seen = torch.cat([inherited, torch.eye(top_k, dtype=torch.bool).expand(2, -1, -1)], dim=2)
        tree_mask = msd_kernels.pack_mask(seen).to(device)
        out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, tree_len=tree_len,
                                         backend="compiled")
        for b, start in enumerate(prefix):
            for i in range(top_k):
                level_path, node = [], i  # walk up through the parents: this node's root-to-node path
                for level in range(d, -1, -1):
                    level_path.append(level * top_k + node)
                    node = int(parents[level][b, node])
                rows = list(range(start)) + [start + row for row in reversed(level_path)]
                expected = sdpa(q[b, :, i : i + 1], k_cache[b, :, rows], v_cache[b, :, rows])
                assert_close(out[b, :, i : i + 1], expected, torch.float32)


@pytest.mark.parametrize("num_new", [1, 6, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_mask_is_a_causal_chunk(device, num_new, dtype):
    prefix = [0, 3, 100]
    q, k_cache, v_cache, prefix_len = make_inputs(3, 8, 2, num_new, 64, prefix, dtype, device, 3)
    out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, scale=0.3, backend="compiled")
    for b, start in enumerate(prefix):
        total = start + num_new
        keys, values = k_cache[b, :, :total], v_cache[b, :, :total]
        if start == 0:
            expected = sdpa(q[b], keys, values, scale=0.3, is_causal=True)
        else:  # query i sits at position start + i and sees every key up to there
            causal = torch.ones(num_new, total, dtype=torch.bool, device=device).tril(start)
            expected = sdpa(q[b], keys, values, mask=causal, scale=0.3)
        assert_close(out[b], expected, dtype)


def test_all_ones_mask_sees_everything(device):
    num_new, prefix = 67, [0, 40]
    q, k_cache, v_cache, prefix_len = make_inputs(2, 4, 2, num_new, 16, prefix, torch.float32, device, 5)
    all_ones = msd_kernels.pack_mask(torch.ones(2, num_new, num_new, dtype=torch.bool)).to(device)
    out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, all_ones, backend="compiled")
    for b, start in enumerate(prefix):
        total = start + num_new
        assert_close(out[b], sdpa(q[b], k_cache[b, :, :total], v_cache[b, :, :total]), torch.float32)


def test_row_that_sees_nothing_is_zero(device):
    allowed = ancestor_mask([-1, 0, 0, 1])
    allowed[2] = False  # node 2 sees no token, and the prefix is empty
    q, k_cache, v_cache, prefix_len = make_inputs(1, 4, 4, 4, 16, [0], torch.float32, device, 11)
    tree_mask = msd_kernels.pack_mask(allowed[None]).to(device)
    compiled, expected = run_both(q, k_cache, v_cache, prefix_len, tree_mask)
    assert torch.equal(compiled[:, :, 2].cpu(), torch.zeros(1, 4, 16))
    assert_close(compiled, expected, torch.float32)


def test_hand_computed_uniform_attention(device):
    # q = 0 makes every visible score equal, so each output is the mean of the visible values.
    values = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, -4.0], [100.0, 100.0]])  # row 3 is unused
    v_cache = values[None, None].to(device)
    k_cache = torch.randn(1, 1, 4, 2).to(device)
    q = torch.zeros(1, 1, 2, 2, device=device)
    prefix_len = torch.tensor([1], dtype=torch.int32, device=device)
    siblings = msd_kernels.pack_mask(torch.eye(2, dtype=torch.bool)[None]).to(device)
    out = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, siblings, backend="compiled")
    expected = torch.tensor([[2.0, 1.0], [3.0, -2.0]])  # (v0 + v1) / 2, (v0 + v2) / 2
    torch.testing.assert_close(out[0, 0].cpu(), expected)
    chain = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, backend="compiled")
    torch.testing.assert_close(chain[0, 0, 1].cpu(), torch.tensor([3.0, -2.0 / 3.0]))  # (v0+v1+v2)/3


def test_masked_and_unused_rows_have_exactly_zero_weight(device):
    # q = 0 makes every visible score equal: the output is the exact mean of the visible
    # values, with no trace of the huge values of masked new tokens or of the unused rows
    # behind them (kernels that give a masked key a tiny weight instead of 0 would leak them).
    num_new, prefix, head_dim = 3, 70, 4  # the new tokens straddle a 64-row key block
    v_cache = torch.ones(1, 2, prefix + num_new + 60, head_dim)
    v_cache[:, :, prefix + 1] = 1e30  # new token 1: seen by row 1 only
    v_cache[:, :, prefix + num_new :] = 1e30  # unused rows
    v_cache[:, :, prefix] = 4.0  # new token 0 (the root): seen by every row
    k_cache = torch.randn(v_cache.shape)
    q = torch.zeros(1, 4, num_new, head_dim)
    parents = [-1, 0, 0]
    tree_mask = msd_kernels.pack_mask(ancestor_mask(parents)[None]).to(device)
    out = msd_kernels.tree_attention(
        q.to(device), k_cache.to(device), v_cache.to(device),
        torch.tensor([prefix], dtype=torch.int32, device=device), tree_mask, backend="compiled",
    )
    # Prefix rows of ones, the root's 4 and, for row 2, its own 1.
    for row, expected in ((0, (prefix + 4.0) / (prefix + 1)), (2, (prefix + 5.0) / (prefix + 2))):
        torch.testing.assert_close(out[0, :, row].cpu(), torch.full((4, head_dim), expected))
    assert out[0, :, 1].min() > 1e27  # row 1 does see token 1


def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k_cache, v_cache, prefix_len = make_inputs(1, 2, 1, 3, 80, [10], torch.float32, device, 2)
    default = msd_kernels.tree_attention(q, k_cache, v_cache, prefix_len, backend="compiled")
    explicit = msd_kernels.tree_attention(
        q, k_cache, v_cache, prefix_len, scale=1 / math.sqrt(80), backend="compiled"
    )
    torch.testing.assert_close(default, explicit)


@pytest.mark.parametrize("layout", ["cache_slice", "seq_major", "strided_features"])
def test_non_contiguous_cache(device, layout):
    q, k_cache, v_cache, prefix_len = make_inputs(2, 4, 2, 9, 16, [4, 20], torch.float32, device, 4)
    if layout == "cache_slice":  # a view of a larger cache: dense rows, batch/head strides differ
        views = [torch.cat([c, torch.randn_like(c)], dim=2)[:, :, : c.shape[2]] for c in (k_cache, v_cache)]
    elif layout == "seq_major":  # [B, S, H, D] storage seen as [B, H, S, D]
        views = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache)]
    else:  # every other feature of a wider buffer: the kernel must copy
        views = [
            torch.stack([c, torch.randn_like(c)], dim=-1).flatten(-2)[..., ::2] for c in (k_cache, v_cache)
        ]
    assert not views[0].is_contiguous() and torch.equal(views[0], k_cache)
    compiled, expected = run_both(q, *views, prefix_len)
    assert_close(compiled, expected, torch.float32)


# --------------------------------------------------------------------------- bad input
# The CPU kernel reads prefix_len on the host for free; a CUDA kernel cannot without a sync.
@pytest.mark.parametrize("prefix", [[-1, 0], [0, 8]])
def test_prefix_len_out_of_range_is_an_error(prefix):
    q, k_cache, v_cache, _ = make_inputs(2, 2, 2, 4, 16, [4, 4], torch.float32, "cpu", 0)  # S_max = 11
    bad = torch.tensor(prefix, dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError), match="prefix_len"):
        msd_kernels.tree_attention(q, k_cache, v_cache, bad, backend="compiled")
    good = torch.tensor([0, 7], dtype=torch.int32)  # 7 + 4 = S_max: the last rows still fit
    compiled, expected = run_both(q, k_cache, v_cache, good)
    assert_close(compiled, expected, torch.float32)


def test_prefix_len_leaves_room_for_tree_len():
    q, k_cache, v_cache, _ = make_inputs(2, 2, 2, 4, 16, [4, 4], torch.float32, "cpu", 0)  # S_max = 11
    with pytest.raises((RuntimeError, ValueError), match="prefix_len"):  # 5 + 7 > S_max
        msd_kernels.tree_attention(q, k_cache, v_cache, torch.tensor([0, 5], dtype=torch.int32), tree_len=7,
                                   backend="compiled")
    good = torch.tensor([0, 4], dtype=torch.int32)  # 4 + 7 = S_max: the last rows still fit
    compiled, expected = run_both(q, k_cache, v_cache, good, None, None, 7)
    assert_close(compiled, expected, torch.float32)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: {**a, "v_cache": a["v_cache"][:, :, :-1]}, "v_cache"),
        (lambda a: {**a, "tree_len": 3}, "tree_len"),  # < Q = 4
        (lambda a: {**a, "tree_len": 10}, "tree_len"),  # > S_max = 9
        (lambda a: {**a, "tree_len": 8, "tree_mask": torch.zeros(1, 4, 2, dtype=torch.int64)}, "tree_mask"),
        (lambda a: {**a, "k_cache": a["k_cache"].double()}, "k_cache"),
        (lambda a: {**a, "prefix_len": a["prefix_len"].long()}, "prefix_len"),
        (lambda a: {**a, "tree_mask": torch.zeros(1, 3, 1, dtype=torch.int64)}, "tree_mask"),
        (
            lambda a: {
                **a,
                "k_cache": a["k_cache"][:, :1].expand(1, 3, -1, -1),
                "v_cache": a["v_cache"][:, :1].expand(1, 3, -1, -1),
            },
            "kv heads",
        ),
    ],
)
def test_kernel_checks_its_arguments(change, name):
    msd_kernels.load_library()
    q, k_cache, v_cache, prefix_len = make_inputs(1, 4, 2, 4, 16, [2], torch.float32, "cpu", 0)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "prefix_len": prefix_len, "tree_mask": None,
            "tree_len": None}
    with pytest.raises(RuntimeError, match=name):
        torch.ops.msd.tree_attention(**change(args))
