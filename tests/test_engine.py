"""SpeculativeLLaVA against Hugging Face's own generate: lossless greedy decoding, the
sampling distribution, stopping, streaming, checkpoints and bad input.

Every test runs on the CPU in float32, and on CUDA (where a GPU exists) in float32 and in
bfloat16. On CUDA the "llava-gqa" and "llava-next" targets have head_dim 64, so msd's CUDA
tree attention kernel serves them; "llava" (head_dim 16) takes the SDPA composition.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import msd
from msd.draft_checkpoint import save_draft

from oracle import assert_matches_distribution, assert_same_greedy, exact_two_token_distribution, record_proposals
from tiny_models import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    ONEVISION_VIDEO,
    VOCAB,
    OracleProposals,
    image_token_counts,
    onevision_video_tokens,
    random_draft,
    tiny_llava,
    tiny_llava_next,
)

MAX_NEW = 24
TREES = {  # (top_k, depth, total_tokens)
    "default": (10, 5, 60),
    "small": (4, 3, 12),
    "chain": (1, 4, 6),
    "star": (6, 1, 7),
    "narrow": (2, 3, 9),
}


@pytest.fixture(scope="module")
def saved_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {
        "llava": tiny_llava(root / "llava", seed=1),
        "llava-gqa": tiny_llava(root / "llava-gqa", seed=2, hidden=128, heads=2, kv_heads=1),
        "llava-next": tiny_llava_next(root / "llava-next", seed=3, hidden=128, heads=2, kv_heads=1),
    }


def make_prompt(target, num_images: int, seed: int = 0, video_frames: int = 0) -> dict:
    """input_ids with ``num_images`` images (and, for LLaVA-OneVision, a video of
    ``video_frames`` frames), and the matching pixel_values / image_sizes / pixel_values_videos,
    on the target's device (pixel values in its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=gen).tolist()  # noqa: E731
    inputs: dict = {}
    counts: list[int] = []
    if num_images:
        if "Next" in type(target).__name__ or "Onevision" in type(target).__name__:  # any-resolution tiles
            inputs["pixel_values"] = torch.randn(num_images, 5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
            inputs["image_sizes"] = torch.tensor([[30, 20], [28, 31]][:num_images])
        else:
            inputs["pixel_values"] = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        counts = image_token_counts(target, inputs["pixel_values"], inputs.get("image_sizes"))
    ids = [1] + words(3)
    for count in counts:
        ids += [IMAGE_TOKEN] * count + words(2)
    if video_frames:
        inputs["pixel_values_videos"] = torch.randn(1, video_frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        ids += [ONEVISION_VIDEO] * onevision_video_tokens(video_frames) + words(2)
    inputs["input_ids"] = torch.tensor([ids + words(2)])
    return {key: value.to(target.device, dtype=target.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()}


def hf_greedy(target, inputs, **kwargs) -> torch.Tensor:
    return target.generate(**inputs, do_sample=False, max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW),
                           **kwargs)


def engine_for(target, tree="small", proposer=None) -> msd.SpeculativeLLaVA:
    top_k, depth, total = TREES[tree]
    return msd.SpeculativeLLaVA(target, random_draft(target), top_k=top_k, depth=depth, total_tokens=total,
                                proposer=proposer)


# 3 targets x 3 prompts x 2 trees x 3 drafts = 54 greedy cases.
GREEDY_CASES = list(itertools.product(
    ["llava", "llava-gqa", "llava-next"], [0, 1, 2], ["small", "chain"], ["random", 0.0, 0.5]))
GREEDY_CASES += [("llava-gqa", 1, "default", 0.2), ("llava", 2, "star", 0.0), ("llava-next", 1, "narrow", 0.3)]


@pytest.mark.parametrize("name,num_images,tree,draft", GREEDY_CASES)
def test_greedy_equals_target_generate(targets, name, num_images, tree, draft):
    target = targets[name]
    inputs = make_prompt(target, num_images, seed=num_images)
    expected = hf_greedy(target, inputs)
    hook = None if draft == "random" else OracleProposals(expected[0].tolist(), corruption=draft)
    engine = engine_for(target, tree, hook)
    got = engine.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    if not assert_same_greedy(got, expected, target, inputs):
        return
    stats = engine.last_stats
    assert stats.new_tokens == expected.shape[1] - inputs["input_ids"].shape[1]
    if draft == 0.0 and tree == "chain":  # a perfect draft: every step takes the whole path
        assert max(stats.accepted) == TREES[tree][1] + 1


def test_every_acceptance_length_occurs(targets):
    """Across corruption levels, steps accept 0, 1, ..., depth + 1 draft tokens, and the
    output stays exact throughout."""
    target = targets["llava"]
    top_k, depth, _ = TREES["small"]
    seen: set[int] = set()
    for seed, corruption in enumerate([0.0, 0.15, 0.3, 0.5, 0.8]):
        inputs = make_prompt(target, 1, seed=seed)
        expected = hf_greedy(target, inputs, max_new_tokens=40)
        engine = engine_for(target, "small", OracleProposals(expected[0].tolist(), corruption, seed))
        assert_same_greedy(engine.generate(**inputs, max_new_tokens=40), expected, target, inputs)
        seen.update(engine.last_stats.accepted)
    assert seen == set(range(depth + 2))


def test_default_tree_with_a_good_draft_reaches_a_high_tau(targets):
    target = targets["llava-gqa"]
    inputs = make_prompt(target, 1)
    expected = hf_greedy(target, inputs, max_new_tokens=40)
    engine = engine_for(target, "default", OracleProposals(expected[0].tolist(), corruption=0.0))
    assert assert_same_greedy(engine.generate(**inputs, max_new_tokens=40), expected, target, inputs)
    assert engine.last_stats.tau > 5.0  # depth 5: up to 6 accepted + 1 bonus per step


# --------------------------------------------------------------------------- stopping
def test_eos_inside_an_accepted_path_stops_there(targets):
    target = targets["llava"]
    inputs = make_prompt(target, 1)
    prompt_len = inputs["input_ids"].shape[1]
    free_run = hf_greedy(target, inputs, eos_token_id=None)[0].tolist()
    eos = free_run[prompt_len + 4]  # emitted mid-way through a long accepted path
    expected = hf_greedy(target, inputs, eos_token_id=eos)
    engine = engine_for(target, "chain", OracleProposals(free_run, corruption=0.0))
    got = engine.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=eos)
    if assert_same_greedy(got, expected, target, inputs):
        assert got[0, -1].item() == eos and eos not in got[0, prompt_len:-1].tolist()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 9, 13])
