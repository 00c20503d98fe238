"""Training of EAGLE-3-style drafts: the reduced vocabulary built from answer-token counts, and
the training-time-test unroll against an independent reference (the draft's plain causal
forward over the committed pairs followed by the chain of its own predictions, as a tree node
k levels deep sees them at inference)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from msd.testing import random_eagle3_draft
from msd.train.ttt import shift_left, ttt_loss, ttt_outputs
from msd.train.vocabulary import count_answer_tokens, vocabulary_maps

from tiny_models import tiny_llava


def test_the_vocabulary_keeps_the_most_frequent_answer_tokens():
    items = [{"input_ids": torch.tensor([1, 5, 5, 9, 7, 7, 7]), "loss_mask": torch.tensor([0, 1, 1, 0, 1, 1, 1])},
             None, {"input_ids": torch.tensor([9, 3, 3]), "loss_mask": torch.tensor([1, 1, 1])}]
    counts = count_answer_tokens(items)
    assert counts == Counter({7: 3, 5: 2, 3: 2, 9: 1})  # token 1 and the first 9 are not answers
    d2t, t2d = vocabulary_maps(counts, 3, 12)
    assert (d2t + torch.arange(3)).tolist() == [3, 5, 7]  # 7, then 3 and 5 (tied: lower id first), sorted
    assert t2d.nonzero().flatten().tolist() == [3, 5, 7]
    d2t, _ = vocabulary_maps(counts, 6, 12)  # more than were seen: filled with the lowest unseen ids
    assert (d2t + torch.arange(6)).tolist() == [0, 1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="draft_vocab_size"):
        vocabulary_maps(counts, 13, 12)


@torch.no_grad()
@pytest.mark.parametrize("decoupled", [True, False])
def test_every_unrolled_step_equals_the_causal_forward_over_its_chain(tmp_path, decoupled):
    torch.manual_seed(0)
    target = tiny_llava(tmp_path / "llava", seed=2, layers=4)
    draft = random_eagle3_draft(target, draft_vocab_size=100, feature_layers=(0, 2, 3), seed=3)
    draft.config.visual_inputs = "decoupled" if decoupled else "token"
    hidden_size, length, steps = draft.config.hidden_size, 9, 3
    input_ids = torch.randint(3, 100, (2, length))
    features = torch.randn(2, length, 3 * hidden_size)
    visual_mask = torch.zeros(2, length, dtype=torch.bool)
    visual_mask[0, 2:4] = True
    visual_embeds = torch.randn(2, length, hidden_size)
    positions = torch.arange(length).expand(2, length)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, -2:] = False  # padding
    outputs = ttt_outputs(draft, input_ids, features, visual_embeds, visual_mask, positions, valid, steps)
    for row in range(2):
        real = int(valid[row].sum())
        committed = draft.fuse_inputs(input_ids[row:row + 1, :real], features[row:row + 1, :real],
                                      visual_embeds[row:row + 1, :real], visual_mask[row:row + 1, :real])
        step0 = draft(committed, torch.arange(real)[None])
        torch.testing.assert_close(outputs[0][row, :real], step0[0], rtol=1e-4, atol=1e-5)
        for j in range(real - steps):
            inputs, parent = committed[:, :j + 1], step0[:, j:j + 1]
            for step in range(1, steps):
                token = input_ids[row:row + 1, j + step:j + step + 1]
                visual = visual_mask[row:row + 1, j + step:j + step + 1]
                chain_input = draft.fuse_inputs(token, parent, visual_embeds[row:row + 1, j + step:j + step + 1],
                                                visual)
                inputs = torch.cat([inputs, chain_input], 1)
                out = draft(inputs, torch.cat([torch.arange(j + 1), j + torch.arange(1, step + 1)])[None])
                parent = out[:, -1:]
                torch.testing.assert_close(outputs[step][row, j], parent[0, 0], rtol=1e-4, atol=1e-5)


def test_the_loss_counts_only_answers_the_draft_can_propose(tmp_path):
    """Each unrolled step's loss is the cross-entropy against the target's distribution over the
    draft vocabulary, on the (shifted) loss mask where the target's top token is proposable."""
    torch.manual_seed(1)
    target = tiny_llava(tmp_path / "llava", seed=2, layers=4)
    draft = random_eagle3_draft(target, draft_vocab_size=100, feature_layers=(0, 2, 3), seed=3)
    hidden_size, length = draft.config.hidden_size, 7
    head = target.get_output_embeddings()
    inputs = {"input_ids": torch.randint(3, 100, (1, length)), "features": torch.randn(1, length, 3 * hidden_size),
              "target": torch.randn(1, length, hidden_size), "loss_mask": torch.tensor([[0, 1, 1, 1, 0, 1, 1]]),
              "attention_mask": torch.ones(1, length, dtype=torch.bool),
              "position_ids": torch.arange(length)[None]}
    terms = ttt_loss(draft, inputs, head, steps=2, decay=0.5)
    with torch.no_grad():
        outputs = ttt_outputs(draft, inputs["input_ids"], inputs["features"], None, None, inputs["position_ids"],
                              inputs["attention_mask"], 2)
        targets = draft.to_target(torch.arange(100))
        expected = 0.0
        for step, output in enumerate(outputs):
            target_logits = head(shift_left(inputs["target"], step))[0]
            mask = shift_left(inputs["loss_mask"], step)[0].bool() & draft.t2d[target_logits.argmax(-1)]
            probs = torch.softmax(target_logits[:, targets], -1)
            log_q = torch.log_softmax(draft.compute_logits(output)[0], -1)
            per_position = -(probs * log_q).sum(-1)
            expected += 0.5 ** step * float(per_position[mask].mean()) if mask.any() else 0.0
    assert float(terms.loss.detach()) == pytest.approx(expected, rel=1e-5)
    terms.loss.backward()
    assert draft.fc.weight.grad is not None and draft.lm_head.weight.grad is not None
