"""Every supported target family against Hugging Face: msd's decoder against the target's own
forward (logits at the prefill and at decode steps, which pins down positions and rope deltas),
and SpeculativeLLaVA against the target's own ``generate`` for Qwen2-VL and Qwen2.5-VL (M-RoPE:
images of different grids, videos, prompts ending on visual tokens), next to LLaVA.

Like tests/test_engine.py, every test runs on the CPU in float32 and, where a GPU exists, on
CUDA in float32 and bfloat16 (the near-tie rule of tests/oracle.py).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import msd
from msd.draft_checkpoint import read_state_dict, save_draft
from msd.sampling import logits_warpers
from msd.targets import adapter_for

from oracle import assert_matches_distribution, assert_same_greedy, exact_two_token_distribution
from tiny_models import (
    QWEN_IMAGE,
    OracleProposals,
    qwen_inputs,
    random_draft,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

MAX_NEW = 20
QWEN = ["qwen2-vl", "qwen2.5-vl"]
TREES = {"default": (10, 5, 60), "small": (4, 3, 12)}

# Qwen prompts: (text pieces, image grids (height, width in patches), video grid (t, h, w), end on visual).
WORDS = list(range(3, 140))
PROMPTS = {
    "text": ([[1, 5, 6, 7, 8]], [], None, False),
    "one-image": ([[1, 5, 6], [7, 8, 9]], [(4, 6)], None, False),
    "two-images": ([[1, 5], [7, 8, 9, 10]], [(4, 6), (6, 2)], None, False),
    "video": ([[1, 5], [], [11, 12]], [], (3, 4, 4), False),
    "image-and-video": ([[1, 5], [7, 8], [11, 12, 13]], [(2, 4)], (2, 2, 4), False),
    "long": ([[1] + WORDS[:120], WORDS[40:80]], [(4, 4)], None, False),
    "ends-on-image": ([[1, 5, 6]], [(4, 6)], None, True),
    "ends-on-video": ([[1, 5], [7]], [(2, 2)], (3, 4, 4), True),
}


@pytest.fixture(scope="module")
def saved_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "llava": tiny_llava(root / "llava", seed=1, hidden=128, heads=2, kv_heads=1),
        "llava-next": tiny_llava_next(root / "llava-next", seed=3, hidden=128, heads=2, kv_heads=1),
        "qwen2-vl": tiny_qwen2_vl(root / "qwen2-vl", seed=4),
        "qwen2.5-vl": tiny_qwen2_5_vl(root / "qwen2.5-vl", seed=5, hidden=128, heads=2, kv_heads=1),
        "llava-onevision": tiny_llava_onevision(root / "llava-onevision", seed=6),
    }


def prompt_for(target, name: str, seed: int = 0) -> dict:
    """A named prompt for a Qwen target; for a LLaVA one, the LLaVA prompt of test_engine."""
    if "Qwen" in type(target).__name__:
        text, images, video, end_on_visual = PROMPTS[name]
        return qwen_inputs(target, text, images, video, seed=seed, end_on_visual=end_on_visual)
    from test_engine import make_prompt

    num_images, video_frames = {"text": (0, 0), "one-image": (1, 0), "two-images": (2, 0),
                                "image-and-video": (1, 3), "video": (0, 4)}[name]
    return make_prompt(target, num_images, seed=seed, video_frames=video_frames)


def hf_greedy(target, inputs, max_new_tokens=MAX_NEW, **kwargs) -> torch.Tensor:
    return target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)


def engine_for(target, tree="small", proposer=None, draft=None) -> msd.SpeculativeLLaVA:
    top_k, depth, total = TREES[tree]
    return msd.SpeculativeLLaVA(target, draft or random_draft(target), top_k=top_k, depth=depth,
                                total_tokens=total, proposer=proposer)


# --------------------------------------------------------------------------- the decoder
DECODER_CASES = [("llava", "two-images"), ("llava-next", "one-image"), ("llava", "text"),
                 ("llava-onevision", "image-and-video")]
DECODER_CASES += [(family, prompt) for family in QWEN for prompt in PROMPTS]


@pytest.mark.parametrize("family,prompt", DECODER_CASES)
def test_decoder_logits_equal_the_targets_forward(targets, family, prompt):
    """Prefill: msd's decoder over the captured prompt inputs gives the logits of the target's
    forward at every position. Decode: after it, the first three generated tokens fed one by one
    at the adapter's positions give the logits the target's own generate computed for them."""
    target = targets[family]
    inputs = prompt_for(target, prompt)
    adapter = adapter_for(target)
    length = inputs["input_ids"].shape[1]
    model_inputs = {key: value for key, value in inputs.items() if key in adapter.input_names}
    with torch.no_grad():
        expected_prefill = target(**inputs).logits[0].float()
        generated = hf_greedy(target, inputs, max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
        prompt_inputs = adapter.prompt_rows(inputs["input_ids"], inputs.get("attention_mask"), **model_inputs)[0]
        cache = adapter.new_cache(1, length + 4)
        hidden = adapter.decoder(prompt_inputs.embeds, prompt_inputs.position_ids, cache)
        cache.advance(length)
        got = [adapter.lm_head(hidden)[0].float()]
        expected = [expected_prefill]
        for step in range(3):
            token = generated.sequences[:, length + step:length + step + 1]
            plain = torch.full((1, 1), length + step, device=target.device)
            hidden = adapter.decoder(adapter.embed_tokens(token), adapter.positions(plain, prompt_inputs.rope_delta),
                                     cache)
            cache.advance(1)
            got.append(adapter.lm_head(hidden)[0].float())
            expected.append(generated.logits[step + 1].float())
    tolerance = 1e-4 if target.dtype == torch.float32 else 5e-2 * float(expected_prefill.abs().max())
    for step, (ours, theirs) in enumerate(zip(got, expected)):
        difference = float((ours - theirs).abs().max())
        assert difference <= tolerance, f"{'prefill' if step == 0 else f'decode step {step}'}: {difference}"


# --------------------------------------------------------------------------- greedy
GREEDY_CASES = list(itertools.product(QWEN, PROMPTS, ["small"], ["random", 0.0, 0.4]))
GREEDY_CASES += [(family, prompt, "default", 0.2) for family in QWEN for prompt in ("two-images", "video")]


@pytest.mark.parametrize("family,prompt,tree,draft", GREEDY_CASES)
def test_qwen_greedy_equals_target_generate(targets, family, prompt, tree, draft):
    target = targets[family]
    inputs = prompt_for(target, prompt, seed=1)
    expected = hf_greedy(target, inputs)
    hook = None if draft == "random" else OracleProposals(expected[0].tolist(), corruption=draft)
    engine = engine_for(target, tree, hook)
    got = engine.generate(**inputs, max_new_tokens=MAX_NEW)
    if assert_same_greedy(got, expected, target, inputs) and draft == 0.0:
        assert max(engine.last_stats.accepted) == TREES[tree][1] + 1  # a perfect draft takes whole paths


@pytest.mark.parametrize("prompt,tree,draft", [("two-images", "small", 0.3), ("image-and-video", "small", "random"),
                                               ("video", "default", 0.0)])
def test_llava_onevision_greedy_equals_target_generate(targets, prompt, tree, draft):
    """LLaVA-OneVision (Qwen2 text, 1-D RoPE; images and videos) takes LLaVA's adapter as it is."""
    target = targets["llava-onevision"]
    inputs = prompt_for(target, prompt, seed=2)
    expected = hf_greedy(target, inputs)
    hook = None if draft == "random" else OracleProposals(expected[0].tolist(), corruption=draft)
    assert_same_greedy(engine_for(target, tree, hook).generate(**inputs, max_new_tokens=MAX_NEW), expected,
                       target, inputs)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_eos_inside_an_accepted_path_stops_there(targets, family):
    target = targets[family]
    inputs = prompt_for(target, "image-and-video")
    prompt_len = inputs["input_ids"].shape[1]
    free_run = hf_greedy(target, inputs, eos_token_id=None)[0].tolist()
    eos = free_run[prompt_len + 5]
    expected = hf_greedy(target, inputs, eos_token_id=eos)
    engine = engine_for(target, "small", OracleProposals(free_run, corruption=0.0))
    got = engine.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=eos)
    if assert_same_greedy(got, expected, target, inputs):
        assert got[0, -1].item() == eos and eos not in got[0, prompt_len:-1].tolist()