def test_max_new_tokens_reached_mid_path(targets, max_new_tokens):
    target = targets["llava-gqa"]
    inputs = make_prompt(target, 0)
    expected = hf_greedy(target, inputs, max_new_tokens=max_new_tokens, eos_token_id=None)
    engine = engine_for(target, "chain", OracleProposals(expected[0].tolist() + [0] * 8, corruption=0.0))
    got = engine.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=None)
    assert got.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens
    assert_same_greedy(got, expected, target, inputs)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token id i <-> the word "w{i}"; words decode space-separated. ("abcdef" is there
    because StopStringCriteria tokenizes it to learn how tokens join.)"""
    vocab = {f"w{i}": i for i in range(VOCAB)} | {"abcdef": VOCAB}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0")


def test_stop_strings(targets):
    target = targets["llava"]
    tokenizer = word_tokenizer()
    inputs = make_prompt(target, 1)
    prompt_len = inputs["input_ids"].shape[1]
    free_run = hf_greedy(target, inputs, eos_token_id=None)[0].tolist()
    stop = f"w{free_run[prompt_len + 5]}"
    expected = hf_greedy(target, inputs, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)
    assert expected.shape[1] < len(free_run)  # the stop string did cut the run
    engine = engine_for(target, "small", OracleProposals(free_run, corruption=0.0))
    got = engine.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=None, stop_strings=[stop],
                          tokenizer=tokenizer)
    assert_same_greedy(got, expected, target, inputs)


class RecordingStreamer:
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_exactly_the_returned_tokens(targets):
    target = targets["llava-next"]
    inputs = make_prompt(target, 1)
    expected = hf_greedy(target, inputs)
    streamer = RecordingStreamer()
    engine = engine_for(target, "small", OracleProposals(expected[0].tolist(), corruption=0.3))
    got = engine.generate(**inputs, max_new_tokens=MAX_NEW, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist()  # the prompt first, as generate does
    assert sum(streamer.chunks[1:], []) == got[0, inputs["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("options", [dict(temperature=0.6, top_k=4), dict(temperature=1.3, top_k=6, top_p=0.7)])
def test_sampling_matches_the_target_distribution(targets, options):
    """The first two tokens (the second one comes from tree verification) follow the
    target's own sampling distribution: chi-square p > 1e-3 over 600 runs, and total
    variation < 0.1."""
    from transformers import GenerationConfig

    from msd.sampling import logits_warpers

    target = targets["llava"]
    inputs = make_prompt(target, 1)
    config = GenerationConfig(do_sample=True, **options)
    exact = exact_two_token_distribution(target, inputs, logits_warpers(config))
    prompt_len = inputs["input_ids"].shape[1]
    greedy = hf_greedy(target, inputs, max_new_tokens=4)[0].tolist()
    engine = engine_for(target, "small", OracleProposals(greedy, corruption=0.3))
    torch.manual_seed(0)
    samples = [tuple(engine.generate(**inputs, do_sample=True, max_new_tokens=2, eos_token_id=None, **options)
                     [0, prompt_len:].tolist()) for _ in range(600)]
    assert_matches_distribution(samples, exact)


# --------------------------------------------------------------------------- checkpoints
def test_released_checkpoint_loads_through_from_pretrained(targets, tmp_path):
    target = targets["llava-gqa"]
    folder = save_draft(random_draft(target, seed=5), tmp_path / "draft")
    target.save_pretrained(tmp_path / "target")
    engine = msd.SpeculativeLLaVA.from_pretrained(tmp_path / "target", folder, top_k=4, depth=3, total_tokens=12,
                                                  dtype=target.dtype, device=target.device)
    inputs = make_prompt(target, 1)
    assert_same_greedy(engine.generate(**inputs, max_new_tokens=12), hf_greedy(target, inputs, max_new_tokens=12),
                       target, inputs)


# ------------------------------------------------------ released drafts on llava-hf targets
# The released LLaVA-1.5 drafts have the 32000 ids of liuhaotian/llava-v1.5; llava-hf targets have
# 32064 (the image token is 32000, then padding). Scaled down: a draft of 120 ids on the
# 128-id tiny target, whose image token is 127; prompts hold text ids 120..126 too.
PREFIX_VOCAB = 120


def write_released_draft(folder, target, vocab_size: int = PREFIX_VOCAB, hidden: int | None = None):
    """A draft checkpoint as the released MSD training script writes it: ``torch.save`` of the
    EAGLE model's state dict (bfloat16, with the rotary buffer older transformers kept) to
    pytorch_model.bin, and its config.json (flat Llama fields, model_type llava)."""
    text = target.config.text_config
    hidden = hidden or text.hidden_size
    gen = torch.Generator().manual_seed(11)
    inter, head_dim = text.intermediate_size, hidden // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    shapes = {"fc.weight": (hidden, 2 * hidden), "fc.bias": (hidden,),
              "layers.0.self_attn.q_proj.weight": (hidden, hidden), "layers.0.self_attn.k_proj.weight": (kv, hidden),
              "layers.0.self_attn.v_proj.weight": (kv, hidden), "layers.0.self_attn.o_proj.weight": (hidden, hidden),
              "layers.0.mlp.gate_proj.weight": (inter, hidden), "layers.0.mlp.up_proj.weight": (inter, hidden),
              "layers.0.mlp.down_proj.weight": (hidden, inter)}
    state = {key: torch.randn(shape, generator=gen) * hidden ** -0.5 for key, shape in shapes.items()}
    state["layers.0.post_attention_layernorm.weight"] = torch.ones(hidden)
    state["layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    embeddings = target.get_input_embeddings().weight.detach().cpu()
    fits = vocab_size <= len(embeddings) and hidden == text.hidden_size
    state["embed_tokens.weight"] = embeddings[:vocab_size] if fits else torch.randn(vocab_size, hidden, generator=gen)
    folder.mkdir(parents=True)
    torch.save({key: value.to(torch.bfloat16) for key, value in state.items()}, folder / "pytorch_model.bin")
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
              "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": text.num_attention_heads,
              "num_key_value_heads": text.num_key_value_heads, "num_hidden_layers": 1, "vocab_size": vocab_size,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "image_aspect_ratio": "pad", "tie_word_embeddings": False, "use_cache": True}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_released_draft_with_a_prefix_vocabulary_is_lossless(targets, tmp_path, monkeypatch):
    """Loaded through from_pretrained like a user's llava-hf target and released draft: greedy
    output equals the target's own; the draft never proposes an id it has no row for."""
    target = targets["llava-gqa"]
    target.save_pretrained(tmp_path / "target")
    draft_folder = write_released_draft(tmp_path / "draft", target)
    engine = msd.SpeculativeLLaVA.from_pretrained(tmp_path / "target", draft_folder, top_k=6, depth=3,
                                                  total_tokens=16, dtype=target.dtype, device=target.device)
    assert engine.draft.config.vocab_size == PREFIX_VOCAB
    proposed = record_proposals(monkeypatch)
    for num_images, seed in ((2, 0), (1, 3), (0, 5)):
        inputs = make_prompt(engine.target, num_images, seed=seed)
        assert bool((inputs["input_ids"] >= PREFIX_VOCAB).any())  # text ids past the draft's vocabulary
        expected = hf_greedy(engine.target, inputs, max_new_tokens=16)
        assert_same_greedy(engine.generate(**inputs, max_new_tokens=16), expected, engine.target, inputs)
    assert proposed and all(int(tokens.max()) < PREFIX_VOCAB for tokens in proposed)


