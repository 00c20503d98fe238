"""The drafter's tree levels (msd's tree attention with ``tree_len``, over the draft cache) against
an independent reference: the draft's plain causal forward over the committed pairs followed by
a node's root-to-node path gives, at the node, the output the drafter computed for it."""

from __future__ import annotations

import pytest
import torch

from msd.cache import StaticKVCache
from msd.proposers import DraftProposer
from msd.tree_draft import TreeDrafter

from tiny_models import random_draft, tiny_llava, tiny_qwen2_vl


class RecordingProposer(DraftProposer):
    """The draft's own proposals; keeps each level's hidden states and paths."""

    def __init__(self):
        self.levels = []

    def __call__(self, draft, hidden, paths, start):
        self.levels.append((hidden.clone(), paths.clone()))
        return super().__call__(draft, hidden, paths, start)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("top_k,depth", [(4, 3), (10, 5), (8, 9)])  # 8 x 9 = 72 scratch rows: two mask words
@torch.no_grad()  # as the engine runs
def test_every_tree_node_equals_the_causal_forward_over_its_path(tmp_path, family, top_k, depth):
    torch.manual_seed(0)
    target = (tiny_llava if family == "llava" else tiny_qwen2_vl)(tmp_path / family, seed=2)
    draft = random_draft(target, seed=3)
    batch, prompt_len, hidden_size = 2, [7, 4], draft.config.hidden_size
    cache = StaticKVCache(1, batch, draft.config.num_key_value_heads, 128, draft.layers[0].self_attn.head_dim,
                          torch.float32, "cpu")
    recorder = RecordingProposer()
    drafter = TreeDrafter(draft, cache, top_k, depth, top_k * depth, recorder)
    prompts = []
    for row, length in enumerate(prompt_len):
        ids = torch.randint(3, 100, (1, length))
        features = torch.randn(1, length, hidden_size)
        first = torch.randint(3, 100, (1,))
        drafter.commit_prompt(row, ids, first, features, torch.zeros_like(features),
                              torch.zeros_like(ids, dtype=torch.bool))
        prompts.append(draft.fuse_inputs(torch.cat([ids[:, 1:], first[:, None]], 1), features))
    roots = torch.randint(3, 100, (batch,))
    drafter.build(roots, torch.tensor(prompt_len))
    for row in range(batch):
        committed = prompts[row]
        positions = torch.arange(prompt_len[row])[None]
        root_hidden = draft(committed, positions)[:, -1:]
        torch.testing.assert_close(drafter.root_hidden[row:row + 1], root_hidden)
        for level, (hidden, paths) in enumerate(recorder.levels[1:]):
            for node in range(top_k):
                # Causal reference over the committed pairs, then each ancestor's pair.
                inputs, parent = committed, root_hidden
                for step in range(level + 1):
                    token = paths[row:row + 1, node, step + 1:step + 2]
                    inputs = torch.cat([inputs, draft.fuse_inputs(token, parent)], 1)
                    steps = torch.arange(step + 1) + prompt_len[row]
                    out = draft(inputs, torch.cat([positions, steps[None]], 1))
                    parent = out[:, -1:]
                torch.testing.assert_close(hidden[row, node], parent[0, 0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_fixed_width_commit_appends_only_each_rows_count(tmp_path):
    """commit() runs all W pairs of every row but keeps count[b]: the next root state and the
    draft length are those of the first count[b] pairs, as a causal forward over them says."""
    torch.manual_seed(1)
    target = tiny_llava(tmp_path / "llava", seed=2)
    draft = random_draft(target, seed=3)
    hidden_size, width = draft.config.hidden_size, 5
    cache = StaticKVCache(1, 3, draft.config.num_key_value_heads, 64, draft.layers[0].self_attn.head_dim,
                          torch.float32, "cpu")
    drafter = TreeDrafter(draft, cache, 2, 2, 4)
    committed = []
    for row in range(3):
        ids, features = torch.randint(3, 100, (1, 6)), torch.randn(1, 6, hidden_size)
        first = torch.randint(3, 100, (1,))
        drafter.commit_prompt(row, ids, first, features, torch.zeros_like(features), torch.zeros_like(ids).bool())
        committed.append(draft.fuse_inputs(torch.cat([ids[:, 1:], first[:, None]], 1), features))
    before = drafter.root_hidden.clone()
    tokens, features = torch.randint(3, 100, (3, width)), torch.randn(3, width, hidden_size)
    count = torch.tensor([3, 0, 5])
    drafter.commit(tokens, features, count)
    assert cache.prefix_len.tolist() == [6 + 3, 6, 6 + 5]
    torch.testing.assert_close(drafter.root_hidden[1], before[1])  # nothing committed: unchanged
    for row in (0, 2):
        n = int(count[row])
        inputs = torch.cat([committed[row], draft.fuse_inputs(tokens[row:row + 1, :n], features[row:row + 1, :n])], 1)
        expected = draft(inputs, torch.arange(6 + n)[None])[:, -1]
        torch.testing.assert_close(drafter.root_hidden[row], expected, rtol=1e-4, atol=1e-5)