def test_qwen_sampling_matches_the_target_distribution(targets):
    """The first two sampled tokens (the second from tree verification) follow the target's
    own sampling distribution, M-RoPE positions and all."""
    target = targets["qwen2-vl"]
    inputs = prompt_for(target, "one-image")
    options = dict(temperature=0.8, top_k=5)
    exact = exact_two_token_distribution(target, inputs, logits_warpers(GenerationConfig(do_sample=True, **options)))
    prompt_len = inputs["input_ids"].shape[1]
    greedy = hf_greedy(target, inputs, max_new_tokens=4)[0].tolist()
    engine = engine_for(target, "small", OracleProposals(greedy, corruption=0.3))
    torch.manual_seed(0)
    samples = [tuple(engine.generate(**inputs, do_sample=True, max_new_tokens=2, eos_token_id=None, **options)
                     [0, prompt_len:].tolist()) for _ in range(600)]
    assert_matches_distribution(samples, exact)


# --------------------------------------------------------------------------- Qwen drafts
def write_released_qwen_draft(folder, target, drop: str | None = None, wrong_shape: str | None = None):
    """A draft as the released MSD Qwen2-VL code writes it: ``torch.save`` of the EAGLE model's
    state dict (a Qwen2 decoder layer: q/k/v with biases, o without; bfloat16) and a Qwen2-VL
    ``config.json`` with one hidden layer and the target's ``mrope_section``."""
    text = target.config.get_text_config()
    hidden, inter, heads, kv_heads = (text.hidden_size, text.intermediate_size, text.num_attention_heads,
                                      text.num_key_value_heads)
    kv = kv_heads * hidden // heads
    shapes = {"fc.weight": (hidden, 2 * hidden), "fc.bias": (hidden,),
              "layers.0.self_attn.q_proj.weight": (hidden, hidden), "layers.0.self_attn.q_proj.bias": (hidden,),
              "layers.0.self_attn.k_proj.weight": (kv, hidden), "layers.0.self_attn.k_proj.bias": (kv,),
              "layers.0.self_attn.v_proj.weight": (kv, hidden), "layers.0.self_attn.v_proj.bias": (kv,),
              "layers.0.self_attn.o_proj.weight": (hidden, hidden), "layers.0.mlp.gate_proj.weight": (inter, hidden),
              "layers.0.mlp.up_proj.weight": (inter, hidden), "layers.0.mlp.down_proj.weight": (hidden, inter),
              "layers.0.post_attention_layernorm.weight": (hidden,)}
    if wrong_shape:
        shapes[wrong_shape] = (shapes[wrong_shape][0] + 1, *shapes[wrong_shape][1:])
    gen = torch.Generator().manual_seed(3)
    state = {key: torch.randn(shape, generator=gen) * hidden ** -0.5 for key, shape in shapes.items() if key != drop}
    state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().cpu()
    folder.mkdir(parents=True)
    torch.save({key: value.to(torch.bfloat16) for key, value in state.items()}, folder / "pytorch_model.bin")
    section = text.rope_parameters["mrope_section"] if hasattr(text, "rope_parameters") else (
        text.rope_scaling["mrope_section"])
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
              "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_hidden_layers": 1, "vocab_size": text.vocab_size,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "rope_scaling": {"type": "mrope", "mrope_section": section}, "hidden_act": "silu",
              "image_token_id": QWEN_IMAGE, "torch_dtype": "bfloat16", "vision_config": {"depth": 32}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_released_qwen_draft_loads_and_is_lossless(targets, tmp_path):
    target = targets["qwen2-vl"]
    target.save_pretrained(tmp_path / "target")
    folder = write_released_qwen_draft(tmp_path / "draft", target)
    engine = msd.SpeculativeLLaVA.from_pretrained(tmp_path / "target", folder, top_k=4, depth=3, total_tokens=12,
                                                  dtype=target.dtype, device=target.device)
    attention = engine.draft.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    released = torch.load(folder / "pytorch_model.bin", weights_only=True)["layers.0.self_attn.k_proj.bias"]
    torch.testing.assert_close(attention.k_proj.bias.cpu().to(torch.bfloat16), released)
    for prompt in ("two-images", "video"):
        inputs = prompt_for(engine.target, prompt)
        assert_same_greedy(engine.generate(**inputs, max_new_tokens=MAX_NEW), hf_greedy(engine.target, inputs),
                           engine.target, inputs)


