"""Training data: llava_v1 template, answer-only loss mask, multimodal expansion, bad records
counted and skipped, collate; Qwen2-VL's chat template, its items and images. Tiny tokenizers and
tiny LLaVA and Qwen2-VL processors, no hub access."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessor

from msd.train.data import MultimodalConversationDataset, TextConversationDataset, collate
from msd.train.target_data import image_check, prompt_template
from msd.train.template import BadSample, render_llava_v1, tokenize_conversation, tokenize_segments

import tiny_models
from tiny_models import (
    SPECIAL_TOKENS,
    tiny_llava_config,
    tiny_processor,
    tiny_qwen2_vl_config,
    tiny_qwen_processor,
    tiny_tokenizer,
    wrap_tokenizer,
)

IMAGE_TOKENS = 16  # (16 px / 4 px patches) ** 2 + 1 CLS - 1 (strategy "default")

CONVERSATION = [
    {"from": "human", "value": "what is this?"},
    {"from": "gpt", "value": "a cat."},
    {"from": "human", "value": "and this?"},
    {"from": "gpt", "value": "a dog."},
]
# Hand-tokenized llava_v1 prompt "USER: what is this? ASSISTANT: a cat.</s>USER: and this? ASSISTANT: a dog.</s>"
# and its mask: 1 exactly on each answer, its "</s>" included.
EXPECTED = [
    ("<s>", 0), ("USER", 0), (":", 0), ("what", 0), ("is", 0), ("this", 0), ("?", 0), ("ASSISTANT", 0), (":", 0),
    ("a", 1), ("cat", 1), (".", 1), ("</s>", 1),
    ("USER", 0), (":", 0), ("and", 0), ("this", 0), ("?", 0), ("ASSISTANT", 0), (":", 0),
    ("a", 1), ("dog", 1), (".", 1), ("</s>", 1),
]


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: one token per word or punctuation mark."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return tiny_processor(tokenizer)


def _ids(tokenizer, tokens):
    return torch.tensor(tokenizer.convert_tokens_to_ids(tokens))


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def _image(path, size=(24, 20)):
    Image.new("RGB", size, (200, 30, 30)).save(path)


def _with_image(conversation, image="cat.png"):
    first = {"from": "human", "value": "<image>\n" + conversation[0]["value"]}
    return {"id": "mm", "image": image, "conversations": [first] + conversation[1:]}


def test_render_llava_v1_roles_and_separators():
    conversation = [
        {"from": "system", "value": "ignored"},
        {"from": "gpt", "value": "leading answer, dropped"},
        {"from": "user", "value": "q1"},
        {"from": "assistant", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
        {"from": "human", "value": "unanswered, dropped"},
    ]
    assert render_llava_v1(conversation) == [
        ("USER: q1 ASSISTANT:", False), (" a1</s>", True), ("USER: q2 ASSISTANT:", False), (" a2</s>", True)]


@pytest.mark.parametrize("conversation, reason", [
    ([], "empty conversation"),
    ([{"from": "human", "value": "q"}], "no answer turn"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
     "roles do not alternate"),
    ([{"from": "bot", "value": "q"}], "bad turn"),
    ([{"from": "human"}], "bad turn"),
    ("not a list", "no conversations"),
])
def test_render_llava_v1_rejects_malformed(conversation, reason):
    with pytest.raises(BadSample) as error:
        render_llava_v1(conversation)
    assert error.value.reason == reason


def test_loss_mask_of_a_known_conversation(tokenizer):
    input_ids, loss_mask = tokenize_conversation(CONVERSATION, tokenizer)
    assert input_ids.dtype == torch.int64 and loss_mask.dtype == torch.bool
    assert input_ids.tolist() == _ids(tokenizer, [token for token, _ in EXPECTED]).tolist()
    assert loss_mask.tolist() == [bool(m) for _, m in EXPECTED]


def test_loss_mask_with_sentencepiece_style_spaces():
    """Llama-like BPE (Metaspace "▁"): the masked tokens spell exactly each answer with its leading space."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = ["USER: what is this? ASSISTANT: a cat.", "and this? a dog.", "a very long cat"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=SPECIAL_TOKENS + ["<image>"]))
    tokenizer = wrap_tokenizer(bpe)
    input_ids, loss_mask = tokenize_conversation(CONVERSATION, tokenizer)
    assert input_ids.tolist() == tokenizer("USER: what is this? ASSISTANT: a cat.</s>"
                                           "USER: and this? ASSISTANT: a dog.</s>").input_ids
    pieces = tokenizer.convert_ids_to_tokens(input_ids.tolist())
    answers = "".join(p if m else "|" for p, m in zip(pieces, loss_mask.tolist())).replace("▁", " ")
    assert [a for a in answers.split("|") if a] == [" a cat.</s>", " a dog.</s>"]


