"""Target-feature capture for training: the frozen target, the draft's inputs of a micro-batch
(target features computed online or read from shards, then shifted by
:func:`draft_training_inputs`), and ``msd features`` (:func:`write_features`), which stores
them in shards ahead of training."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from msd.draft_eagle3 import default_feature_layers
from msd.train.config import TrainConfig, device_and_dtype, parse_feature_layers
from msd.train.datasets import build_datasets
from msd.train.target_features import (
    TargetFeatureExtractor,
    TargetFeatures,
    draft_training_inputs,
    write_feature_shards,
)

logger = logging.getLogger(__name__)


def load_target(path: str, dtype: torch.dtype):
    """The frozen target in eval mode, on the CPU."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)


def run_feature_layers(config: TrainConfig, target) -> tuple[int, ...] | None:
    """The target hidden states a run's draft reads (``draft_kind=eagle3``: ``feature_layers``,
    else EAGLE-3's default), or None for an MSD draft (the last, post-norm state)."""
    if config.draft_kind != "eagle3":
        return None
    layers = parse_feature_layers(config.feature_layers)
    num_layers = target.config.get_text_config().num_hidden_layers
    layers = layers or default_feature_layers(num_layers)
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"feature_layers {list(layers)}: the target has hidden states 0 .. {num_layers - 1} to fuse")
    return layers


def _to_device(value, device: torch.device, dtype: torch.dtype):
    """A tensor on ``device``, floating-point ones (pixels, features) cast to ``dtype``; None stays None."""
    if value is None:
        return None
    return value.to(device, dtype=dtype if value.is_floating_point() else None)


def draft_inputs(batch: dict | None, extractor: TargetFeatureExtractor | None, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The draft's shifted training tensors of one micro-batch (None for an all-skipped one):
    features read from shards (``batch["features"]``) or computed by ``extractor``."""
    if batch is None:
        return None
    if "features" in batch:  # read from shards
        features = TargetFeatures(*(_to_device(getattr(batch["features"], f.name), device, dtype)
                                    for f in dataclasses.fields(TargetFeatures)))
    else:
        inputs = {name: _to_device(batch[name], device, dtype) for name in extractor.input_names if name in batch}
        features = extractor(batch["input_ids"].to(device), batch["attention_mask"].to(device), **inputs)
    return draft_training_inputs(features, batch["loss_mask"].to(device))


def write_features(target: str, output_dir: str, text_data: str | None = None, multimodal_data: str | None = None,
                   image_folder: str | None = None, processor: str | None = None, max_length: int = 2048,
                   shard_size: int = 256, device: str | None = None, bf16: bool | None = None,
                   draft_kind: str = "msd", feature_layers: str | None = None) -> dict[str, int]:
    """``msd features``: store the target features of each stage's data in
    ``output_dir/text`` and ``output_dir/multimodal`` (:func:`write_feature_shards` shards,
    read back by ``TrainConfig(features_dir=output_dir)``). Skipped records are left out;
    running it again continues after the last complete shard. Returns the samples stored
    per stage. ``draft_kind`` / ``feature_layers``: also the target states an EAGLE-3-style
    draft reads (as ``msd train`` takes them)."""
    device, dtype = device_and_dtype(device, bf16)
    model = load_target(target, dtype).to(device)
    datasets = build_datasets(text_data, multimodal_data, image_folder,
                              AutoProcessor.from_pretrained(processor or target), max_length, model.config)
    layers = run_feature_layers(TrainConfig(target=target, output_dir=output_dir, draft_kind=draft_kind,
                                            feature_layers=feature_layers), model)
    extractor = TargetFeatureExtractor(model, layers)
    counts = {}
    for kind, dataset in datasets.items():
        items = (dataset[i] for i in range(len(dataset)))
        on_device = ({key: _to_device(value, device, dtype) if isinstance(value, torch.Tensor) else value
                      for key, value in item.items()} for item in items if item is not None)
        counts[kind] = write_feature_shards(on_device, extractor, Path(output_dir) / kind, shard_size)
    skipped = sum((dataset.skipped for dataset in datasets.values()), Counter())
    if skipped:
        logger.warning("skipped records: %s", dict(skipped))
    return counts
