"""verify_greedy: 60 tree rows x 32000 vocab fp32 logits, compiled op vs reference."""

import pytest
import torch

import msd_kernels

TREE_SIZE, VOCAB, WIDTH = 60, 32000, 8  # T + 1 rows; the root has WIDTH children
ACCEPTED = 6


@pytest.fixture(scope="module")
def tree_inputs():
    """An EAGLE-like tree: the root's 8 children (1..8) each head a chain (node i's child
    is i + 8); the target agrees with the draft along the first chain for 6 nodes, so
    the walk visits 7 of the 60 rows."""
    generator = torch.Generator().manual_seed(0)
    first_child = torch.full((1, TREE_SIZE), -1)
    next_sibling = torch.full((1, TREE_SIZE), -1)
    first_child[0, 0] = 1
    next_sibling[0, 1:WIDTH] = torch.arange(2, WIDTH + 1)
    first_child[0, 1 : TREE_SIZE - WIDTH] = torch.arange(1 + WIDTH, TREE_SIZE)
    tokens = torch.randint(0, VOCAB, (1, TREE_SIZE), generator=generator)
    logits = torch.randn(1, TREE_SIZE, VOCAB, generator=generator)
    node = 0
    for _ in range(ACCEPTED):
        child = int(first_child[0, node])
        logits[0, node, tokens[0, child]] = 100.0
        node = child
    return logits, tokens, first_child, next_sibling


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_verify_greedy(benchmark, tree_inputs, backend):
    benchmark.group = "verify_greedy 60 x 32000 fp32"
    _, num_accepted, _ = benchmark(msd_kernels.verify_greedy, *tree_inputs, backend=backend)
    assert num_accepted.item() == ACCEPTED
