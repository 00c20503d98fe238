"""CUDA tree_attention (csrc/cuda/tree_attention.cu) against the reference.

CUDA only: the shared CPU/CUDA tests use the ``device`` fixture; these add the LLaVA-7B
shapes (32 heads, D = 128, bf16, a 60-token tree over 1-4 K prefixes; the draft's tree
levels, whose queries are the last rows of a longer tree section: ``tree_len``), CUDA-graph
replay with new prefix lengths, and the kernel's fp32 / head_dim rejections (which the
wrapper routes to the SDPA composition). Random queries are scaled up so that the
softmax is peaked: the outputs are then O(1) and a key read or dropped by mistake shows
far above the bf16 tolerance.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msd_kernels
from msd_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = "cuda"
# Max abs/rel error and mean abs error allowed against the reference (both round to dtype).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
QUERY_GAIN = 3.0  # logits ~ N(0, 9): a few keys dominate each row


def random_tree_mask(batch: int, num_new: int, generator: torch.Generator, tree_len: int | None = None
                     ) -> torch.Tensor:
    """Packed ancestor masks ``[B, Q, ceil(tree_len/64)]`` of random trees of ``tree_len``
    (default Q) nodes, parent of i < i: the rows of the last Q nodes, the queries."""
    tree_len = num_new if tree_len is None else tree_len
    dense = torch.zeros(batch, tree_len, tree_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(tree_len):
            if i > 0:
                parent = int(torch.randint(0, i, (1,), generator=generator))
                dense[b, i] = dense[b, parent]
            dense[b, i, i] = True
    return reference.pack_mask(dense[:, tree_len - num_new :]).to(CUDA)


def make_inputs(batch, q_heads, kv_heads, num_new, head_dim, prefix, max_len, dtype, seed, tree_len=None):
    """Random q/k/v on CUDA; cache rows past ``prefix + tree_len`` (default ``tree_len = Q``)
    are NaN (they must not be read)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q = QUERY_GAIN * torch.randn(batch, q_heads, num_new, head_dim, generator=g, device=CUDA)
    k = torch.randn(batch, kv_heads, max_len, head_dim, generator=g, device=CUDA)
    v = torch.randn(batch, kv_heads, max_len, head_dim, generator=g, device=CUDA)
    end = num_new if tree_len is None else tree_len
    for b, length in enumerate(prefix):
        k[b, :, length + end :] = math.nan
        v[b, :, length + end :] = math.nan
    prefix_len = torch.tensor(prefix, dtype=torch.int32, device=CUDA)
    return q.to(dtype), k.to(dtype), v.to(dtype), prefix_len


def assert_matches_reference(q, k, v, prefix_len, tree_mask=None, scale=None, tree_len=None):
    """The compiled op equals the reference within the dtype's tolerance, also on average."""
    out = msd_kernels.tree_attention(q, k, v, prefix_len, tree_mask, scale, tree_len, backend="compiled")
    expected = reference.tree_attention(q, k, v, prefix_len, tree_mask, scale, tree_len)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    assert (out.float() - expected.float()).abs().mean() < tol / 4
    return out


@pytest.mark.parametrize("prefix", [1024, 2048, 4096])
def test_llava7b_tree(prefix):
    g = torch.Generator().manual_seed(prefix)
    q, k, v, prefix_len = make_inputs(1, 32, 32, 60, 128, [prefix], prefix + 60 + 37, torch.bfloat16, prefix)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(1, 60, g))


def test_llava7b_batch8_different_prefixes():
    prefixes = [0, 5, 64, 1000, 1024, 2047, 3001, 4096]
    g = torch.Generator().manual_seed(8)
    q, k, v, prefix_len = make_inputs(8, 32, 32, 60, 128, prefixes, 4096 + 60, torch.bfloat16, 8)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(8, 60, g))


@pytest.mark.parametrize("batch", [1, 3])
def test_gqa_32_over_8(batch):
    g = torch.Generator().manual_seed(batch)
    prefixes = [2048, 777, 1500][:batch]
    q, k, v, prefix_len = make_inputs(batch, 32, 8, 60, 128, prefixes, 2200, torch.bfloat16, batch)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(batch, 60, g))


