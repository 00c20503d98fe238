"""Training data for the two MSD stages (MSD_SPEC.md section 4).

- Stage 1, :class:`TextConversationDataset`: ShareGPT JSON, a list of
  ``{"id", "conversations": [{"from", "value"}, ...]}``.
- Stage 2, :class:`MultimodalConversationDataset`: LLaVA instruction JSON
  (``llava_v1_5_mix665k`` layout: the same records plus an optional ``"image"`` path relative
  to an image folder; text-only records are allowed) run through the target's processor.

Prompts are rendered by ``render``: the ``llava_v1`` template (:func:`render_llava_v1`, LLaVA
targets) or the processor's chat template (:class:`msd.train.chat_template.ChatTemplate`,
Qwen2-VL / Qwen2.5-VL targets); :mod:`msd.train.target_data` picks the target's.

Items are dicts ``{"input_ids": int64 [L], "loss_mask": bool [L], "source": "file:index"}``
plus, for records with an image, the processor's other model inputs: per image
(``pixel_values``, and ``image_sizes`` or ``image_grid_thw`` where the processor gives them)
and per token (``mm_token_type_ids`` where it gives them, int64 ``[L]``); :func:`collate`
pads them into a batch.

Bad data never stops a run. Problems visible in the JSON itself (not a record, no or empty
conversation, no answer, malformed turns, ``<image>`` placeholders that do not match the image
field, a missing image file) are found by one cheap scan when the dataset is built; problems
only visible when an item is loaded (unreadable image, a sample longer than ``max_length``,
a processed image the target's vision tower does not take: ``check_image``) make
``__getitem__`` return None.
Either way the record is logged as ``"<file>:<index>: <reason>: <detail>"`` and counted in
``dataset.skipped`` (a Counter keyed by reason); :func:`collate` drops the Nones. Over-long
samples are skipped, never truncated: a truncated sample would train on a cut answer. With a
DataLoader using workers, the load-time counts live in each worker's copy of the dataset
(the log lines are complete).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from msd.train.template import IMAGE_PLACEHOLDER, BadSample, dialogue, render_llava_v1, tokenize_segments

logger = logging.getLogger(__name__)


class TextConversationDataset(Dataset):
    """Stage-1 ShareGPT conversations rendered by ``render`` (conversation -> ``[(text,
    is_answer), ...]`` segments; default ``llava_v1``) and tokenized with the target's
    ``tokenizer`` (a fast one).

    Items longer than ``max_length`` tokens are skipped (None), not truncated. The base of
    :class:`MultimodalConversationDataset`: loading the JSON, the scan for bad records and
    turning a load-time BadSample into a logged, counted None live here.
    """

    def __init__(self, json_path, tokenizer, max_length: int, render=render_llava_v1):
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"training data file {self.json_path} does not exist")
        with open(self.json_path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{self.json_path}: expected a JSON list of records")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.render = render
        self.skipped: Counter[str] = Counter()
        # (index in the file, record, rendered segments) of the records that passed the scan.
        self.samples = []
        for index, record in enumerate(records):
            try:
                self.samples.append((index, record, self._check(record)))
            except BadSample as bad:
                self._skip(index, bad)

    @property
    def pad_id(self) -> int:
        """Padding id for :func:`collate` (its value never matters: it is masked out)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | None:
        index, record, segments = self.samples[i]
        try:
            item = self._load(record, segments)
            length = item["input_ids"].numel()
            if length > self.max_length:
                raise BadSample("too long", f"{length} tokens > max_length {self.max_length}")
        except BadSample as bad:
            self._skip(index, bad)
            return None
        item["source"] = self._source(index)
        return item

    def _source(self, index: int) -> str:
        return f"{self.json_path}:{index}"

    def _skip(self, index: int, bad: BadSample) -> None:
        self.skipped[bad.reason] += 1
        logger.warning("%s: %s (skipped)", self._source(index), bad)

    def _check(self, record) -> list[tuple[str, bool]]:
        """The record's rendered segments; raises BadSample when it is structurally bad."""
        if not isinstance(record, dict):
            raise BadSample("not a record", f"a JSON {type(record).__name__} instead of an object")
        segments = self.render(record.get("conversations"))
        # Counted in the turns the rendering keeps (a chat template turns them into image parts).
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for turns in dialogue(record["conversations"])
                           for text in turns)
        expected = self._image_count(record)
        if placeholders != expected:
            raise BadSample("image placeholder mismatch",
                            f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {expected} images")
        return segments

    def _image_count(self, record) -> int:
        """Images this dataset gives the record (text-only: none, whatever the record says)."""
        return 0

    def _load(self, record, segments) -> dict:
        """The item (without ``source``) of a scanned record; raises BadSample."""
        input_ids, loss_mask = tokenize_segments(segments, self.tokenizer)
        return {"input_ids": input_ids, "loss_mask": loss_mask}


class MultimodalConversationDataset(TextConversationDataset):
    """Stage-2 LLaVA instruction records run through the target's ``processor``.

    The processor expands the rendered prompt's image placeholder (LLaVA's ``<image>``, Qwen's
    ``<|image_pad|>``) into the image's tokens; the loss mask is made on the unexpanded prompt
    (:func:`msd.train.template.tokenize_segments`) and stretched over that expansion, the image
    tokens being False. The processor's ids are checked against the stretched template ids and,
    when ``check_image`` is given, the processed image against what the target's vision tower
    takes (``check_image(processed, image_tokens)`` raises BadSample, see
    :func:`msd.train.target_data.image_check`; without it the processor is trusted). Items
    longer than ``max_length`` tokens (image tokens included) are skipped (None), not truncated.
    """

    def __init__(self, json_path, image_folder, processor, max_length: int, render=render_llava_v1,
                 check_image=None):
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.check_image = check_image
        super().__init__(json_path, processor.tokenizer, max_length, render)

    def _image_count(self, record) -> int:
        """One image for a record with an ``"image"`` field (LLaVA-1.5 data), else none."""
        return 1 if "image" in record else 0

    def _check(self, record) -> list[tuple[str, bool]]:
        """Also checks the ``"image"`` field and that its file exists."""
        segments = super()._check(record)
        if "image" in record:
            if not isinstance(record["image"], str):
                raise BadSample("bad image field", f"{record['image']!r} is not one relative path")
            if not (self.image_folder / record["image"]).is_file():
                raise BadSample("missing image file", str(self.image_folder / record["image"]))
        return segments

    def _load(self, record, segments) -> dict:
        """Text-only records as in stage 1; records with an image through the processor."""
        if "image" not in record:
            return super()._load(record, segments)
        template_ids, template_mask = tokenize_segments(segments, self.tokenizer)
        path = self.image_folder / record["image"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise BadSample("unreadable image", f"{path}: {error}") from None
        prompt = "".join(text for text, _ in segments)
        try:
            processed = self.processor(images=image, text=prompt, return_tensors="pt")
        except ValueError as error:
            raise BadSample("processor error", str(error)) from None
        input_ids = processed["input_ids"][0]
        image_tokens = int((input_ids == self.image_token_id).sum())
        if self.check_image is not None:
            self.check_image(processed, image_tokens)
        is_image = template_ids == self.image_token_id
        repeats = torch.where(is_image, image_tokens, 1)
        if not torch.equal(template_ids.repeat_interleave(repeats), input_ids):
            raise BadSample("tokenization mismatch", "the processor's ids differ from the template's")
        item = {"input_ids": input_ids, "loss_mask": template_mask.repeat_interleave(repeats)}
        for key, value in processed.items():  # the model's other inputs; attention_mask is collate's
            if key not in ("input_ids", "attention_mask"):
                item[key] = value[0] if value.shape == processed["input_ids"].shape else value
        return item


def collate(items: list[dict | None], pad_id: int = 0) -> dict | None:
    """Batch dataset items, dropping the skipped ones (None); None when all were skipped.

    Right-pads ``input_ids`` (with ``pad_id``) and ``loss_mask`` (False) to the longest item and
    adds ``attention_mask`` int64 ``[B, L]``; ``sources`` lists the items' ``"file:index"``. The
    items' other tensors are the model's inputs of their images: one-dimensional ones are per
    token (``mm_token_type_ids``: right-padded with 0, all 0 for the items without one, as
    for text), the others per image, concatenated in batch order (LLaVA-1.5 ``pixel_values``
    ``[n_images, 3, H, W]``, ``image_sizes`` ``[n_images, 2]``; Qwen's flattened patches
    ``[n_patches, C * T * P * P]`` and ``image_grid_thw`` ``[n_images, 3]``).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    length = max(item["input_ids"].numel() for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(items), length), dtype=torch.bool)
    attention_mask = torch.zeros((len(items), length), dtype=torch.int64)
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        input_ids[row, :n] = item["input_ids"]
        loss_mask[row, :n] = item["loss_mask"]
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask,
             "sources": [item["source"] for item in items]}
    inputs = dict.fromkeys(key for item in items for key, value in item.items()
                           if isinstance(value, torch.Tensor) and key not in ("input_ids", "loss_mask"))
    for key in inputs:
        present = [item[key] for item in items if key in item]
        if present[0].dim() == 1:
            batch[key] = torch.zeros((len(items), length), dtype=present[0].dtype)
            for row, item in enumerate(items):
                if key in item:
                    batch[key][row, :item[key].numel()] = item[key]
        else:
            batch[key] = torch.cat(present)
    return batch
