"""EAGLE-3-style drafts in SpecForge's layout, which SGLang and vLLM serve (shared/EAGLE3_LAYOUT.md).

``config.json``: ``architectures: ["LlamaForCausalLMEagle3"]``, ``model_type: llama``, one hidden
layer, the Llama fields, ``vocab_size`` (the target's V) and ``draft_vocab_size`` (Vd; missing:
V), optionally ``target_hidden_size``, ``eagle_config.eagle_aux_hidden_state_layer_ids`` (layer
OUTPUT ids: hidden state ``id + 1``; a top-level ``eagle_aux_hidden_state_layer_ids`` is read as
the hidden-state index itself, as vLLM does), ``rope_scaling: {"type": "mrope", ...}`` for
Qwen2.5-VL. Weights: ``midlayer.*``, ``fc.weight`` (no bias), ``norm.weight``,
``lm_head.weight`` ``[Vd, H]``, ``d2t`` ``[Vd]`` (target id = draft id + d2t), ``t2d`` ``[V]``
and optionally ``embed_tokens.weight``. msd adds ``msd_visual_inputs`` (``"decoupled"`` for its
own drafts; missing: ``"token"``, as SpecForge trains) and writes every field SGLang and vLLM read.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from msd.draft_eagle3 import Eagle3DraftModel
from msd.hf_compat import mrope_section, rope_theta_and_scaling

ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYER_KEYS = tuple(f"midlayer.{name}.weight" for name in (
    "input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
    "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
REQUIRED_KEYS = frozenset({*LAYER_KEYS, "fc.weight", "norm.weight", "lm_head.weight"})
MAP_KEYS = ("d2t", "t2d")
EMBEDDING_KEY = "embed_tokens.weight"
# SpecForge / vLLM variants msd does not run (their forward differs from the one above).
UNSUPPORTED_FIELDS = {"fc_norm": False, "norm_output": False, "norm_before_residual": False}


def is_eagle3(raw: dict) -> bool:
    """Whether a draft ``config.json`` is in the EAGLE-3 layout."""
    return any("Eagle3" in name for name in raw.get("architectures") or ()) or "draft_vocab_size" in raw


def config_from_dict(raw: dict) -> LlamaConfig:
    """The draft's ``LlamaConfig`` (with ``draft_vocab_size``, ``feature_layer_ids`` and
    ``visual_inputs``) from an EAGLE-3 ``config.json``; unsupported variants are errors."""
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise ValueError(f"draft config.json lacks {', '.join(missing)}")
    if raw.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config.json: num_hidden_layers must be 1, got {raw['num_hidden_layers']}")
    eagle = raw.get("eagle_config") or {}
    for name, off in UNSUPPORTED_FIELDS.items():
        if raw.get(name, eagle.get(name, off)) != off:
            raise ValueError(f"draft config.json: {name}={raw.get(name, eagle.get(name))!r} is not supported by msd")
    if eagle.get("use_aux_hidden_state", True) is False or raw.get("use_aux_hidden_state", True) is False:
        raise ValueError("draft config.json: use_aux_hidden_state=false (no fc over three target layers) is not "
                         "supported by msd")
    if raw.get("target_hidden_size", raw["hidden_size"]) != raw["hidden_size"]:
        raise ValueError(f"draft config.json: target_hidden_size {raw['target_hidden_size']} differs from "
                         f"hidden_size {raw['hidden_size']}: msd runs drafts as wide as their target")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"draft config.json: hidden_act must be silu, got {raw['hidden_act']!r}")
    if "eagle_aux_hidden_state_layer_ids" in eagle:  # layer OUTPUT ids (SpecForge, SGLang)
        layers = [layer + 1 for layer in eagle["eagle_aux_hidden_state_layer_ids"]]
    else:  # a top-level list is the capture index itself (vLLM); none: EAGLE-3's default
        layers = raw.get("eagle_aux_hidden_state_layer_ids")
    if layers is not None and len(layers) != 3:
        raise ValueError(f"draft config.json: fc fuses three target layers, got layer ids {layers}")
    rope_scaling = raw.get("rope_scaling")
    mrope_section = None
    if rope_scaling and "mrope_section" in rope_scaling:
        # msd runs its drafts on 1-D positions, where M-RoPE (equal axes) is plain RoPE.
        mrope_section, rope_scaling = list(rope_scaling["mrope_section"]), None
    heads = raw["num_attention_heads"]
    return LlamaConfig(
        hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads", heads), head_dim=raw.get("head_dim"),
        num_hidden_layers=1, vocab_size=raw["vocab_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope_theta=raw.get("rope_theta", 10000.0), rope_scaling=rope_scaling,
        attention_bias=raw.get("attention_bias", False),
        draft_vocab_size=raw.get("draft_vocab_size") or raw["vocab_size"], feature_layer_ids=layers,
        visual_inputs=raw.get("msd_visual_inputs", "token"), mrope_section=mrope_section,
        target_model_type=raw.get("target_model_type"),
    )


def check_state(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, completed: ``t2d`` derived from ``d2t`` where missing, both
    maps the identity for a full vocabulary. Missing or unexpected keys, a reduced vocabulary
    without ``d2t`` and maps that disagree are errors."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(REQUIRED_KEYS - state.keys())
    unexpected = sorted(state.keys() - REQUIRED_KEYS - {EMBEDDING_KEY, *MAP_KEYS})
    if missing or unexpected:
        raise ValueError("draft checkpoint does not have the EAGLE-3 (SpecForge) layout: "
                         f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}")
    vocab, draft_vocab = config.vocab_size, config.draft_vocab_size
    if "d2t" not in state:
        if draft_vocab != vocab:
            raise ValueError(f"draft checkpoint has no d2t: a draft vocabulary of {draft_vocab} ids (of the target's "
                             f"{vocab}) cannot be mapped to target ids")
        state["d2t"] = torch.zeros(vocab, dtype=torch.long)
    d2t = state["d2t"].long()
    if d2t.shape != (draft_vocab,):
        raise ValueError(f"draft checkpoint: d2t has shape {tuple(d2t.shape)}, expected ({draft_vocab},)")
    targets = d2t + torch.arange(draft_vocab)
    if bool((targets < 0).any()) or bool((targets >= vocab).any()) or bool((targets[1:] <= targets[:-1]).any()):
        raise ValueError("draft checkpoint: d2t does not map the draft ids to distinct ascending target ids")
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    if "t2d" in state and not torch.equal(state["t2d"].bool(), t2d):
        raise ValueError("draft checkpoint: t2d does not mark exactly the target ids d2t maps to")
    return {**state, "d2t": d2t, "t2d": t2d}


def config_to_dict(draft: Eagle3DraftModel, num_target_layers: int | None = None) -> dict:
    """The ``config.json`` SpecForge writes and SGLang / vLLM read, plus msd's own fields."""
    config = draft.config
    rope_theta, rope_scaling = rope_theta_and_scaling(config)
    raw = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": draft.head_dim, "vocab_size": config.vocab_size, "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": rope_theta,
        "rope_scaling": rope_scaling, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": config.attention_bias, "torch_dtype": str(draft.fc.weight.dtype).removeprefix("torch."),
        "msd_visual_inputs": config.visual_inputs,
    }
    if config.mrope_section is not None:  # a Qwen2.5-VL draft: as SpecForge's Qwen configs say
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": config.mrope_section}
    if config.target_model_type is not None:
        raw["target_model_type"] = config.target_model_type
    layers = config.feature_layer_ids
    if layers is None and num_target_layers is not None:
        layers = draft.feature_layers(num_target_layers)
    if layers is not None:
        # Nested, as layer OUTPUT ids (hidden state i = output of layer i - 1): SpecForge's and
        # SGLang's form; top-level, as capture indices: the one upstream vLLM reads.
        raw["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [layer - 1 for layer in layers],
                               "use_aux_hidden_state": True}
        raw["eagle_aux_hidden_state_layer_ids"] = list(layers)
    return raw


