"""The MSD draft head: one EAGLE-style Llama decoder layer with decoupled inputs.

MSD_SPEC.md section 2. Width equals the target's text model. The layer has no input
RMSNorm and the head no final norm; token embeddings and the output head are the
target's (frozen). Text positions get ``fc(concat(embedding, target feature))``, visual
positions the raw visual embedding (the projector output), never fused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


class MSDDraftLayer(nn.Module):
    """A Llama decoder layer without the input RMSNorm (the first EAGLE layer skips it)."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **attention_kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **attention_kwargs,
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MSDDraftModel(nn.Module):
    """The draft head. Parameters saved in checkpoints: ``fc``, ``layers.0.*`` and
    ``embed_tokens`` (a frozen copy of the target's); ``lm_head`` is the target's and is
    never saved.

    Args:
        config: a one-layer ``LlamaConfig`` with the target text model's width.
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
        self.layers = nn.ModuleList([MSDDraftLayer(config, 0)])
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # Kept out of the module tree so it is neither saved nor trained with the draft.
        self._lm_head = [lm_head]

    @property
    def lm_head(self) -> nn.Linear | None:
        return self._lm_head[0]

    def set_lm_head(self, lm_head: nn.Linear) -> None:
        self._lm_head[0] = lm_head

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
            taking the place of ``E``, as EAGLE run on a LLaVA target does).
        """
        embeds = self.embed_tokens(input_ids).to(features.dtype)
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
        past_key_values=None,
        **attention_kwargs,
    ) -> torch.Tensor:
        """Run the layer on fused inputs ``[B, N, H]`` at ``position_ids`` ``[B, N]``;
        returns the draft hidden states ``[B, N, H]`` (no final norm)."""
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, attention_mask, past_key_values, **attention_kwargs)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's lm_head on draft hidden states: ``[B, N, H]`` -> ``[B, N, V]``."""
        if self.lm_head is None:
            raise RuntimeError("MSDDraftModel has no lm_head: pass the target's (set_lm_head)")
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))
