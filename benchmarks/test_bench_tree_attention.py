"""tree_attention on CPU (report only; the speed target is on GPU).

Shapes: the verification step of a 7B LLaVA target (batch 1, 32 heads, head_dim 128, a
60-node draft tree over a prefix of 256 or 1024 tokens) and the tiny test models the engine
runs on CPU (4 query heads of 32, one of them over a single kv head, a cache of ~300 rows,
a 16-node tree or one decoded token), where per-call overhead dominates. float32.
Baselines measured in the same run: torch SDPA with the equivalent dense boolean mask
``[Q, prefix + Q]`` and the reference op.

Run: ``python3 -m pytest benchmarks/test_bench_tree_attention.py --benchmark-enable --benchmark-only``
"""

import pytest
import torch
import torch.nn.functional as F

import msd_kernels

BRANCHING = 4
# (name, query heads, kv heads, head_dim, new tokens, prefix)
SHAPES = [
    ("7b-prefix256", 32, 32, 128, 60, 256),
    ("7b-prefix1024", 32, 32, 128, 60, 1024),
    ("tiny-tree", 4, 4, 32, 16, 300),
    ("tiny-tree-gqa", 4, 1, 32, 16, 300),
    ("tiny-decode", 4, 4, 32, 1, 300),
]


def draft_tree_mask(num_new: int) -> torch.Tensor:
    """Bool ``[Q, Q]`` ancestor mask of a complete 4-ary tree (node i's parent is (i-1)//4)."""
    allowed = torch.eye(num_new, dtype=torch.bool)
    for node in range(1, num_new):
        allowed[node] |= allowed[(node - 1) // BRANCHING]
    return allowed


@pytest.fixture(scope="module", params=SHAPES, ids=lambda shape: shape[0])
def problem(request):
    """Inputs of every implementation for one shape."""
    name, num_q_heads, num_kv_heads, head_dim, num_new, prefix = request.param
    total = prefix + num_new
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, num_q_heads, num_new, head_dim, generator=generator)
    k_cache = torch.randn(1, num_kv_heads, total, head_dim, generator=generator)
    v_cache = torch.randn(1, num_kv_heads, total, head_dim, generator=generator)
    tree = draft_tree_mask(num_new)
    dense_mask = torch.ones(num_new, total, dtype=torch.bool)
    dense_mask[:, prefix:] = tree
    return {
        "name": name,
        "args": (
            q,
            k_cache,
            v_cache,
            torch.tensor([prefix], dtype=torch.int32),
            msd_kernels.pack_mask(tree)[None],
        ),
        "dense_mask": dense_mask,
        "gqa": num_q_heads != num_kv_heads,
    }


def run_compiled(problem):
    return msd_kernels.tree_attention(*problem["args"], backend="compiled")


def run_reference(problem):
    return msd_kernels.tree_attention(*problem["args"], backend="reference")


def run_sdpa_dense_mask(problem):
    q, k_cache, v_cache, _, _ = problem["args"]
    return F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=problem["dense_mask"], enable_gqa=problem["gqa"]
    )


@pytest.mark.parametrize(
    "impl", [run_compiled, run_sdpa_dense_mask, run_reference], ids=lambda f: f.__name__[4:]
)
def test_bench_tree_attention_cpu(benchmark, problem, impl):
    q, k_cache, _, _, _ = problem["args"]
    _, num_q_heads, num_new, head_dim = q.shape
    benchmark.group = (
        f"tree_attention cpu fp32 {problem['name']}: B=1 Hq={num_q_heads} Hkv={k_cache.shape[1]} "
        f"D={head_dim} Q={num_new} prefix={k_cache.shape[2] - num_new}"
    )
    benchmark.extra_info["threads"] = torch.get_num_threads()
    out = benchmark(impl, problem)
    # Every implementation computes the same thing: a wrong fast kernel must not be reported.
    torch.testing.assert_close(out, run_sdpa_dense_mask(problem), rtol=1e-4, atol=1e-4)