def test_fuse_inputs_never_looks_up_ids_past_the_draft_vocabulary(targets, tmp_path):
    target = targets["llava"]
    draft = msd.load_draft(write_released_draft(tmp_path / "draft", target), target)
    ids = torch.tensor([[5, PREFIX_VOCAB - 1, PREFIX_VOCAB, IMAGE_TOKEN]], device=target.device)
    features = torch.randn(1, 4, draft.config.hidden_size, device=target.device, dtype=target.dtype)
    visual = torch.randn_like(features)
    fused = draft.fuse_inputs(ids, features, visual, ids == IMAGE_TOKEN)
    zero_embedding = draft.fc(torch.cat([torch.zeros_like(features[:, 2]), features[:, 2]], -1))
    torch.testing.assert_close(fused[:, 2], zero_embedding)
    torch.testing.assert_close(fused[:, 3], visual[:, 3])  # the image id: the visual embedding


@pytest.mark.parametrize("vocab_size,hidden,message", [(VOCAB + 8, None, "larger than the target"),
                                                       (PREFIX_VOCAB, 96, "width")])
def test_released_draft_for_another_target_is_a_clear_error(targets, tmp_path, vocab_size, hidden, message):
    target = targets["llava-gqa"]
    folder = write_released_draft(tmp_path / "draft", target, vocab_size=vocab_size, hidden=hidden)
    with pytest.raises(ValueError, match=message):
        msd.load_draft(folder, target)
    alone = msd.load_draft(folder)  # loads without a target (its own embeddings) ...
    with pytest.raises(ValueError, match=message):  # ... and is refused by the engine
        msd.SpeculativeLLaVA(target, alone.to(device=target.device, dtype=target.dtype))