@pytest.mark.parametrize("kv_heads", [32, 8])
def test_decode_single_query(kv_heads):
    prefixes = [1, 63, 64, 65, 1024, 2000, 4095, 4000]
    q, k, v, prefix_len = make_inputs(8, 32, kv_heads, 1, 128, prefixes, 4096, torch.bfloat16, kv_heads)
    out = assert_matches_reference(q, k, v, prefix_len)
    # Q = 1: a one-node tree mask and the causal chunk are the same attention.
    one_node = torch.ones(8, 1, 1, dtype=torch.int64, device=CUDA)
    assert torch.equal(msd_kernels.tree_attention(q, k, v, prefix_len, one_node, backend="compiled"), out)


@pytest.mark.parametrize("prefix", [0, 700])
def test_causal_chunk_q128(prefix):
    q, k, v, prefix_len = make_inputs(2, 32, 8, 128, 128, [prefix, prefix // 2], prefix + 128, torch.bfloat16, prefix)
    out = assert_matches_reference(q, k, v, prefix_len)
    # mask=None means exactly the lower-triangular tree mask: same keys, same arithmetic.
    tril = reference.pack_mask(torch.ones(128, 128, dtype=torch.bool).tril()).expand(2, -1, -1).to(CUDA)
    assert torch.equal(msd_kernels.tree_attention(q, k, v, prefix_len, tril, backend="compiled"), out)


@pytest.mark.parametrize("level", [0, 1, 3, 8])
def test_llava7b_draft_level(level):
    # The draft's tree level d (top-k 8): its 8 nodes are the last rows of a (d+1)*8-row tree
    # section (two mask words at d = 8) over a long prefix; batch 2 with different prefixes.
    g = torch.Generator().manual_seed(level)
    tree_len = (level + 1) * 8
    q, k, v, prefix_len = make_inputs(2, 32, 32, 8, 128, [3001, 1024], 3001 + tree_len + 40, torch.bfloat16,
                                      level, tree_len)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(2, 8, g, tree_len), tree_len=tree_len)


@pytest.mark.parametrize("num_new, tree_len", [(1, 40), (8, 72), (64, 130)])
def test_causal_tree_len_is_the_shifted_tril_mask(num_new, tree_len):
    # mask=None with tree_len: query i sees tree rows 0 .. tree_len - Q + i, exactly the mask
    # tril(tree_len - Q): same keys, same arithmetic.
    q, k, v, prefix_len = make_inputs(2, 8, 2, num_new, 64, [700, 0], 700 + tree_len, torch.bfloat16, num_new,
                                      tree_len)
    out = assert_matches_reference(q, k, v, prefix_len, tree_len=tree_len)
    tril = torch.ones(num_new, tree_len, dtype=torch.bool).tril(tree_len - num_new)
    mask = reference.pack_mask(tril).expand(2, -1, -1).to(CUDA)
    assert torch.equal(msd_kernels.tree_attention(q, k, v, prefix_len, mask, tree_len=tree_len, backend="compiled"),
                       out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims_and_dtypes(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    # Q = 70: two mask words; 4 x 70 query rows per kv head: several 64-row tiles.
    q, k, v, prefix_len = make_inputs(2, 8, 2, 70, head_dim, [300, 129], 512, dtype, head_dim)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(2, 70, g), scale=0.05)


def test_hand_computed_uniform_attention():
    # q = 0: every visible key gets the same weight, so the output is the mean of the
    # visible value rows; row s of V is s everywhere. Prefix 3, tree: 0 <- 1, 0 <- 2.
    q = torch.zeros(1, 2, 3, 64, dtype=torch.bfloat16, device=CUDA)
    k = torch.randn(1, 1, 8, 64, device=CUDA).to(torch.bfloat16)
    v = torch.arange(8, dtype=torch.bfloat16, device=CUDA).view(1, 1, 8, 1).expand(1, 1, 8, 64).contiguous()
    mask = reference.pack_mask(
        torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    ).to(CUDA)
    prefix_len = torch.tensor([3], dtype=torch.int32, device=CUDA)
    out = msd_kernels.tree_attention(q, k, v, prefix_len, mask, backend="compiled")
    means = torch.tensor([(0 + 1 + 2 + 3) / 4, (0 + 1 + 2 + 3 + 4) / 5, (0 + 1 + 2 + 3 + 5) / 5], device=CUDA)
    torch.testing.assert_close(out.float(), means.view(1, 1, 3, 1).expand(1, 2, 3, 64), atol=2e-2, rtol=0)


def test_rows_that_see_nothing_are_zero():
    # Empty prefix and empty mask rows (1 and 3): zeros; the other rows as the reference.
    q, k, v, prefix_len = make_inputs(1, 4, 2, 4, 64, [0], 64, torch.bfloat16, 0)
    mask = reference.pack_mask(
        torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    ).to(CUDA)
    out = assert_matches_reference(q, k, v, prefix_len, mask)
    assert torch.equal(out[:, :, 1::2], torch.zeros_like(out[:, :, 1::2]))


def test_short_prefix_in_a_long_cache():
    # Most key splits lie past prefix + Q and must contribute nothing.
    g = torch.Generator().manual_seed(5)
    q, k, v, prefix_len = make_inputs(2, 32, 32, 60, 128, [10, 0], 16384, torch.bfloat16, 5)
    assert_matches_reference(q, k, v, prefix_len, random_tree_mask(2, 60, g))


def test_poisoned_buffers_are_fully_overwritten():
    # Fill freed allocator blocks of every size the op allocates (output and float32
    # workspace) with NaN, so that the op's torch.empty results very likely reuse them.
    g = torch.Generator().manual_seed(7)
    q, k, v, prefix_len = make_inputs(8, 32, 8, 60, 128, [3000, 5, 64, 1024, 0, 2000, 999, 4000], 4096 + 60,
                                      torch.bfloat16, 7)
    mask = random_tree_mask(8, 60, g)
    rows = q.numel() // q.shape[-1]
    poison = [torch.full((n,), math.nan, device=CUDA) for n in [q.numel(), rows, 64 << 20]]
    poison += [torch.full((s * rows * 128,), math.nan, device=CUDA) for s in range(1, 33)]
    poison += [torch.full((s * rows,), math.nan, device=CUDA) for s in range(1, 33)]
    del poison
    out = assert_matches_reference(q, k, v, prefix_len, mask)
    assert not out.isnan().any()


@pytest.mark.parametrize("layout", ["hf_transposed_q", "cache_slice", "seq_major", "strided_features", "odd_offset"])
def test_layouts_the_kernel_cannot_vector_load_are_copied(layout):
    # The reference takes any strides; the glue hands the kernel q/k/v as they are where
    # 16-byte loads work and a dense copy elsewhere (a strided last dim, an odd base address).
    g = torch.Generator().manual_seed(12)
    q, k, v, prefix_len = make_inputs(2, 8, 2, 9, 64, [40, 7], 64, torch.bfloat16, 12)
    mask = random_tree_mask(2, 9, g)
    if layout == "hf_transposed_q":  # [B, Q, Hq, D] storage seen as [B, Hq, Q, D], as in HF models
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "cache_slice":  # one plane of a [2, B, H, S, D] cache: dense, 16-byte aligned
        k, v = torch.stack([k, v]).unbind(0)
    elif layout == "seq_major":
        k, v = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k, v))
    elif layout == "strided_features":
        k, v = (torch.stack([c, torch.zeros_like(c)], dim=-1).flatten(-2)[..., ::2] for c in (k, v))
    else:  # dense, but starting one element (2 bytes) past a 16-byte boundary
        k, v = (torch.cat([c.new_zeros(1), c.flatten()])[1:].view(c.shape) for c in (k, v))
    assert_matches_reference(q, k, v, prefix_len, mask)


