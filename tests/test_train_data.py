"""Training data: llava_v1 template, answer-only loss mask, multimodal expansion, bad records
counted and skipped, collate. Tiny tokenizers and a tiny LLaVA processor, no hub access."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessor

from msd.train.data import MultimodalConversationDataset, TextConversationDataset, collate
from msd.train.template import BadSample, render_llava_v1, tokenize_conversation

from tiny_models import SPECIAL_TOKENS, tiny_processor, tiny_tokenizer, wrap_tokenizer

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


def test_image_token_count_mismatch_is_skipped(tmp_path, tokenizer, caplog):
    """Without the center crop a wide image gives 32 tokens where the model takes 16."""
    processor = tiny_processor(tokenizer, CLIPImageProcessor(size={"shortest_edge": 16}, do_center_crop=False,
                                                         crop_size={"height": 16, "width": 16}))
    _image(tmp_path / "square.png", size=(20, 20))
    _image(tmp_path / "wide.png", size=(40, 20))
    records = [_with_image(CONVERSATION, "square.png"), _with_image(CONVERSATION, "wide.png")]
    path = _write(tmp_path / "mix.json", records)
    dataset = MultimodalConversationDataset(path, tmp_path, processor, max_length=128)
    with caplog.at_level(logging.WARNING, logger="msd.train.data"):
        assert dataset[0] is not None and dataset[1] is None
    assert dataset.skipped == {"image token count mismatch": 1}
    assert any(f"{path}:1: image token count mismatch" in message and "32" in message
               for message in caplog.messages)


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
