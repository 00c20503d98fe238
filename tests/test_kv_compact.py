"""kv_compact (op 3): compiled op == reference, a hand-computed move, bad values rejected."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msd_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A cache whose rows all differ, so any misplaced row shows."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)


@st.composite
def compaction_cases(draw, ordered: bool = True):
    """Random caches and accepted paths as a verifier emits them: strictly increasing tree
    indices starting with the root (0), so rows move down over overlapping ranges.
    ``ordered=False``: any order and repeats too (the op's staged path), still root first."""
    batch = draw(st.integers(1, 3))
    tree_size = draw(st.integers(1, 12))  # T + 1
    width = draw(st.integers(1, tree_size))  # A
    paths, prefixes = [], []
    for _ in range(batch):
        accepted = draw(st.integers(0, width - 1))
        nodes = draw(
            st.lists(
                st.integers(1 if ordered else 0, max(1, tree_size - 1)),
                min_size=accepted, max_size=accepted, unique=ordered,
            )
        )
        paths.append([0, *(sorted(nodes) if ordered else nodes)])
        prefixes.append(draw(st.integers(0, 20)))
    max_len = max(p + tree_size for p in prefixes) + draw(st.integers(0, 3))
    return {
        "shape": (draw(st.integers(1, 4)), batch, draw(st.integers(1, 3)), max_len, draw(st.integers(1, 9))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "paths": paths,
        "width": width,
        "prefixes": prefixes,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def accepted_tensors(paths: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """accepted_index [B, A] (-1 padded, as verify emits) and num_accepted [B]."""
    index = torch.full((len(paths), width), -1, dtype=torch.int64)
    for b, path in enumerate(paths):
        index[b, : len(path)] = torch.tensor(path)
    counts = torch.tensor([len(path) - 1 for path in paths], dtype=torch.int64)
    return index.to(device), counts.to(device)


def check_against_reference(device, case) -> None:
    """The compiled op leaves the same cache and prefix_len as the reference."""
    generator = torch.Generator().manual_seed(case["seed"])
    cache = random_cache(case["shape"], case["dtype"], generator).to(device)
    index, counts = accepted_tensors(case["paths"], case["width"], device)
    prefix_len = torch.tensor(case["prefixes"], dtype=torch.int32, device=device)

    expected_cache, expected_prefix = cache.clone(), prefix_len.clone()
    msd_kernels.kv_compact(expected_cache, index, counts, expected_prefix, backend="reference")
    msd_kernels.kv_compact(cache, index, counts, prefix_len, backend="compiled")

    assert torch.equal(cache, expected_cache)
    assert torch.equal(prefix_len, expected_prefix)


@settings(max_examples=250)
@given(case=compaction_cases())
def test_matches_reference(device, case):
    check_against_reference(device, case)


@settings(max_examples=100)
@given(case=compaction_cases(ordered=False))
def test_matches_reference_unordered_paths(device, case):
    check_against_reference(device, case)


def test_hand_computed_overlapping_move(device):
    # Row s of every (plane, sequence, head) holds the value s (+100 per sequence).
    planes, batch, heads, max_len, dim = 2, 2, 3, 12, 4
    rows = torch.arange(max_len, dtype=torch.float32).view(1, 1, 1, max_len, 1)
    cache = (rows + 100 * torch.arange(batch).view(1, batch, 1, 1, 1)).expand(
        planes, batch, heads, max_len, dim
    )
    cache = cache.contiguous().to(device)
    original = cache.clone()
    # Sequence 0: prefix 4, accepted [0, 2, 3] -> row 6 moves to 5 while row 7 moves to 6.
    # Sequence 1: prefix 2, nothing accepted but the root -> no row moves.
    index, counts = accepted_tensors([[0, 2, 3], [0]], 4, device)
    prefix_len = torch.tensor([4, 2], dtype=torch.int32, device=device)

    msd_kernels.kv_compact(cache, index, counts, prefix_len, backend="compiled")

    expected_rows = [0, 1, 2, 3, 4, 6, 7, 7, 8, 9, 10, 11]  # row 7 itself is past the new prefix
    for s, source in enumerate(expected_rows):
        assert torch.equal(cache[:, 0, :, s], original[:, 0, :, source]), f"sequence 0, row {s}"
    assert torch.equal(cache[:, 1], original[:, 1])
    assert prefix_len.tolist() == [7, 3]


def test_hand_computed_unordered_move(device):
    # Row s of every (plane, sequence, head) holds the value s. Sequence 0: prefix 4,
    # accepted [0, 3, 1]: row 7 -> 5 and row 5 -> 6, so row 5 must be read before it is
    # overwritten (an in-order copy would put 7 in row 6). Sequence 1: the ordered [0, 2]
    # in the same call.
    planes, batch, heads, max_len, dim = 2, 2, 3, 10, 4
    rows = torch.arange(max_len, dtype=torch.float32).view(1, 1, 1, max_len, 1)
    cache = rows.expand(planes, batch, heads, max_len, dim).contiguous().to(device)
    index, counts = accepted_tensors([[0, 3, 1], [0, 2]], 3, device)
    prefix_len = torch.tensor([4, 1], dtype=torch.int32, device=device)

    msd_kernels.kv_compact(cache, index, counts, prefix_len, backend="compiled")

    expected = {0: [0, 1, 2, 3, 4, 7, 5, 7, 8, 9], 1: [0, 1, 3, 3, 4, 5, 6, 7, 8, 9]}
    for b, expected_rows in expected.items():
        assert cache[:, b, :, :, 0].eq(torch.tensor(expected_rows, dtype=torch.float32, device=device)).all()
    assert prefix_len.tolist() == [7, 3]


def test_rows_outside_moved_range_untouched(device):
    generator = torch.Generator().manual_seed(0)
    cache = random_cache((3, 1, 2, 16, 8), torch.float32, generator).to(device)
    original = cache.clone()
    index, counts = accepted_tensors([[0, 1, 4, 5, 9]], 6, device)
    prefix_len = torch.tensor([5], dtype=torch.int32, device=device)

    msd_kernels.kv_compact(cache, index, counts, prefix_len, backend="compiled")

    assert torch.equal(cache[..., :7, :], original[..., :7, :])  # prefix + identity moves 0, 1
    assert torch.equal(cache[..., 7, :], original[..., 9, :])
    assert torch.equal(cache[..., 8, :], original[..., 10, :])
    assert torch.equal(cache[..., 9, :], original[..., 14, :])
    assert torch.equal(cache[..., 10:, :], original[..., 10:, :])
    assert prefix_len.item() == 10


# Bad values: the CPU op checks them all before writing anything (a CUDA op cannot check
# values without a host sync, so these run on the CPU only).
BAD_VALUES = [
    pytest.param([0, 1, -1], 3, 3, "num_accepted", id="num_accepted>=A"),
    pytest.param([0, 1, -1], -1, 3, "num_accepted", id="num_accepted<0"),
    pytest.param([0, 7, -1], 1, 3, "accepted_index", id="index-past-cache-end"),
    pytest.param([0, -2, -1], 1, 3, "accepted_index", id="negative-index"),
    pytest.param([0, 1, 1], 2, 8, "prefix_len", id="prefix+a+1>S_max"),
    pytest.param([0, 1, -1], 1, -1, "prefix_len", id="negative-prefix"),
]


@pytest.mark.parametrize(("path", "count", "prefix", "name"), BAD_VALUES)
def test_bad_values_rejected_before_writing(path, count, prefix, name):
    # Sequence 0 is valid (and would move rows) so a late check would leave a trace.
    cache = torch.randn(2, 2, 2, 10, 4)
    index = torch.tensor([[0, 2, -1], path], dtype=torch.int64)
    num_accepted = torch.tensor([1, count], dtype=torch.int64)
    prefix_len = torch.tensor([3, prefix], dtype=torch.int32)
    original_cache, original_prefix = cache.clone(), prefix_len.clone()

    with pytest.raises(RuntimeError, match=name):
        msd_kernels.kv_compact(cache, index, num_accepted, prefix_len, backend="compiled")

    assert torch.equal(cache, original_cache)
    assert torch.equal(prefix_len, original_prefix)
