"""Draft checkpoints in the released MSD / EAGLE layout (MSD_SPEC.md section 2).

A checkpoint folder holds ``config.json`` (flat Llama fields; ``model_type`` may be
``llava`` as in the released MSD drafts or ``llama`` as in EAGLE's) and the weights in
``model.safetensors`` or ``pytorch_model.bin`` with the keys ``fc.{weight,bias}``,
``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
``layers.0.post_attention_layernorm.weight`` and optionally ``embed_tokens.weight``
(absent: the target's embeddings are used). msd writes the same layout (safetensors).
EAGLE-3-style drafts have their own (SpecForge's) layout: :mod:`msd.eagle3_checkpoint`;
:func:`load_draft` and :func:`save_draft` handle both kinds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from msd import eagle3_checkpoint
from msd.draft import MSDDraftModel
from msd.draft_eagle3 import Eagle3DraftModel
from msd.draft_kinds import DraftModel
from msd.eagle3_checkpoint import is_eagle3
from msd.hf_compat import mrope_section, rope_theta_and_scaling

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"

LAYER_KEYS = (
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
)
REQUIRED_KEYS = frozenset({"fc.weight", "fc.bias", *LAYER_KEYS})
# A Qwen2 decoder layer (drafts for Qwen2-VL / Qwen2.5-VL targets) also has q/k/v biases.
QKV_BIAS_KEYS = frozenset(f"layers.0.self_attn.{name}_proj.bias" for name in "qkv")
OPTIONAL_KEY = "embed_tokens.weight"
# Buffers some older checkpoints carry; recomputed from the config, so safe to drop.
DERIVED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json flag of a coupled (non-MSD, ablation) draft; absent means decoupled.
DECOUPLE_VISUAL = "decouple_visual"
# model_type of the released MSD Qwen2-VL draft (and what a Qwen2.5-VL one would say).
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen2")


def config_from_dict(raw: dict) -> LlamaConfig:
    """A one-layer ``LlamaConfig`` from a draft ``config.json``: the MSD / EAGLE flavour (flat
    Llama fields, ``model_type`` ``llava`` or ``llama``) or the released MSD Qwen2-VL one
    (``model_type`` ``qwen2_vl``: a Qwen2 layer, q/k/v with biases, an ``mrope_section``).

    Two attributes say which: ``qkv_bias`` (Qwen2 layer) and ``mrope_section`` (kept to be
    written back; the draft itself runs 1-D positions, which M-RoPE with equal axes is).
    """
    if "hidden_size" not in raw and isinstance(raw.get("text_config"), dict):  # nested, as newer Qwen configs
        raw = {**raw["text_config"], "model_type": raw.get("model_type")}
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise ValueError(f"draft config.json lacks {', '.join(missing)}")
    if raw.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config.json: num_hidden_layers must be 1, got {raw['num_hidden_layers']}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"draft config.json: hidden_act must be silu, got {raw['hidden_act']!r}")
    qwen = raw.get("model_type") in QWEN_MODEL_TYPES
    rope_scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    mrope_section = None
    if rope_scaling and "mrope_section" in rope_scaling:
        # M-RoPE at equal positions on the three axes is plain RoPE: the draft needs no scaling.
        mrope_section, rope_scaling = list(rope_scaling["mrope_section"]), None
    if rope_scaling is not None:
        rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
    return LlamaConfig(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        num_hidden_layers=1,
        vocab_size=raw["vocab_size"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6 if qwen else 1e-5),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope_theta=raw.get("rope_theta", (rope_scaling or {}).get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias=False,
        qkv_bias=qwen,
        mrope_section=mrope_section,
    )


def config_to_dict(config: LlamaConfig) -> dict:
    """The flat ``config.json`` msd writes: EAGLE flavour (``model_type: llama``), or for a
    Qwen2 layer the released MSD Qwen2-VL flavour (``model_type: qwen2_vl``, ``mrope_section``)."""
    rope_theta, rope_scaling = rope_theta_and_scaling(config)
    qwen = getattr(config, "qkv_bias", False)
    section = getattr(config, "mrope_section", None)
    if qwen and section is not None:
        rope_scaling = {"type": "mrope", "mrope_section": section}
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2_vl" if qwen else "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
    }


def draft_config_for(target) -> LlamaConfig:
    """The config of a new draft for ``target``: its text model's width, heads, vocabulary, norm
    epsilon and RoPE base; a Qwen2 layer (q/k/v biases, the target's ``mrope_section`` kept)
    for Qwen2-VL / Qwen2.5-VL targets."""
    text = target.config.get_text_config()
    rope_theta, rope_scaling = rope_theta_and_scaling(text)
    raw = {"hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
           "num_attention_heads": text.num_attention_heads,
           "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
           "vocab_size": text.vocab_size, "rms_norm_eps": text.rms_norm_eps,
           "max_position_embeddings": text.max_position_embeddings, "rope_theta": rope_theta,
           "rope_scaling": rope_scaling}
    if target.config.model_type in QWEN_MODEL_TYPES:
        raw |= {"model_type": target.config.model_type,
                "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(text)}}
    return config_from_dict(raw)


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local folder as is; anything else is fetched from the Hugging Face Hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"draft: {path} is a file; pass the checkpoint folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id), allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE]))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_FILE).is_file():
        return load_file(str(folder / SAFETENSORS_FILE))
    if (folder / PYTORCH_FILE).is_file():
        return torch.load(folder / PYTORCH_FILE, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"draft: {folder} has neither {SAFETENSORS_FILE} nor {PYTORCH_FILE}")


def check_keys(state: dict[str, torch.Tensor], qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    """Drop derivable buffers; raise on missing or unexpected keys (``qkv_bias``: a Qwen2 layer)."""
    state = {k: v for k, v in state.items() if not k.endswith(DERIVED_KEY_SUFFIXES)}
    required = REQUIRED_KEYS | QKV_BIAS_KEYS if qkv_bias else REQUIRED_KEYS
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - required - {OPTIONAL_KEY})
    if missing or unexpected:
        raise ValueError(
            "draft checkpoint does not have the MSD/EAGLE layout: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )
    return state


def check_fits_target(config: LlamaConfig, target_hidden: int, target_vocab: int) -> None:
    """``ValueError`` unless the draft's width is the target's and its vocabulary (a prefix of)
    the target's."""
    if config.hidden_size != target_hidden:
        raise ValueError(f"draft width (hidden_size {config.hidden_size}) does not match the target's "
                         f"({target_hidden})")
    if config.vocab_size > target_vocab:
        raise ValueError(f"draft vocabulary ({config.vocab_size} ids) is larger than the target's ({target_vocab}): "
                         "the draft was made for another target")


def load_draft(
    path_or_id: str | Path,
    target: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DraftModel:
    """Load a draft checkpoint, of either kind (:mod:`msd.draft_kinds`): the MSD / EAGLE layout
    or the EAGLE-3 (SpecForge) one, told apart by its ``config.json``. With ``target``, attach
    its embeddings (when the checkpoint has none) and, for an MSD draft, its lm_head.

    The draft takes ``dtype``/``device`` if given, else the target's, else the stored
    weights' dtype on the CPU. A width different from the target's, or a vocabulary larger
    than the target's, is an error; a smaller vocabulary is taken as a prefix of the
    target's (the released LLaVA-1.5 drafts have 32000 ids, llava-hf targets 32064).
    """
    folder = resolve_checkpoint(path_or_id)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    if is_eagle3(raw):
        config = eagle3_checkpoint.config_from_dict(raw)
        state = eagle3_checkpoint.check_state(read_state_dict(folder), config)
    else:
        config = config_from_dict(raw)
        state = check_keys(read_state_dict(folder), config.qkv_bias)

    embed_tokens = lm_head = None
    if target is not None:
        embed_tokens, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        check_fits_target(config, embed_tokens.weight.shape[1], embed_tokens.weight.shape[0])
        dtype = dtype or embed_tokens.weight.dtype
        device = device or embed_tokens.weight.device
    elif OPTIONAL_KEY not in state:
        raise ValueError("draft checkpoint has no embed_tokens.weight: pass the target to take its embeddings")
    dtype = dtype or state["fc.weight"].dtype

    if OPTIONAL_KEY in state:
        embed_tokens = None  # the checkpoint's own frozen copy wins
    elif embed_tokens.weight.dtype != dtype or (
        device is not None and embed_tokens.weight.device != torch.device(device)
    ):
        # A private copy, so that moving the draft never converts the target's module.
        embed_tokens = torch.nn.Embedding.from_pretrained(embed_tokens.weight.detach().clone(), freeze=True)

    if is_eagle3(raw):
        draft = Eagle3DraftModel(config, embed_tokens=embed_tokens)
    else:
        draft = MSDDraftModel(config, embed_tokens=embed_tokens, lm_head=lm_head,
                              decouple_visual=raw.get(DECOUPLE_VISUAL, True))
    own = draft.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"draft checkpoint: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    draft.load_state_dict(state, strict=False)
    return draft.to(dtype=dtype, device=device).eval()


def save_draft(draft: DraftModel, folder: str | Path, num_target_layers: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the draft kind's layout: the released MSD
    one, or SpecForge's for an EAGLE-3-style draft (``num_target_layers`` writes its default
    feature layers out explicitly)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(draft, Eagle3DraftModel):
        keys = eagle3_checkpoint.REQUIRED_KEYS | {*eagle3_checkpoint.MAP_KEYS, OPTIONAL_KEY}
        config = eagle3_checkpoint.config_to_dict(draft, num_target_layers)
    else:
        keys = REQUIRED_KEYS | QKV_BIAS_KEYS | {OPTIONAL_KEY}
        config = config_to_dict(draft.config)
        if not draft.decouple_visual:  # only ablation drafts say so: released configs stay as they are
            config[DECOUPLE_VISUAL] = False
    state = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items() if k in keys}
    save_file(state, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