def test_tree_row_equals_attention_over_its_path():
    # Independent of the reference (vLLM's tree-attention check): row i of a tree equals
    # plain attention, by PyTorch's SDPA, over the prefix and i's root-to-node path only.
    parents = [-1, 0, 0, 1, 1, 2, 4, 6, 3, 0]
    dense = torch.zeros(10, 10, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            dense[i] = dense[p]
        dense[i, i] = True
    q, k, v, prefix_len = make_inputs(1, 8, 2, 10, 128, [77], 100, torch.bfloat16, 13)
    out = msd_kernels.tree_attention(q, k, v, prefix_len, reference.pack_mask(dense[None]).to(CUDA),
                                     backend="compiled")
    for i in range(10):
        rows = list(range(77)) + [77 + j for j in range(10) if dense[i, j]]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, i : i + 1].float(), k[:, :, rows].float(), v[:, :, rows].float(), enable_gqa=True
        )
        torch.testing.assert_close(out[:, :, i : i + 1].float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tree_len", [None, 100])
def test_cuda_graph_replay_reads_prefix_len_on_device(tree_len):
    # Captured once, replayed with new prefix lengths written into the same tensor.
    g = torch.Generator().manual_seed(11)
    # Built with the longest prefix (no NaN rows), then replayed with shorter ones.
    longest = 3000 - (60 if tree_len is None else tree_len)
    q, k, v, prefix_len = make_inputs(2, 32, 8, 60, 128, [longest, longest], 3000, torch.bfloat16, 11, tree_len)
    mask = random_tree_mask(2, 60, g, tree_len)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        msd_kernels.tree_attention(q, k, v, prefix_len, mask, tree_len=tree_len, backend="compiled")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = msd_kernels.tree_attention(q, k, v, prefix_len, mask, tree_len=tree_len, backend="compiled")
    for lengths in ([100, 50], [2900, 1], [0, 1234]):
        prefix_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        expected = reference.tree_attention(q, k, v, prefix_len, mask, None, tree_len)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_kernel_rejects_float32_with_a_clear_error():
    q, k, v, prefix_len = make_inputs(1, 2, 2, 3, 64, [5], 16, torch.float32, 0)
    with pytest.raises(RuntimeError, match="float32 is supported on the CPU only"):
        torch.ops.msd.tree_attention(q, k, v, prefix_len, None, None)


def test_kernel_rejects_a_bad_tree_len():
    q, k, v, prefix_len = make_inputs(1, 2, 2, 3, 64, [5], 80, torch.bfloat16, 0, tree_len=70)
    for tree_len in (2, 81):  # < Q, > S_max
        with pytest.raises(RuntimeError, match="tree_len"):
            torch.ops.msd.tree_attention(q, k, v, prefix_len, None, None, tree_len)
    g = torch.Generator().manual_seed(0)
    two_words = random_tree_mask(1, 3, g, tree_len=70)
    with pytest.raises(RuntimeError, match="tree_mask"):  # one word: sized for Q, not tree_len
        torch.ops.msd.tree_attention(q, k, v, prefix_len, two_words[..., :1], None, 70)
    assert_matches_reference(q, k, v, prefix_len, two_words, None, 70)


def test_kernel_rejects_an_unsupported_head_dim():
    q, k, v, prefix_len = make_inputs(1, 2, 2, 3, 48, [5], 16, torch.bfloat16, 0)
    with pytest.raises(RuntimeError, match="head_dim must be 64, 80, 96 or 128"):
        torch.ops.msd.tree_attention(q, k, v, prefix_len, None, None)


@pytest.mark.parametrize("tree_len", [None, 20])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 48), (torch.float16, 256)])
def test_wrapper_runs_uncovered_inputs_through_sdpa(dtype, head_dim, tree_len):
    """What the kernel rejects, msd_kernels.tree_attention still computes (SDPA composition)."""
    q, k, v, prefix_len = make_inputs(2, 4, 2, 9, head_dim, [5, 30], 64, dtype, 1, tree_len)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the composition weighs unused rows by 0: finite
    out = msd_kernels.tree_attention(q, k, v, prefix_len, tree_len=tree_len, backend="compiled")
    expected = msd_kernels.tree_attention(q, k, v, prefix_len, tree_len=tree_len, backend="reference")
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE.get(dtype, 1e-5),
                               rtol=TOLERANCE.get(dtype, 1e-5))


@settings(max_examples=180)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 8]),
    num_new=st.integers(1, 140),
    extra=st.just(0) | st.integers(1, 140),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    causal=st.booleans(),
    slack=st.integers(0, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(batch, kv_heads, group, num_new, extra, head_dim, dtype, causal, slack,
                                       seed):
    # extra > 0: tree_len = Q + extra, the queries are the last rows of the tree section.
    g = torch.Generator().manual_seed(seed)
    tree_len = num_new + extra if extra else None
    max_len = num_new + extra + slack
    prefixes = [int(torch.randint(0, slack + 1, (1,), generator=g)) for _ in range(batch)]
    q, k, v, prefix_len = make_inputs(batch, kv_heads * group, kv_heads, num_new, head_dim, prefixes, max_len,
                                      dtype, seed, tree_len)
    mask = None if causal else random_tree_mask(batch, num_new, g, tree_len)
    assert_matches_reference(q, k, v, prefix_len, mask, tree_len=tree_len)
