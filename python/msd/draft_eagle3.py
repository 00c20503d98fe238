"""The EAGLE-3-style draft head: features from three target layers, its own reduced vocabulary.

The layout and forward are those SpecForge trains and SGLang / vLLM serve (shared/EAGLE3_LAYOUT.md):

    h0  = fc(cat(hs_low, hs_mid, hs_high))             # the target's states entering three layers
    x   = cat(input_layernorm(embed(token)), hidden_norm(h0))
    h   = h0 + o_proj(attention(x))                    # q/k/v take the 2H-wide x
    out = h + mlp(post_attention_layernorm(h))         # carried to the next tree level as is
    logits = lm_head(norm(out))                        # over the draft vocabulary (Vd ids)
    target id = draft id + d2t[draft id]

A tree level feeds the parent's ``out`` (pre-norm, no fc) as the hidden input. MSD's first
principle applies as in the EAGLE-2-style head when ``visual_inputs == "decoupled"`` (msd's own
drafts): at a visual position both halves of ``x`` and the residual are the raw visual embedding,
so no target feature reaches it. Drafts from SpecForge were trained with visual positions treated
as ordinary tokens (``visual_inputs == "token"``: the placeholder's embedding and the target's
features), and run that way.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from msd.cache import StaticKVCache
from msd.draft import DraftAttention, GatedMLP, RMSNorm

VISUAL_INPUTS = ("decoupled", "token")


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default: the hidden states entering layers 2, N//2 and N-3 (Hugging Face's
    ``output_hidden_states`` indices), low, middle, high."""
    return (2, num_layers // 2, num_layers - 3)


class Eagle3Layer(nn.Module):
    """EAGLE-3's ``midlayer``: attention over ``[input_layernorm(embedding), hidden_norm(hidden)]``
    with the raw hidden as the residual, then the usual gated MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.self_attn = DraftAttention(config, input_size=2 * hidden)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.mlp = GatedMLP(hidden, config.intermediate_size)

    def forward(self, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                **cache_masks) -> torch.Tensor:
        """``inputs`` ``[B, N, 2H]`` = ``cat(embedding, hidden)`` -> ``out`` ``[B, N, H]``."""
        embeds, hidden = inputs.chunk(2, dim=-1)
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = hidden + self.self_attn(x, cos, sin, attention_mask, cache, **cache_masks)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3DraftModel(nn.Module):
    """The EAGLE-3-style draft. Saved (SpecForge layout, :mod:`msd.eagle3_checkpoint`): ``fc``,
    ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d`` and optionally ``embed_tokens``.

    Args:
        config: a one-layer ``LlamaConfig`` of the draft, with ``vocab_size`` the target's
            vocabulary V, and the attributes ``draft_vocab_size`` (Vd <= V),
            ``feature_layer_ids`` (the target hidden-state indices fused by ``fc``, or None for
            EAGLE-3's default) and ``visual_inputs`` (``"decoupled"`` or ``"token"``).
        embed_tokens: the token embedding (default: a new frozen one, to be loaded).
    """

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"config.num_hidden_layers must be 1 for an EAGLE-3 draft, got {config.num_hidden_layers}")
        if config.visual_inputs not in VISUAL_INPUTS:
            raise ValueError(f"visual_inputs must be one of {VISUAL_INPUTS}, got {config.visual_inputs!r}")
        self.config = config
        hidden, vocab, draft_vocab = config.hidden_size, config.vocab_size, config.draft_vocab_size
        self.embed_tokens = embed_tokens or nn.Embedding(vocab, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        # target id = draft id + d2t[draft id]; t2d[target id]: the target id has a draft id.
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(vocab, dtype=torch.bool) if draft_vocab == vocab
                             else torch.zeros(vocab, dtype=torch.bool))
        self.rotary_emb = LlamaRotaryEmbedding(config)

    # What the engine asks of every draft kind (see msd.draft.MSDDraftModel).
    @property
    def head_dim(self) -> int:
        return self.midlayer.self_attn.head_dim

    @property
    def feature_size(self) -> int:
        """Width of the target feature paired with each token: three hidden states."""
        return 3 * self.config.hidden_size

    @property
    def decouple_visual(self) -> bool:
        return self.config.visual_inputs == "decoupled"

    def feature_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The target hidden states (``output_hidden_states`` indices: the states entering those
        layers) that ``fc`` fuses, low to high."""
        layers = self.config.feature_layer_ids or default_feature_layers(num_target_layers)
        if any(not 0 <= layer <= num_target_layers for layer in layers):
            raise ValueError(f"draft feature layers {list(layers)} do not exist in a target of "
                             f"{num_target_layers} layers")
        return tuple(layers)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target ids ``draft_ids + d2t[draft_ids]``."""
        return draft_ids + self.d2t[draft_ids]

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids (their rank among the draft vocabulary's target ids, which
        ``d2t`` keeps in ascending order), -1 for target ids outside the draft vocabulary."""
        targets = self.d2t + torch.arange(self.d2t.shape[0], device=self.d2t.device)  # ascending
        index = torch.searchsorted(targets, target_ids).clamp(max=targets.shape[0] - 1)
        return torch.where(targets[index] == target_ids, index, -1)

    def fuse_inputs(self, input_ids: torch.Tensor, features: torch.Tensor, visual_embeds: torch.Tensor | None = None,
                    visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer inputs ``[B, N, 2H]`` = ``cat(embedding of input_ids, hidden)`` of the
        shifted sequence (pairs ``(f_j, x_{j+1})`` as in MSD_SPEC.md 2). ``features``
        ``[B, N, 3H]`` are target states (fused by ``fc``) or ``[B, N, H]`` the draft's own
        output at the parent (tree levels). With ``visual_inputs == "decoupled"``, positions of
        ``visual_mask`` take the raw visual embedding (``visual_embeds``) for both halves."""
        hidden = self.fc(features) if features.shape[-1] != self.config.hidden_size else features
        known = input_ids < self.config.vocab_size
        embeds = self.embed_tokens(torch.where(known, input_ids, 0)).to(hidden.dtype)
        embeds = torch.where(known.unsqueeze(-1), embeds, 0)
        if visual_mask is not None and self.decouple_visual:
            if visual_embeds is None:
                raise ValueError("visual_embeds is required when visual_mask is given")
            visual = visual_mask.unsqueeze(-1)
            visual_embeds = visual_embeds.to(hidden.dtype)
            embeds, hidden = torch.where(visual, visual_embeds, embeds), torch.where(visual, visual_embeds, hidden)
        return torch.cat([embeds, hidden], dim=-1)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                **cache_masks) -> torch.Tensor:
        """Layer outputs ``[B, N, H]`` (pre-norm: the next level's hidden input) of ``inputs``
        ``[B, N, 2H]`` at ``position_ids`` ``[B, N]``; masks as :class:`msd.draft.MSDDraftModel`'s."""
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        return self.midlayer(inputs_embeds, cos, sin, attention_mask, cache, **cache_masks)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(norm(hidden))``: ``[B, N, H]`` -> ``[B, N, Vd]`` over the draft vocabulary."""
        return self.lm_head(self.norm(hidden))
