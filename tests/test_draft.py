"""The MSD draft head: layer semantics, decoupled inputs, checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import LAYER_KEYS, config_from_dict, load_draft, save_draft

from tiny_models import tiny_llava

HIDDEN, VOCAB = 64, 128

# A released-MSD-style config.json: flat Llama fields under model_type "llava".
RELEASED_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava",
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "torch_dtype": "float16",
}


def released_state(with_embeddings: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with exactly the documented keys and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "fc.weight": (HIDDEN, 2 * HIDDEN), "fc.bias": (HIDDEN,),
        "layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "layers.0.self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "layers.0.self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        "layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "layers.0.mlp.gate_proj.weight": (2 * HIDDEN, HIDDEN),
        "layers.0.mlp.up_proj.weight": (2 * HIDDEN, HIDDEN),
        "layers.0.mlp.down_proj.weight": (HIDDEN, 2 * HIDDEN),
        "layers.0.post_attention_layernorm.weight": (HIDDEN,),
    }
    if with_embeddings:
        shapes["embed_tokens.weight"] = (VOCAB, HIDDEN)
    return {key: torch.randn(shape, generator=gen) * 0.1 for key, shape in shapes.items()}


def write_released(folder, state, config=RELEASED_CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("target"))


def test_layer_equals_a_llama_decoder_layer_without_input_norm():
    """Independent check: HF's own LlamaDecoderLayer with input_layernorm removed."""
    torch.manual_seed(0)
    config = config_from_dict(RELEASED_CONFIG)
    draft = MSDDraftModel(config).eval()
    reference = LlamaDecoderLayer(LlamaConfig(**{**config.to_dict(), "attn_implementation": "eager"}), 0).eval()
    reference.input_layernorm = nn.Identity()
    reference.load_state_dict(
        {k.removeprefix("layers.0."): v for k, v in draft.state_dict().items() if k.startswith("layers.0.")},
        strict=False,
    )
    inputs = torch.randn(2, 7, HIDDEN)
    positions = torch.arange(7).expand(2, -1)
    causal = torch.full((7, 7), float("-inf")).triu(1).expand(2, 1, 7, 7)
    expected = reference(inputs, attention_mask=causal, position_embeddings=draft.rotary_emb(inputs, positions))
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(draft(inputs, positions), expected)


def test_fuse_inputs_decouples_visual_positions():
    torch.manual_seed(0)
    draft = MSDDraftModel(config_from_dict(RELEASED_CONFIG))
    ids = torch.randint(0, VOCAB, (1, 6))
    features, visual = torch.randn(1, 6, HIDDEN), torch.randn(1, 6, HIDDEN)
    mask = torch.tensor([[False, True, True, False, False, True]])
    fused = draft.fuse_inputs(ids, features, visual, mask)
    text = draft.fc(torch.cat([draft.embed_tokens(ids), features], -1))
    torch.testing.assert_close(fused[mask], visual[mask])  # raw visual embedding, no fc
    torch.testing.assert_close(fused[~mask], text[~mask])
    # the target feature never reaches a visual position
    moved = draft.fuse_inputs(ids, features + 1.0, visual, mask)
    torch.testing.assert_close(moved[mask], fused[mask])
    assert not torch.allclose(moved[~mask], fused[~mask])


def test_fused_variant_fuses_visual_positions_like_text():
    """The ablation's coupled draft: the visual embedding takes E's place in the fc input."""
    torch.manual_seed(0)
    draft = MSDDraftModel(config_from_dict(RELEASED_CONFIG), decouple_visual=False)
    ids = torch.randint(0, VOCAB, (1, 6))
    features, visual = torch.randn(1, 6, HIDDEN), torch.randn(1, 6, HIDDEN)
    mask = torch.tensor([[True, True, False, False, True, False]])
    fused = draft.fuse_inputs(ids, features, visual, mask)
    expected = torch.where(mask[..., None], visual, draft.embed_tokens(ids))
    expected = expected @ draft.fc.weight[:, :HIDDEN].T + features @ draft.fc.weight[:, HIDDEN:].T + draft.fc.bias
    torch.testing.assert_close(fused, expected)
    # the default (decoupled) draft with the same weights differs only at visual positions
    draft.decouple_visual = True
    decoupled = draft.fuse_inputs(ids, features, visual, mask)
    assert torch.equal(decoupled[~mask], fused[~mask]) and not torch.allclose(decoupled[mask], fused[mask])


@pytest.mark.parametrize("decouple_visual", [True, False])
def test_decouple_visual_survives_a_checkpoint(tmp_path, target, decouple_visual):
    draft = MSDDraftModel(config_from_dict(RELEASED_CONFIG), decouple_visual=decouple_visual)
    saved = json.loads((save_draft(draft, tmp_path) / "config.json").read_text())
    assert saved.get("decouple_visual", "absent") == ("absent" if decouple_visual else False)
    assert load_draft(tmp_path, target=target).decouple_visual is decouple_visual


def test_released_layout_loads_and_runs(tmp_path, target):
    state = released_state()
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older checkpoints carry it
    folder = write_released(tmp_path / "msd", state)
    draft = load_draft(folder, target=target)
    for key, value in released_state().items():
        torch.testing.assert_close(draft.state_dict()[key], value)
    hidden = draft(torch.randn(1, 3, HIDDEN), torch.arange(3)[None])
    assert draft.compute_logits(hidden).shape == (1, 3, VOCAB)
    assert draft.lm_head is target.get_output_embeddings()


def test_eagle_layout_without_embeddings_takes_the_targets(tmp_path, target):
    config = {**RELEASED_CONFIG, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    folder = write_released(tmp_path / "eagle", released_state(with_embeddings=False), config)
    draft = load_draft(folder, target=target)
    assert draft.embed_tokens is target.get_input_embeddings()
    with pytest.raises(ValueError, match="embed_tokens"):
        load_draft(folder)  # no target to take them from


def test_save_load_round_trip_is_exact(tmp_path, target):
    original = load_draft(write_released(tmp_path / "src", released_state(seed=3)), target=target)
    saved = save_draft(original, tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["num_hidden_layers"] == 1
    reloaded = load_draft(saved, target=target)
    assert original.state_dict().keys() == reloaded.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    inputs, positions = torch.randn(1, 4, HIDDEN), torch.arange(4)[None]
    assert torch.equal(original(inputs, positions), reloaded(inputs, positions))


@pytest.mark.parametrize("key", [LAYER_KEYS[0], "fc.bias"])
def test_missing_key_is_an_error(tmp_path, key):
    state = released_state()
    del state[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_draft(write_released(tmp_path / "bad", state))


def test_unexpected_key_is_an_error(tmp_path):
    state = {**released_state(), "layers.0.input_layernorm.weight": torch.ones(HIDDEN)}
    with pytest.raises(ValueError, match="input_layernorm"):
        load_draft(write_released(tmp_path / "bad", state))


def test_width_mismatch_with_target_is_an_error(tmp_path, target):
    wide = {**RELEASED_CONFIG, "hidden_size": 2 * HIDDEN}
    with pytest.raises(ValueError, match="width"):
        load_draft(write_released(tmp_path / "wide", released_state(), wide), target=target)


def test_wrong_weight_shape_is_an_error(tmp_path):
    state = {**released_state(), "fc.bias": torch.zeros(HIDDEN + 1)}
    with pytest.raises(ValueError, match="fc.bias"):
        load_draft(write_released(tmp_path / "shape", state))