# --------------------------------------------------------------------------- bad input
def test_unknown_generation_options_are_named(targets):
    target = targets["llava"]
    with pytest.raises(TypeError, match="max_new_token, temprature"):
        engine_for(target).generate(input_ids=torch.full((1, 6), 5, device=target.device), max_new_token=4,
                                    temprature=0.5)


def test_pixel_values_not_matching_image_tokens(targets):
    target = targets["llava"]
    inputs = make_prompt(target, 2)
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(ValueError, match="[Ii]mage"):
        engine_for(target).generate(**inputs, max_new_tokens=4)
    text_only = make_prompt(target, 0)
    with pytest.raises(ValueError, match="pixel_values"):
        engine_for(target).generate(**text_only, pixel_values=inputs["pixel_values"], max_new_tokens=4)
    with_image = make_prompt(target, 1)
    with pytest.raises(ValueError, match="pixel_values"):
        engine_for(target).generate(input_ids=with_image["input_ids"], max_new_tokens=4)


def test_prompt_longer_than_the_cache(targets):
    target = targets["llava"]
    limit = target.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine_for(target).generate(input_ids=torch.full((1, limit - 3), 5, device=target.device), max_new_tokens=8)


def test_inputs_on_another_device(saved_targets):
    target = saved_targets["llava"]  # on the CPU
    inputs = make_prompt(target, 1)
    with pytest.raises(ValueError, match="pixel_values is on meta"):
        engine_for(target).generate(**{**inputs, "pixel_values": inputs["pixel_values"].to("meta")},
                                    max_new_tokens=4)


def test_draft_width_must_match_target(targets):
    wide = random_draft(targets["llava"])
    with pytest.raises(ValueError, match="width"):
        msd.SpeculativeLLaVA(targets["llava"], wide.__class__(
            wide.config.__class__(**{**wide.config.to_dict(), "hidden_size": 128})))


def test_streamer_with_a_batch_is_refused(targets):
    with pytest.raises(ValueError, match="streamer"):
        engine_for(targets["llava"]).generate(input_ids=torch.full((2, 6), 5, device=targets["llava"].device),
                                              max_new_tokens=4, streamer=RecordingStreamer())


def test_right_padding_is_refused(targets):
    target = targets["llava"]
    input_ids = torch.full((2, 6), 5, device=target.device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        engine_for(target).generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4)


@pytest.mark.parametrize("option", [dict(num_beams=2), dict(repetition_penalty=1.2)])
def test_unsupported_generation_options_are_refused(targets, option):
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        engine_for(targets["llava"]).generate(input_ids=torch.full((1, 6), 5, device=targets["llava"].device),
                                              max_new_tokens=4, **option)


@pytest.mark.parametrize("kwargs,name", [(dict(top_k=0), "top_k"), (dict(depth=0), "depth"),
                                         (dict(total_tokens=1), "total_tokens")])
def test_bad_tree_settings(targets, kwargs, name):
    target = targets["llava"]
    with pytest.raises(ValueError, match=name):
        msd.SpeculativeLLaVA(target, random_draft(target), **kwargs)