def eagle3_config_for(target, draft_vocab_size: int | None = None, feature_layers: tuple[int, ...] | None = None,
                      visual_inputs: str = "decoupled") -> LlamaConfig:
    """The config of a new EAGLE-3-style draft for ``target``: its text model's width, heads,
    norm epsilon and RoPE base, a vocabulary of ``draft_vocab_size`` ids (default: the
    target's), fusing the target hidden states ``feature_layers`` (default: EAGLE-3's)."""
    text = target.config.get_text_config()
    rope_theta, rope_scaling = rope_theta_and_scaling(text)
    raw = {"architectures": [ARCHITECTURE], "hidden_size": text.hidden_size,
           "intermediate_size": text.intermediate_size, "num_attention_heads": text.num_attention_heads,
           "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
           "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
           "vocab_size": text.vocab_size, "draft_vocab_size": draft_vocab_size or text.vocab_size,
           "rms_norm_eps": text.rms_norm_eps, "max_position_embeddings": text.max_position_embeddings,
           "rope_theta": rope_theta, "rope_scaling": rope_scaling, "msd_visual_inputs": visual_inputs}
    if feature_layers is not None:
        raw["eagle_aux_hidden_state_layer_ids"] = list(feature_layers)
    if target.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        raw |= {"target_model_type": target.config.model_type,
                "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(text)}}
    return config_from_dict(raw)
