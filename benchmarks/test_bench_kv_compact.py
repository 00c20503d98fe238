"""kv_compact: one op call for a whole 32-layer cache vs a naive per-plane loop.

Cache: 64 planes (K and V of 32 layers) x B=1 x 32 heads x S_max=1100 x D=128, fp32;
prefix 1024; 6 accepted draft nodes whose moves overlap their sources.
"""

import pytest
import torch

import msd_kernels

PLANES, HEADS, MAX_LEN, HEAD_DIM, PREFIX = 64, 32, 1100, 128, 1024
ROUNDS = 300
ACCEPTED_PATH = [0, 2, 3, 5, 8, 9, 12]  # root + 6 nodes: 3 -> 2 while 5 -> 3, ...


@pytest.fixture(scope="module")
def cache() -> torch.Tensor:
    return torch.randn(PLANES, 1, HEADS, MAX_LEN, HEAD_DIM)


def test_msd_kv_compact(benchmark, cache):
    """One call moves the rows of every plane and advances prefix_len."""
    accepted_index = torch.tensor([ACCEPTED_PATH])
    num_accepted = torch.tensor([len(ACCEPTED_PATH) - 1])
    prefix_len = torch.tensor([PREFIX], dtype=torch.int32)

    def compact():
        prefix_len.fill_(PREFIX)  # the same move every round
        msd_kernels.kv_compact(cache, accepted_index, num_accepted, prefix_len, backend="compiled")

    benchmark.group = "kv_compact 64 planes"
    benchmark.pedantic(compact, rounds=ROUNDS, warmup_rounds=3)


def test_per_plane_index_select_baseline(benchmark, cache):
    """What a naive engine does: index_select + copy_ on each layer's K and V planes."""
    planes = list(cache.unbind(0))  # the engine's per-layer tensors, [B, H, S_max, D]
    source = PREFIX + torch.tensor(ACCEPTED_PATH)
    count = len(ACCEPTED_PATH)

    def compact():
        for plane in planes:
            plane[:, :, PREFIX : PREFIX + count].copy_(plane.index_select(2, source))

    benchmark.group = "kv_compact 64 planes"
    benchmark.pedantic(compact, rounds=ROUNDS, warmup_rounds=3)
