"""EAGLE-3-style drafts: SpecForge's layout loads (written here from the documented keys, not by
msd's saver), decoding stays lossless with full and reduced vocabularies, the d2t / t2d maps
round-trip, a target id outside the draft vocabulary is never proposed, the engine's features
are the target's hidden states entering the chosen layers, and bad checkpoints are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_engine import make_prompt
from transformers import GenerationConfig

import msd
from msd.draft_checkpoint import save_draft
from msd.sampling import logits_warpers
from msd.targets import adapter_for
from msd.testing import random_eagle3_draft

from oracle import assert_matches_distribution, assert_same_greedy, exact_two_token_distribution, record_proposals
from tiny_models import OracleProposals, qwen_inputs, tiny_llava, tiny_qwen2_5_vl

MAX_NEW = 16
LAYERS = 8  # EAGLE-3's default feature layers of 8 layers: the states entering layers 2, 4 and 5
DRAFT_VOCAB = 48


@pytest.fixture(scope="module")
def saved_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-targets")
    return {
        "llava": tiny_llava(root / "llava", seed=1, layers=LAYERS),
        "qwen2.5-vl": tiny_qwen2_5_vl(root / "qwen2.5-vl", seed=5, layers=LAYERS),
    }


def prompt_for(target, seed: int = 0) -> dict:
    if "Qwen" in type(target).__name__:
        return qwen_inputs(target, [[1, 5, 6], [7, 8, 9]], [(4, 6)], seed=seed)
    return make_prompt(target, 1, seed=seed)


def write_specforge_draft(folder, target, draft_vocab: int | None = DRAFT_VOCAB, drop: str | None = None,
                          wrong_shape: str | None = None, seed: int = 0):
    """An EAGLE-3 draft as SpecForge saves it, from EAGLE3_LAYOUT.md's table: config.json with
    architectures LlamaForCausalLMEagle3, weights midlayer.* / fc / norm / lm_head / d2t / t2d
    in model.safetensors (bfloat16 weights), no embed_tokens (SGLang drops them)."""
    text = target.config.get_text_config()
    hidden, heads, kv_heads, inter, vocab = (text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
                                             text.intermediate_size, text.vocab_size)
    head_dim = hidden // heads
    vd = draft_vocab or vocab
    gen = torch.Generator().manual_seed(seed)
    shapes = {"midlayer.input_layernorm.weight": (hidden,), "midlayer.hidden_norm.weight": (hidden,),
              "midlayer.post_attention_layernorm.weight": (hidden,),
              "midlayer.self_attn.q_proj.weight": (heads * head_dim, 2 * hidden),
              "midlayer.self_attn.k_proj.weight": (kv_heads * head_dim, 2 * hidden),
              "midlayer.self_attn.v_proj.weight": (kv_heads * head_dim, 2 * hidden),
              "midlayer.self_attn.o_proj.weight": (hidden, heads * head_dim),
              "midlayer.mlp.gate_proj.weight": (inter, hidden), "midlayer.mlp.up_proj.weight": (inter, hidden),
              "midlayer.mlp.down_proj.weight": (hidden, inter), "fc.weight": (hidden, 3 * hidden),
              "norm.weight": (hidden,), "lm_head.weight": (vd, hidden)}
    if wrong_shape:
        shapes[wrong_shape] = (shapes[wrong_shape][0] + 1, *shapes[wrong_shape][1:])
    state = {key: (torch.randn(shape, generator=gen) * hidden ** -0.5 if "norm" not in key
                   else 1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
             for key, shape in shapes.items()}
    # SpecForge's map: the Vd most frequent ids, sorted; d2t the offset, t2d the membership.
    used = torch.randperm(vocab, generator=gen)[:vd].sort().values
    state["d2t"] = used - torch.arange(vd)
    state["t2d"] = torch.zeros(vocab, dtype=torch.bool)
    state["t2d"][used] = True
    if drop:
        del state[drop]
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    if draft_vocab is not None:
        config["draft_vocab_size"] = draft_vocab
    if "Qwen" in type(target).__name__:
        config |= {"target_model_type": "qwen2_5_vl", "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, used


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
@pytest.mark.parametrize("draft_vocab", [DRAFT_VOCAB, None])
def test_a_specforge_draft_loads_and_is_lossless(targets, tmp_path, family, draft_vocab, monkeypatch):
    target = targets[family]
    target.save_pretrained(tmp_path / "target")
    folder, used = write_specforge_draft(tmp_path / "draft", target, draft_vocab)
    engine = msd.SpeculativeLLaVA.from_pretrained(tmp_path / "target", folder, top_k=4, depth=3, total_tokens=12,
                                                  dtype=target.dtype, device=target.device)
    assert isinstance(engine.draft, msd.Eagle3DraftModel)
    assert engine.feature_layers == (2, LAYERS // 2, LAYERS - 3)
    proposed = record_proposals(monkeypatch)
    inputs = prompt_for(engine.target)
    expected = engine.target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    assert_same_greedy(engine.generate(**inputs, max_new_tokens=MAX_NEW), expected, engine.target, inputs)
    if draft_vocab is not None:  # a target id outside the draft vocabulary is never proposed
        assert all(bool(torch.isin(tokens.cpu(), used).all()) for tokens in proposed)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_the_vocabulary_map_carries_accepted_proposals(targets, family):
    """With proposals planted in draft ids (the target's continuation, through to_draft), a
    wrong d2t mapping would reject them: a perfect controlled draft must accept whole paths."""
    target = targets[family]
    inputs = prompt_for(target, seed=1)
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    vocab = target.config.get_text_config().vocab_size
    # A reduced vocabulary holding the continuation's ids and others, not in a prefix order.
    kept = set(expected[0, inputs["input_ids"].shape[1]:].tolist()) | set(range(vocab // 2, vocab - 4))
    kept = torch.tensor(sorted(kept))
    draft = random_eagle3_draft(target, draft_vocab_size=len(kept), seed=2)
    draft.d2t.copy_(kept - torch.arange(len(kept)))
    draft.t2d.zero_()
    draft.t2d[kept.to(draft.t2d.device)] = True
    proposer = OracleProposals(expected[0].tolist(), corruption=0.0)
    engine = msd.SpeculativeLLaVA(target, draft, top_k=3, depth=3, total_tokens=10, proposer=proposer)
    assert_same_greedy(engine.generate(**inputs, max_new_tokens=MAX_NEW), expected, target, inputs)
    assert max(engine.last_stats.accepted) == 4  # depth 3: paths of 4 draft tokens taken whole


def test_d2t_and_t2d_round_trip(targets, tmp_path):
    target = targets["llava"]
    draft = random_eagle3_draft(target, draft_vocab_size=DRAFT_VOCAB, seed=3)
    vocab = draft.config.vocab_size
    draft_ids = torch.arange(DRAFT_VOCAB)
    target_ids = draft.to_target(draft_ids)
    assert torch.equal(draft.to_draft(target_ids), draft_ids)
    assert torch.equal(draft.t2d.nonzero().flatten(), target_ids)
    outside = torch.tensor(sorted(set(range(vocab)) - set(target_ids.tolist())))
    assert bool((draft.to_draft(outside) == -1).all())
    folder = save_draft(draft, tmp_path / "draft", num_target_layers=LAYERS)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, LAYERS // 2 - 1, LAYERS - 4]
    loaded = msd.load_draft(folder, target)
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.feature_layers(LAYERS) == draft.feature_layers(LAYERS)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_the_features_are_the_targets_states_entering_the_layers(targets, family):
    """At the prefill, the features the engine gives an EAGLE-3 draft are Hugging Face's own
    output_hidden_states at 2, N//2, N-3 (the raw residual stream), concatenated in that order."""
    target = targets[family]
    inputs = prompt_for(target, seed=4)
    adapter = adapter_for(target)
    layers = (2, LAYERS // 2, LAYERS - 3)
    with torch.no_grad():
        states = target(**inputs, output_hidden_states=True).hidden_states
        expected = torch.cat([states[layer] for layer in layers], -1)[0]
        model_inputs = {key: value for key, value in inputs.items() if key in adapter.input_names}
        prompt = adapter.prompt_rows(inputs["input_ids"], None, **model_inputs)[0]
        cache = adapter.new_cache(1, inputs["input_ids"].shape[1] + 8)
        _, features = adapter.decoder.run(prompt.embeds, prompt.position_ids, cache, capture=layers)
    tolerance = 1e-4 if target.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(features[0].float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_sampling_with_a_reduced_vocabulary_keeps_the_targets_distribution(targets):
    target = targets["llava"]
    inputs = prompt_for(target, seed=5)
    options = dict(temperature=0.9, top_k=5)
    exact = exact_two_token_distribution(target, inputs, logits_warpers(GenerationConfig(do_sample=True, **options)))
    greedy = target.generate(**inputs, do_sample=False, max_new_tokens=4)[0].tolist()
    draft = random_eagle3_draft(target, draft_vocab_size=DRAFT_VOCAB, seed=6)
    engine = msd.SpeculativeLLaVA(target, draft, top_k=4, depth=3, total_tokens=12,
                                  proposer=OracleProposals(greedy, corruption=0.3))
    prompt_len = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    samples = [tuple(engine.generate(**inputs, do_sample=True, max_new_tokens=2, eos_token_id=None, **options)
                     [0, prompt_len:].tolist()) for _ in range(600)]
    assert_matches_distribution(samples, exact)


@pytest.mark.parametrize("change,message", [
    (dict(drop="d2t"), "no d2t"),
    (dict(wrong_shape="lm_head.weight"), "lm_head.weight has shape"),
    (dict(drop="midlayer.hidden_norm.weight"), r"missing keys \['midlayer.hidden_norm.weight'\]"),
])
def test_bad_specforge_checkpoints_are_clear_errors(targets, tmp_path, change, message):
    target = targets["llava"]
    folder, _ = write_specforge_draft(tmp_path / "draft", target, **change)
    with pytest.raises(ValueError, match=message):
        msd.load_draft(folder, target)


def test_a_draft_of_another_width_is_a_clear_error(targets, tmp_path):
    folder, _ = write_specforge_draft(tmp_path / "draft", targets["llava"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "target_hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(ValueError, match="target_hidden_size"):
        msd.load_draft(folder, targets["llava"])