def test_text_dataset_items_and_bad_records(tmp_path, tokenizer, caplog):
    long_answer = [{"from": "human", "value": "what is this?"}, {"from": "gpt", "value": "very " * 40 + "long."}]
    records = [
        {"id": "good", "conversations": CONVERSATION},
        {"id": "empty", "conversations": []},
        {"id": "long", "conversations": long_answer},
        ["not", "a", "record"],
        {"id": "no conversations"},
        _with_image(CONVERSATION),  # an image in stage-1 text data
    ]
    path = _write(tmp_path / "sharegpt.json", records)
    with caplog.at_level(logging.WARNING, logger="msd.train.data"):
        dataset = TextConversationDataset(path, tokenizer, max_length=32)
        assert len(dataset) == 2
        assert dataset.skipped == {"empty conversation": 1, "not a record": 1, "no conversations": 1,
                                   "image placeholder mismatch": 1}
        good, long = dataset[0], dataset[1]
    assert good["source"] == f"{path}:0"
    assert good["loss_mask"].tolist() == [bool(m) for _, m in EXPECTED]
    assert long is None and dataset.skipped["too long"] == 1
    for index, reason in [(1, "empty conversation"), (2, "too long"), (3, "not a record"), (4, "no conversations"),
                          (5, "image placeholder mismatch")]:
        assert any(f"{path}:{index}: {reason}" in message for message in caplog.messages), (index, reason)


def test_missing_json_file_is_an_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        TextConversationDataset(tmp_path / "nowhere.json", tokenizer, max_length=64)


