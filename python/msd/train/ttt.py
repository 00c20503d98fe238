"""Training-time test (EAGLE-3's recipe) for the EAGLE-3-style draft.

The draft is unrolled for ``steps`` steps over the whole sequence: step 0 reads the target's
fused features (as a committed pair at inference), and step k reads, at each position, the
draft's own output of step k - 1 and the token k further on, as a tree node k levels below
the last committed pair does at inference. Its attention sees what that node sees: the
step-0 keys up to its position (the committed pairs) and, at its own position, the keys of
steps 1 .. k (its ancestors and itself). Positions follow msd's drafter: step k at position
j + k. Each step's loss is the cross-entropy against the target's next-token distribution
restricted to the draft vocabulary, weighted by ``decay ** k`` (SpecForge's 0.8); a position
counts where the loss mask says so and the target's own top token is in the draft vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msd.attention import project_qkv
from msd.draft_eagle3 import Eagle3DraftModel
from msd.train.losses import LossTerms

DECAY = 0.8


def shift_left(values: torch.Tensor, steps: int, fill=0) -> torch.Tensor:
    """``values[:, j + steps]`` at ``j`` (``[B, N, ...]``), ``fill`` past the end."""
    if steps == 0:
        return values
    pad = torch.full_like(values[:, :steps], fill)
    return torch.cat([values[:, steps:], pad], 1)


def ttt_attention(queries: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  causal: torch.Tensor, scaling: float) -> torch.Tensor:
    """Step k's attention: queries ``[B, Hq, N, D]`` over the step-0 keys allowed by ``causal``
    (bool ``[B, N, N]``) and, at each query's own position, the keys of steps 1 .. k (lists of
    ``[B, Hkv, N, D]``). Returns ``[B, N, Hq * D]`` in the queries' dtype."""
    batch, heads, length, head_dim = queries.shape
    group = heads // keys[0].shape[1]
    expand = lambda x: x.repeat_interleave(group, dim=1).float()  # noqa: E731
    q = queries.float()
    scores = [(q @ expand(keys[0]).transpose(-1, -2) * scaling).masked_fill(~causal[:, None], float("-inf"))]
    scores += [((q * expand(key)).sum(-1, keepdim=True) * scaling) for key in keys[1:]]  # [B, Hq, N, 1] each
    weights = torch.softmax(torch.cat(scores, -1), -1).nan_to_num(0.0)
    out = weights[..., :length] @ expand(values[0])
    for index, value in enumerate(values[1:]):
        out = out + weights[..., length + index:length + index + 1] * expand(value)
    return out.to(queries.dtype).transpose(1, 2).reshape(batch, length, heads * head_dim)


def ttt_outputs(draft: Eagle3DraftModel, input_ids: torch.Tensor, features: torch.Tensor,
                visual_embeds: torch.Tensor | None, visual_mask: torch.Tensor | None, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The draft's outputs ``[B, N, H]`` of steps 0 .. steps - 1 (see the module docstring).

    Args:
        input_ids: ``[B, N]`` the shifted inputs ``x_{j+1}``.
        features: ``[B, N, 3H]`` the target states paired with them (``f_j``).
        visual_embeds, visual_mask: ``[B, N, H]`` / ``[B, N]`` for MSD's decoupled inputs.
        position_ids: ``[B, N]``; attention_mask: ``[B, N]`` bool, the real positions.
    """
    layer, length = draft.midlayer, input_ids.shape[1]
    attention = layer.self_attn
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    causal = causal[None] & attention_mask[:, None, :]
    hidden = draft.fc(features)
    keys, values, outputs = [], [], []
    for step in range(steps):
        visual = None if visual_mask is None else shift_left(visual_mask, step, False)
        visual_in = None if visual_embeds is None else shift_left(visual_embeds, step)
        inputs = draft.fuse_inputs(shift_left(input_ids, step), hidden, visual_in, visual)
        embeds, hidden = inputs.chunk(2, dim=-1)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        cos, sin = draft.rotary_emb(x, position_ids + step)
        queries, key, value = project_qkv(attention, x, attention.head_dim, cos, sin)
        keys.append(key)
        values.append(value)
        hidden = hidden + attention.o_proj(ttt_attention(queries, keys, values, causal, attention.scaling))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        outputs.append(hidden)
    return outputs


def ttt_loss(draft: Eagle3DraftModel, inputs: dict[str, torch.Tensor],
             target_head: Callable[[torch.Tensor], torch.Tensor], steps: int, decay: float = DECAY) -> LossTerms:
    """The training-time-test loss of one batch of :func:`msd.train.target_features.draft_training_inputs`
    with EAGLE-3 features (``features`` ``[B, N, 3H]``; ``target`` the post-norm target states
    ``f_{j+1}``, turned into next-token logits by the target's ``target_head``)."""
    outputs = ttt_outputs(draft, inputs["input_ids"], inputs["features"], inputs.get("visual_embeds"),
                          inputs.get("visual_mask"), inputs["position_ids"], inputs["attention_mask"], steps)
    draft_targets = draft.to_target(torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device))
    total = torch.zeros((), device=outputs[0].device)
    accuracy = tokens = torch.zeros((), device=outputs[0].device)
    for step, output in enumerate(outputs):
        mask = shift_left(inputs["loss_mask"], step).to(torch.float32)
        with torch.no_grad():
            target_logits = target_head(shift_left(inputs["target"], step)).float()  # [B, N, V]
            mask = mask * draft.t2d[target_logits.argmax(-1)]  # the target's top token must be proposable
            target_probs = torch.softmax(target_logits[..., draft_targets], -1)
        draft_logits = draft.compute_logits(output).float()  # [B, N, Vd]
        cross_entropy = -(target_probs * torch.log_softmax(draft_logits, -1)).sum(-1)
        count = mask.sum()
        total = total + decay ** step * (mask * cross_entropy).sum() / count.clamp(min=1)
        if step == 0:
            agree = (draft_targets[draft_logits.argmax(-1)] == target_logits.argmax(-1)).float()
            accuracy, tokens = (agree * mask).sum() / count.clamp(min=1), count
    zero = torch.zeros((), device=total.device)
    return LossTerms(zero, total, total, accuracy.detach(), tokens)
