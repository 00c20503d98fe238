"""The ops' public face: bad input gets a clear exception naming the argument, the
backend is chosen explicitly, and every op traces under torch.compile(fullgraph=True)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import msd_kernels as mk

BACKENDS = ["compiled", "reference"]
ERRORS = (TypeError, ValueError, RuntimeError)


def small_pool(batch=2, top_k=3, depth=2):
    return mk.new_tree_pool(batch, top_k, depth)


def expand_args(batch=2, n=1, vocab=20, top_k=3, depth=2):
    pool = small_pool(batch, top_k, depth)
    return dict(
        logits=torch.randn(batch, n, vocab),
        frontier_scores=torch.zeros(batch, n),
        frontier_pool_index=torch.full((batch, n), -1, dtype=torch.int64),
        pool_tokens=pool[0],
        pool_scores=pool[1],
        pool_parents=pool[2],
        pool_offset=0,
        top_k=top_k,
    )


def assemble_args(batch=2, top_k=3, depth=2, num_nodes=5):
    args = expand_args(batch=batch, top_k=top_k, depth=depth)
    mk.tree_expand(**args, backend="reference")
    return dict(
        pool_tokens=args["pool_tokens"],
        pool_scores=args["pool_scores"],
        pool_parents=args["pool_parents"],
        root_token=torch.zeros(batch, dtype=torch.int64),
        num_nodes=num_nodes,
    )


def attention_args(batch=2, q_heads=4, kv_heads=2, num_new=5, head_dim=16, max_len=32):
    return dict(
        q=torch.randn(batch, q_heads, num_new, head_dim),
        k_cache=torch.randn(batch, kv_heads, max_len, head_dim),
        v_cache=torch.randn(batch, kv_heads, max_len, head_dim),
        prefix_len=torch.tensor([3, 9][:batch], dtype=torch.int32),
        tree_mask=mk.pack_mask(torch.ones(num_new, num_new, dtype=torch.bool).tril().expand(batch, -1, -1)),
    )


def compact_args(planes=4, batch=2, heads=2, max_len=16, head_dim=8):
    return dict(
        kv_cache=torch.randn(planes, batch, heads, max_len, head_dim),
        accepted_index=torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1]]),
        num_accepted=torch.tensor([2, 1]),
        prefix_len=torch.tensor([5, 7], dtype=torch.int32),
    )


def verify_args(batch=2, size=4, vocab=10):
    # root -> 1 -> 3, root -> 2
    links = dict(
        tree_tokens=torch.tensor([[1, 2, 3, 4]] * batch),
        first_child=torch.tensor([[1, 3, -1, -1]] * batch),
        next_sibling=torch.tensor([[-1, 2, -1, -1]] * batch),
    )
    return torch.randn(batch, size, vocab), links


def with_(args: dict, **changes) -> dict:
    return {**args, **changes}


# Each case: (op, kwargs, name the message must contain). Structural errors: both backends.
STRUCTURAL_CASES = [
    ("tree_expand", lambda: with_(expand_args(), logits=torch.randn(2, 20)), "logits"),
    ("tree_expand", lambda: with_(expand_args(), logits=torch.zeros(2, 1, 20, dtype=torch.int64)), "logits"),
    ("tree_expand", lambda: with_(expand_args(), logits=[[0.0]]), "logits"),
    ("tree_expand", lambda: with_(expand_args(), frontier_scores=torch.zeros(2, 2)), "frontier_scores"),
    ("tree_expand", lambda: with_(expand_args(), frontier_pool_index=torch.zeros(2, 1)), "frontier_pool_index"),
    ("tree_expand", lambda: with_(expand_args(), pool_tokens=torch.zeros(21, 2, dtype=torch.int64).t()),
     "pool_tokens"),
    ("tree_expand", lambda: with_(expand_args(), pool_scores=torch.zeros(2, 21, dtype=torch.float64)),
     "pool_scores"),
    ("tree_expand", lambda: with_(expand_args(), top_k=0), "top_k"),
    ("tree_expand", lambda: with_(expand_args(vocab=4, top_k=3), top_k=5), "top_k"),
    ("tree_expand", lambda: with_(expand_args(), pool_offset=19), "pool_offset"),
    ("tree_assemble", lambda: with_(assemble_args(), num_nodes=22), "num_nodes"),
    ("tree_assemble", lambda: with_(assemble_args(), num_nodes=0), "num_nodes"),
    ("tree_assemble", lambda: with_(assemble_args(), root_token=torch.zeros(3, dtype=torch.int64)), "root_token"),
    ("tree_assemble", lambda: with_(assemble_args(), pool_scores=torch.zeros(2, 20)), "pool_scores"),
    ("tree_attention", lambda: with_(attention_args(), q=torch.randn(2, 4, 16)), "q"),
    ("tree_attention", lambda: with_(attention_args(), k_cache=torch.randn(2, 2, 32, 16).half()), "k_cache"),
    ("tree_attention", lambda: with_(attention_args(), k_cache=torch.randn(2, 3, 32, 16),
                                     v_cache=torch.randn(2, 3, 32, 16)), "k_cache"),
    ("tree_attention", lambda: with_(attention_args(), v_cache=torch.randn(2, 2, 32, 8)), "v_cache"),
    ("tree_attention", lambda: with_(attention_args(), prefix_len=torch.tensor([3, 9])), "prefix_len"),
    ("tree_attention", lambda: with_(attention_args(), tree_mask=torch.zeros(2, 5, 2, dtype=torch.int64)),
     "tree_mask"),
    ("tree_attention", lambda: with_(attention_args(num_new=40, max_len=32), tree_mask=None), "q"),
    ("tree_attention", lambda: with_(attention_args(), q=torch.randn(2, 4, 0, 16), tree_mask=None), "q"),  # Q = 0
    ("tree_attention", lambda: with_(attention_args(), v_cache=torch.randn(2, 2, 32, 16, device="meta")),
     "v_cache"),
    ("tree_attention", lambda: with_(attention_args(), tree_len=4), "tree_len"),  # < Q = 5
    ("tree_attention", lambda: with_(attention_args(), tree_len=33), "tree_len"),  # > S_max = 32
    ("tree_attention", lambda: with_(attention_args(), tree_len=6.0), "tree_len"),
    ("tree_attention", lambda: with_(attention_args(), tree_len=True), "tree_len"),
    ("tree_attention", lambda: with_(attention_args(max_len=80), tree_len=70), "tree_mask"),  # needs 2 words
    ("kv_compact", lambda: with_(compact_args(), kv_cache=torch.randn(2, 2, 16, 8)), "kv_cache"),
    ("kv_compact", lambda: with_(compact_args(), accepted_index=torch.zeros(2, 4, dtype=torch.int32)),
     "accepted_index"),
    ("kv_compact", lambda: with_(compact_args(), prefix_len=torch.tensor([5, 7])), "prefix_len"),
    ("kv_compact", lambda: with_(compact_args(), kv_cache=torch.randn(4, 2, 2, 8, 16).transpose(3, 4)),
     "kv_cache"),
    ("verify_greedy", lambda: dict(logits=verify_args()[0][0], **verify_args()[1]), "logits"),
    ("verify_greedy", lambda: dict(logits=verify_args()[0],
                                   **with_(verify_args()[1], tree_tokens=torch.zeros(2, 5, dtype=torch.int64))),
     "tree_tokens"),
    ("verify_greedy", lambda: dict(logits=verify_args()[0],
                                   **with_(verify_args()[1], next_sibling=torch.zeros(2, 4))), "next_sibling"),
    ("verify_sampling", lambda: dict(probs=verify_args()[0].softmax(-1).half(), **verify_args()[1],
                                     rng_state=torch.zeros(2, dtype=torch.int64)), "probs"),
    ("verify_sampling", lambda: dict(probs=verify_args()[0].softmax(-1), **verify_args()[1],
                                     rng_state=torch.zeros(3, dtype=torch.int64)), "rng_state"),
]

# Bad index values: only visible by reading the data, which the CPU kernels do.
VALUE_CASES = [
    ("tree_expand", lambda: with_(expand_args(), frontier_pool_index=torch.tensor([[4], [-1]])),
     "frontier_pool_index"),
    ("tree_assemble", lambda: {**assemble_args(), "pool_parents": torch.full((2, 21), 7, dtype=torch.int64)},
     "pool_parents"),
    ("tree_attention", lambda: with_(attention_args(), prefix_len=torch.tensor([3, 30], dtype=torch.int32)),
     "prefix_len"),
    ("tree_attention", lambda: with_(attention_args(), prefix_len=torch.tensor([-1, 3], dtype=torch.int32)),
     "prefix_len"),
    ("tree_attention", lambda: with_(attention_args(), tree_len=24), "prefix_len"),  # 9 + 24 > S_max = 32
    ("kv_compact", lambda: with_(compact_args(), num_accepted=torch.tensor([4, 1])), "num_accepted"),
    ("kv_compact", lambda: with_(compact_args(), accepted_index=torch.tensor([[0, 2, 11, -1], [0, 1, -1, -1]])),
     "accepted_index"),
    ("kv_compact", lambda: with_(compact_args(), prefix_len=torch.tensor([14, 7], dtype=torch.int32)),
     "prefix_len"),
    ("verify_greedy", lambda: dict(logits=verify_args()[0],
                                   **with_(verify_args()[1], first_child=torch.tensor([[1, 9, -1, -1]] * 2))),
     "first_child"),
    ("verify_sampling", lambda: dict(probs=verify_args()[0].softmax(-1),
                                     **with_(verify_args()[1], tree_tokens=torch.tensor([[1, 2, 30, 4]] * 2)),
                                     rng_state=torch.zeros(2, dtype=torch.int64)), "tree_tokens"),
]


def case_id(case):
    return f"{case[0]}-{case[2]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", STRUCTURAL_CASES, ids=[case_id(c) for c in STRUCTURAL_CASES])
def test_structural_errors_name_the_argument(case, backend):
    op, make_kwargs, name = case
    with pytest.raises(ERRORS, match=name):
        getattr(mk, op)(**make_kwargs(), backend=backend)


@pytest.mark.parametrize("case", VALUE_CASES, ids=[case_id(c) for c in VALUE_CASES])
def test_value_errors_name_the_argument(case):
    op, make_kwargs, name = case
    kwargs = make_kwargs()
    before = kwargs["kv_cache"].clone() if op == "kv_compact" else None
    with pytest.raises(ERRORS, match=name):
        getattr(mk, op)(**kwargs, backend="compiled")
    if before is not None:  # a rejected compaction writes nothing
        assert torch.equal(kwargs["kv_cache"], before)


def test_there_are_at_least_twenty_bad_input_cases():
    assert len(STRUCTURAL_CASES) + len(VALUE_CASES) >= 20


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        mk.verify_greedy(verify_args()[0], **verify_args()[1], backend="cuda-magic")


def test_backend_environment_variable_is_validated():
    script = "import msd_kernels as mk; mk.default_backend()"
    run = subprocess.run(
        [sys.executable, "-c", script], env={"MSD_KERNELS_BACKEND": "fast", "PATH": ""},
        capture_output=True, text=True,
    )
    assert run.returncode != 0 and "MSD_KERNELS_BACKEND" in run.stderr


def test_reference_backend_from_environment_runs_without_the_extension():
    script = (
        "import sys, torch, msd_kernels as mk\n"
        "logits = torch.randn(1, 4, 10); tokens = torch.tensor([[1, 2, 3, 4]])\n"
        "links = torch.full((1, 4), -1)\n"
        "mk.verify_greedy(logits, tokens, links, links)\n"
        "assert 'msd_kernels._loader' not in sys.modules or mk._loader._loaded_from is None\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], env={"MSD_KERNELS_BACKEND": "reference", "PATH": ""},
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------- compile
def test_all_ops_compile_fullgraph():
    """One draft-tree + verify + compact step, traced whole by torch.compile."""
    torch.manual_seed(0)
    batch, vocab, top_k, depth, num_nodes = 2, 40, 3, 2, 6
    heads, head_dim, max_len = 2, 16, 64

    def step(root_logits, step_logits, logits, kv, k_cache, v_cache, prefix_len, q, rng):
        pool = mk.new_tree_pool(batch, top_k, depth)
        frontier = mk.tree_expand(
            root_logits, torch.zeros(batch, 1), torch.full((batch, 1), -1, dtype=torch.int64),
            *pool, 0, top_k,
        )
        for d in range(depth):
            frontier = mk.tree_expand(step_logits[d], frontier[1], frontier[2], *pool,
                                      mk.pool_size(top_k, d), top_k)
        tokens, depths, parents, mask, first_child, next_sibling = mk.tree_assemble(
            *pool, torch.zeros(batch, dtype=torch.int64), num_nodes
        )
        out = mk.tree_attention(q, k_cache, v_cache, prefix_len, mask)
        greedy = mk.verify_greedy(logits, tokens, first_child, next_sibling)
        sampled = mk.verify_sampling(logits.softmax(-1), tokens, first_child, next_sibling, rng)
        mk.kv_compact(kv, greedy[0], greedy[1], prefix_len)
        return tokens, mask, out, greedy, sampled

    eager_inputs = (
        torch.randn(batch, 1, vocab), torch.randn(depth, batch, top_k, vocab),
        torch.randn(batch, num_nodes + 1, vocab), torch.randn(4, batch, heads, max_len, head_dim),
        torch.randn(batch, heads, max_len, head_dim), torch.randn(batch, heads, max_len, head_dim),
        torch.tensor([5, 9], dtype=torch.int32), torch.randn(batch, heads, num_nodes + 1, head_dim),
        torch.tensor([3, 0]),
    )
    compiled_inputs = tuple(t.clone() for t in eager_inputs)
    expected = step(*eager_inputs)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_inputs)
    torch.testing.assert_close(got, expected)
    # the in-place updates happened under compile too
    for index in (3, 6, 8):  # kv cache, prefix_len, rng_state
        torch.testing.assert_close(compiled_inputs[index], eager_inputs[index])


def test_tree_attention_tree_len_compiles_fullgraph():
    """A draft tree level (queries after earlier tree rows: tree_len > Q) traces whole."""
    top_k, level = 4, 2
    tree_len = (level + 1) * top_k
    args = attention_args(num_new=top_k)
    args["tree_mask"] = mk.pack_mask(torch.rand(2, top_k, tree_len) < 0.5)

    def level_attention(q, k_cache, v_cache, prefix_len, tree_mask):
        masked = mk.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, tree_len=tree_len)
        causal = mk.tree_attention(q, k_cache, v_cache, prefix_len, tree_len=tree_len)
        return masked, causal

    got = torch.compile(level_attention, fullgraph=True, backend="aot_eager")(**args)
    torch.testing.assert_close(got, level_attention(**args))
    expected = mk.tree_attention(**args, tree_len=tree_len, backend="reference")
    torch.testing.assert_close(got[0], expected)