def test_multimodal_item_expands_the_image_and_masks_it(tmp_path, tokenizer, processor):
    _image(tmp_path / "cat.png")
    dataset = MultimodalConversationDataset(_write(tmp_path / "mix.json", [_with_image(CONVERSATION)]), tmp_path,
                                            processor, max_length=64)
    item = dataset[0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # "<s> USER :" then the 16 image tokens, then the text prompt as before.
    expected = EXPECTED[:3] + [("<image>", 0)] * IMAGE_TOKENS + EXPECTED[3:]
    assert item["input_ids"].tolist() == _ids(tokenizer, [token for token, _ in expected]).tolist()
    assert item["loss_mask"].tolist() == [bool(m) for _, m in expected]
    assert int((item["input_ids"] == image_id).sum()) == IMAGE_TOKENS
    assert not item["loss_mask"][item["input_ids"] == image_id].any()
    assert item["pixel_values"].shape == (1, 3, 16, 16)
    assert item["source"] == f"{tmp_path / 'mix.json'}:0"


def test_multimodal_bad_records_are_counted_and_skipped(tmp_path, processor, caplog):
    _image(tmp_path / "cat.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    long_answer = [{"from": "human", "value": "what is this?"}, {"from": "gpt", "value": "very " * 40 + "long."}]
    records = [
        _with_image(CONVERSATION),                          # 0 good
        {"id": "text", "conversations": CONVERSATION},      # 1 good, text-only
        _with_image(CONVERSATION, image="absent.png"),      # 2 missing image file
        {"id": "empty", "image": "cat.png", "conversations": []},  # 3 empty conversation
        _with_image(CONVERSATION, image="broken.png"),      # 4 unreadable image
        _with_image(long_answer),                           # 5 over-long
        {"id": "no placeholder", "image": "cat.png", "conversations": CONVERSATION},  # 6
        _with_image(CONVERSATION, image=["cat.png", "cat.png"]),  # 7 several images
    ]
    path = _write(tmp_path / "mix.json", records)
    with caplog.at_level(logging.WARNING, logger="msd.train.data"):
        dataset = MultimodalConversationDataset(path, tmp_path, processor, max_length=40)
        assert len(dataset) == 4
        items = [dataset[i] for i in range(len(dataset))]
    assert [item is None for item in items] == [False, False, True, True]
    assert dataset.skipped == {"missing image file": 1, "empty conversation": 1, "unreadable image": 1,
                               "too long": 1, "image placeholder mismatch": 1, "bad image field": 1}
    for index, reason in [(2, "missing image file"), (3, "empty conversation"), (4, "unreadable image"),
                          (5, "too long"), (6, "image placeholder mismatch"), (7, "bad image field")]:
        assert any(f"{path}:{index}: {reason}" in message for message in caplog.messages), (index, reason)


def test_image_size_mismatch_is_skipped(tmp_path, tokenizer, caplog):
    """Without the center crop a wide image is 16x32 pixels (32 image tokens) where the tiny
    target's vision tower takes 16x16 (16 tokens): the target's image check skips and logs it."""
    processor = tiny_processor(tokenizer, CLIPImageProcessor(size={"shortest_edge": 16}, do_center_crop=False,
                                                         crop_size={"height": 16, "width": 16}))
    _image(tmp_path / "square.png", size=(20, 20))
    _image(tmp_path / "wide.png", size=(40, 20))
    records = [_with_image(CONVERSATION, "square.png"), _with_image(CONVERSATION, "wide.png")]
    path = _write(tmp_path / "mix.json", records)
    dataset = MultimodalConversationDataset(path, tmp_path, processor, max_length=128,
                                            check_image=image_check(tiny_llava_config()))
    with caplog.at_level(logging.WARNING, logger="msd.train.data"):
        assert dataset[0] is not None and dataset[1] is None
    assert dataset.skipped == {"image size mismatch": 1}
    assert any(f"{path}:1: image size mismatch" in message and "16x32" in message for message in caplog.messages)


def test_collate_pads_and_drops_skipped(tmp_path, tokenizer, processor):
    _image(tmp_path / "cat.png")
    short = [{"from": "human", "value": "what is this?"}, {"from": "gpt", "value": "a cat."}]
    records = [{"id": "short", "conversations": short}, _with_image(CONVERSATION),
               {"id": "long", "conversations": CONVERSATION}]
    dataset = MultimodalConversationDataset(_write(tmp_path / "mix.json", records), tmp_path, processor,
                                            max_length=64)
    items = [dataset[0], None, dataset[1], dataset[2]]
    batch = collate(items, pad_id=dataset.pad_id)
    lengths = [13, len(EXPECTED) + IMAGE_TOKENS, len(EXPECTED)]
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (item, n) in enumerate(zip([items[0], items[2], items[3]], lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["loss_mask"][row, :n], item["loss_mask"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert not batch["loss_mask"][row, n:].any() and not batch["attention_mask"][row, n:].any()
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert batch["sources"] == [items[0]["source"], items[2]["source"], items[3]["source"]]
    assert collate([None, None]) is None


# ---------------------------------------------------------------------- Qwen2-VL: the processor's chat template
QWEN_CONVERSATION = [
    {"from": "human", "value": "what is this ?"},
    {"from": "gpt", "value": "a cat ."},
    {"from": "human", "value": "and this ?"},
    {"from": "gpt", "value": "a dog ."},
]
QWEN_SYSTEM = "<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n"
# The hand-rendered Qwen prompt of QWEN_CONVERSATION with an image: each answer with its <|im_end|> (what the
# model emits), the newline after it the template's.
QWEN_SEGMENTS = [
    (QWEN_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is this ?<|im_end|>\n"
     "<|im_start|>assistant\n", False),
    ("a cat .<|im_end|>", True),
    ("\n<|im_start|>user\nand this ?<|im_end|>\n<|im_start|>assistant\n", False),
    ("a dog .<|im_end|>", True),
    ("\n", False),
]


@pytest.fixture(scope="module")
def qwen_processor():
    return tiny_qwen_processor()


def test_chat_template_segments_and_loss_mask(qwen_processor):
    render = prompt_template(tiny_qwen2_vl_config(), qwen_processor)
    assert render(_with_image(QWEN_CONVERSATION)["conversations"]) == QWEN_SEGMENTS
    input_ids, loss_mask = tokenize_segments(QWEN_SEGMENTS, qwen_processor.tokenizer)
    tokens = qwen_processor.tokenizer.convert_ids_to_tokens(input_ids.tolist())
    assert [t for t, m in zip(tokens, loss_mask.tolist()) if m] == [
        "a", "Ġcat", "Ġ.", "<|im_end|>", "a", "Ġdog", "Ġ.", "<|im_end|>"]
    assert tokens[:3] == ["<|im_start|>", "s", "y"] and tokens[-1] == "Ċ" and not loss_mask[-1]
    # LLaVA targets keep llava_v1, whatever their processor's template.
    assert prompt_template(tiny_llava_config(), qwen_processor) is render_llava_v1


def test_chat_template_needs_one():
    processor = tiny_qwen_processor()
    processor.chat_template = None
    with pytest.raises(ValueError, match="qwen2_vl targets train on their processor's chat template"):
        prompt_template(tiny_qwen2_vl_config(), processor)


def qwen_dataset(tmp_path, processor, records, **options):
    render = prompt_template(tiny_qwen2_vl_config(), processor)
    return MultimodalConversationDataset(_write(tmp_path / "qwen.json", records), tmp_path, processor,
                                         max_length=256, render=render, **options)


def test_qwen_item_is_the_processors_own_output(tmp_path, qwen_processor):
    """A record's ids and model inputs equal the processor's for the template's own rendering
    of hand-made messages; the loss mask covers the answers (stretched over the image's pads:
    none of them)."""
    _image(tmp_path / "cat.png", size=(24, 20))
    item = qwen_dataset(tmp_path, qwen_processor, [_with_image(QWEN_CONVERSATION)])[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
                {"role": "user", "content": [{"type": "text", "text": "and this ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a dog ."}]}]
    text = qwen_processor.apply_chat_template(messages, tokenize=False)
    expected = qwen_processor(images=Image.open(tmp_path / "cat.png"), text=text, return_tensors="pt")
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    model_inputs = set(expected) - {"input_ids", "attention_mask"}
    assert model_inputs >= {"pixel_values", "image_grid_thw"}  # and mm_token_type_ids where it gives them
    assert set(item) == {"input_ids", "loss_mask", "source"} | model_inputs
    for key in model_inputs:
        assert torch.equal(item[key], expected[key][0] if key == "mm_token_type_ids" else expected[key]), key
    pads = item["input_ids"] == tiny_models.QWEN_IMAGE
    assert int(pads.sum()) == int(item["image_grid_thw"].prod()) // tiny_models.QWEN_MERGE ** 2 == 6  # 16 x 24 px
    assert not item["loss_mask"][pads].any()
    answer_tokens = item["input_ids"][item["loss_mask"]].tolist()
    assert qwen_processor.tokenizer.decode(answer_tokens) == "a cat .<|im_end|>a dog .<|im_end|>"


def test_qwen_image_the_model_does_not_take_is_skipped(tmp_path, caplog):
    """A processor merging 1 x 1 patches where the model merges 2 x 2 gives 4 times the image
    tokens: skipped and logged, not a crash in the target."""
    _image(tmp_path / "cat.png", size=(24, 16))
    processor = tiny_qwen_processor(merge_size=1)
    dataset = qwen_dataset(tmp_path, processor, [_with_image(QWEN_CONVERSATION)],
                           check_image=image_check(tiny_qwen2_vl_config()))
    with caplog.at_level(logging.WARNING, logger="msd.train.data"):
        assert dataset[0] is None
    assert dataset.skipped == {"image token count mismatch": 1}
    assert any("image token count mismatch: the processor gave 24 image tokens, the model takes 6" in message
               for message in caplog.messages)


def test_collate_batches_qwen_items(tmp_path, qwen_processor):
    """Flattened patches and grids concatenate in batch order; per-token inputs pad (0: text)."""
    _image(tmp_path / "small.png", size=(16, 16))
    _image(tmp_path / "wide.png", size=(32, 16))
    records = [_with_image(QWEN_CONVERSATION, "small.png"), {"id": "text", "conversations": QWEN_CONVERSATION[2:]},
               _with_image(QWEN_CONVERSATION, "wide.png")]
    dataset = qwen_dataset(tmp_path, qwen_processor, records)
    items = [dataset[i] for i in range(3)]
    batch = collate(items, pad_id=dataset.pad_id)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["pixel_values"].shape == (16 + 32, tiny_models.QWEN_PATCH_VALUES)
    if "mm_token_type_ids" in items[0]:  # transformers 5's processor gives them
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            expected = item.get("mm_token_type_ids", torch.zeros(n, dtype=torch.long))
            assert torch.equal(batch["mm_token_type_ids"][row, :n], expected)
            assert not batch["mm_token_type_ids"][row, n:].any()
        assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == tiny_models.QWEN_IMAGE)
