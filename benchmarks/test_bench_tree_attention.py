"""tree_attention on CPU (report only; the speed target is on GPU).

Verification shape of a 7B LLaVA target: batch 1, 32 heads, head_dim 128, a 60-node draft
tree over a prefix of 256 or 1024 tokens, float32. Baselines measured in the same run:
torch SDPA with the equivalent dense boolean mask ``[Q, prefix + Q]`` and the reference op.

Run: ``python3 -m pytest benchmarks/test_bench_tree_attention.py --benchmark-enable --benchmark-only``
"""

import pytest
import torch
import torch.nn.functional as F

import msd_kernels

HEADS, HEAD_DIM, NUM_NEW, BRANCHING = 32, 128, 60, 4


def draft_tree_mask() -> torch.Tensor:
    """Bool ``[Q, Q]`` ancestor mask of a complete 4-ary tree (node i's parent is (i-1)//4)."""
    allowed = torch.eye(NUM_NEW, dtype=torch.bool)
    for node in range(1, NUM_NEW):
        allowed[node] |= allowed[(node - 1) // BRANCHING]
    return allowed


@pytest.fixture(scope="module", params=[256, 1024], ids=lambda prefix: f"prefix{prefix}")
def problem(request):
    """Inputs of every implementation for one prefix length."""
    prefix = request.param
    total = prefix + NUM_NEW
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, NUM_NEW, HEAD_DIM, generator=generator)
    k_cache = torch.randn(1, HEADS, total, HEAD_DIM, generator=generator)
    v_cache = torch.randn(1, HEADS, total, HEAD_DIM, generator=generator)
    tree = draft_tree_mask()
    dense_mask = torch.ones(NUM_NEW, total, dtype=torch.bool)
    dense_mask[:, prefix:] = tree
    return {
        "prefix": prefix,
        "args": (
            q,
            k_cache,
            v_cache,
            torch.tensor([prefix], dtype=torch.int32),
            msd_kernels.pack_mask(tree)[None],
        ),
        "dense_mask": dense_mask,
    }


def run_compiled(problem):
    return msd_kernels.tree_attention(*problem["args"], backend="compiled")


def run_reference(problem):
    return msd_kernels.tree_attention(*problem["args"], backend="reference")


def run_sdpa_dense_mask(problem):
    q, k_cache, v_cache, _, _ = problem["args"]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=problem["dense_mask"])


@pytest.mark.parametrize(
    "impl", [run_compiled, run_sdpa_dense_mask, run_reference], ids=lambda f: f.__name__[4:]
)
def test_bench_tree_attention_cpu(benchmark, problem, impl):
    benchmark.group = (
        f"tree_attention cpu fp32 B=1 H={HEADS} D={HEAD_DIM} Q={NUM_NEW} prefix={problem['prefix']}"
    )
    benchmark.extra_info["threads"] = torch.get_num_threads()
    out = benchmark(impl, problem)
    # Every implementation computes the same thing: a wrong fast kernel must not be reported.
    torch.testing.assert_close(out, run_sdpa_dense_mask(problem), rtol=1e-4, atol=1e-4)
