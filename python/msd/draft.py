"""The MSD draft head: one EAGLE-style Llama (or Qwen2) decoder layer with decoupled inputs.

MSD_SPEC.md section 2. Width equals the target's text model. The layer has no input
RMSNorm and the head no final norm; token embeddings and the output head are the
target's (frozen). Text positions get ``fc(concat(embedding, target feature))``, visual
positions the raw visual embedding (the projector output), never fused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from msd.attention import cached_self_attention, project_qkv
from msd.cache import StaticKVCache


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


class GatedMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, without biases (Llama / Qwen2)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftAttention(nn.Module):
    """Multi-head attention with GQA; ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` as in Llama
    (``config.qkv_bias``: with q/k/v biases, as in Qwen2)."""

    def __init__(self, config: LlamaConfig, input_size: int | None = None):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        qkv_bias = bias or getattr(config, "qkv_bias", False)  # Qwen2: q/k/v with biases, o without
        input_size = input_size or config.hidden_size  # EAGLE-3 projects [embedding, hidden], 2H wide
        self.q_proj = nn.Linear(input_size, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(input_size, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(input_size, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                **cache_masks) -> torch.Tensor:
        """Without ``cache``: attention within ``hidden`` ``[B, N, H]`` under ``attention_mask``
        (bool ``[B, 1, N, N]``, True = may attend; None = causal), as in training. With it: over
        the cache (:func:`msd.attention.cached_self_attention`, ``cache_masks`` its masks)."""
        if cache is not None:
            return cached_self_attention(self, hidden, cos, sin, cache, 0, head_dim=self.head_dim,
                                         scaling=self.scaling, **cache_masks)
        batch, length, _ = hidden.shape
        queries, keys, values = project_qkv(self, hidden, self.head_dim, cos, sin)
        out = nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attention_mask, is_causal=attention_mask is None, scale=self.scaling,
            enable_gqa=queries.shape[1] != keys.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MSDDraftLayer(nn.Module):
    """A Llama decoder layer without the input RMSNorm (the first EAGLE layer skips it)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                **cache_masks) -> torch.Tensor:
        hidden = hidden + self.self_attn(hidden, cos, sin, attention_mask, cache, **cache_masks)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MSDDraftModel(nn.Module):
    """The draft head. Parameters saved in checkpoints: ``fc``, ``layers.0.*`` and
    ``embed_tokens`` (a frozen copy of the target's); ``lm_head`` is the target's and is
    never saved.

    Args:
        config: a one-layer ``LlamaConfig`` with the target text model's width. Its
            ``vocab_size`` may be smaller than the target's when the draft's vocabulary is a
            prefix of the target's (the released LLaVA-1.5 drafts: 32000 ids, llava-hf targets
            32064): the draft then never proposes, nor looks up, the ids past it.
        embed_tokens: the token embedding to use (default: a new frozen one, to be loaded).
        lm_head: the target's output head (needed for :meth:`compute_logits`).
        decouple_visual: MSD's decoupled inputs (the default). False gives the coupled,
            plain-EAGLE input of the ablation (``benchmarks/ablation.py``): visual positions
            get ``fc(concat(visual embedding, target feature))`` like text positions.
    """

    def __init__(
        self,
        config: LlamaConfig,
        embed_tokens: nn.Embedding | None = None,
        lm_head: nn.Linear | None = None,
        decouple_visual: bool = True,
    ):
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"config.num_hidden_layers must be 1 for an MSD draft, got {config.num_hidden_layers}")
        self.config = config
        self.decouple_visual = decouple_visual
        hidden = config.hidden_size
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layers = nn.ModuleList([MSDDraftLayer(config)])
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # Kept out of the module tree so it is neither saved nor trained with the draft.
        self._lm_head = [lm_head]

    @property
    def lm_head(self) -> nn.Linear | None:
        return self._lm_head[0]

    def set_lm_head(self, lm_head: nn.Linear) -> None:
        self._lm_head[0] = lm_head

    # What the engine asks of every draft kind (see also msd.draft_eagle3.Eagle3DraftModel).
    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    @property
    def feature_size(self) -> int:
        """Width of the target feature paired with each token: the target's last hidden state."""
        return self.config.hidden_size

    def feature_layers(self, num_target_layers: int) -> tuple[int, ...] | None:
        """Which target hidden states make the feature: None for the last one after the final
        norm (the lm_head's input)."""
        return None

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target ids of draft ids: the same (the draft's vocabulary is the target's, or a prefix)."""
        return draft_ids

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids, -1 for ids past the draft's vocabulary."""
        return torch.where(target_ids < self.config.vocab_size, target_ids, -1)

    def fuse_inputs(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft inputs for the shifted sequence (MSD_SPEC.md 2, "Decoupled inputs").

        Args:
            input_ids: ``[B, N]`` tokens ``x_{j+1}``.
            features: ``[B, N, H]`` target features ``f_j`` (post-norm last hidden states).
            visual_embeds: ``[B, N, H]`` the target's input embeddings at the same
                positions as ``input_ids`` (visual features spliced in), or None.
            visual_mask: ``[B, N]`` bool, True where ``x_{j+1}`` is a visual position.

        Returns:
            ``[B, N, H]``: ``fc(concat(E(x_{j+1}), f_j))`` at text positions, the raw
            visual embedding at visual positions (with ``decouple_visual=False``:
            ``fc(concat(visual embedding, f_j))`` there, the target's input embedding
            taking the place of ``E``, as EAGLE run on a LLaVA target does). Ids past the
            draft's vocabulary are never looked up: their ``E`` is zero (at visual positions,
            where they occur, it is replaced anyway).
        """
        known = input_ids < self.config.vocab_size
        embeds = self.embed_tokens(torch.where(known, input_ids, 0)).to(features.dtype)
        embeds = torch.where(known.unsqueeze(-1), embeds, 0)
        if visual_mask is not None:
            if visual_embeds is None:
                raise ValueError("visual_embeds is required when visual_mask is given")
            visual_mask = visual_mask.unsqueeze(-1)
            if not self.decouple_visual:
                embeds = torch.where(visual_mask, visual_embeds.to(embeds.dtype), embeds)
        fused = self.fc(torch.cat([embeds, features], dim=-1))
        if visual_mask is None or not self.decouple_visual:
            return fused
        return torch.where(visual_mask, visual_embeds.to(fused.dtype), fused)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: StaticKVCache | None = None,
        **cache_masks,
    ) -> torch.Tensor:
        """Run the layer on fused inputs ``[B, N, H]`` at ``position_ids`` ``[B, N]``;
        returns the draft hidden states ``[B, N, H]`` (no final norm).

        Training: attention within the inputs under ``attention_mask`` (bool ``[B, 1, N, N]``,
        True = may attend; None = causal). Inference: over ``cache``, with ``tree_mask`` or
        ``tree_len`` as :func:`msd.attention.cached_self_attention` takes them.
        """
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention_mask, cache, **cache_masks)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's lm_head on draft hidden states, over the draft's vocabulary:
        ``[B, N, H]`` -> ``[B, N, vocab_size]``."""
        if self.lm_head is None:
            raise RuntimeError("MSDDraftModel has no lm_head: pass the target's (set_lm_head)")
        hidden = hidden.to(self.lm_head.weight.dtype)
        if self.lm_head.weight.shape[0] == self.config.vocab_size:
            return self.lm_head(hidden)
        # A prefix of the target's vocabulary: only the rows the draft knows.
        bias = self.lm_head.bias
        return nn.functional.linear(hidden, self.lm_head.weight[: self.config.vocab_size],
                                    None if bias is None else bias[: self.config.vocab_size])