@pytest.mark.parametrize("drop,wrong_shape,message", [
    ("layers.0.self_attn.q_proj.bias", None, r"missing keys \['layers.0.self_attn.q_proj.bias'\]"),
    (None, "layers.0.self_attn.v_proj.bias", "v_proj.bias has shape"),
])
def test_released_qwen_draft_with_wrong_weights_is_a_clear_error(targets, tmp_path, drop, wrong_shape, message):
    target = targets["qwen2-vl"]
    folder = write_released_qwen_draft(tmp_path / "draft", target, drop=drop, wrong_shape=wrong_shape)
    with pytest.raises(ValueError, match=message):
        msd.load_draft(folder, target)


def test_qwen_drafts_are_saved_in_the_released_layout(targets, tmp_path):
    target = targets["qwen2.5-vl"]
    draft = random_draft(target, seed=2)
    folder = save_draft(draft, tmp_path / "draft")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["rope_scaling"]["mrope_section"] == draft.config.mrope_section
    assert {f"layers.0.self_attn.{name}_proj.bias" for name in "qkv"} <= read_state_dict(folder).keys()
    loaded = msd.load_draft(folder, target)
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# --------------------------------------------------------------------------- other families
def test_a_target_of_another_family_is_a_clear_error(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)
    text_only = LlamaForCausalLM(config)
    supported = "llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl"
    with pytest.raises(ValueError, match=f"not a supported family.*{supported}"):
        msd.SpeculativeLLaVA(text_only, random_draft(tiny_llava(tmp_path / "llava")))
