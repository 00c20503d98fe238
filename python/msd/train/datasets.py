"""The training data of a run: each stage's dataset (conversation records or ``msd features``
shards) and the curriculum-sampled loader over them.

The stages are keyed ``"text"`` (stage 1, ShareGPT) and ``"multimodal"`` (stage 2, LLaVA
instruction data), the names of a features directory's sub-folders too. The loader draws
from ``ConcatDataset([text, multimodal])`` with :class:`CurriculumSampler`, and its batches
carry their ``samples`` and ``multimodal`` counts (the curriculum metrics).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch.utils.data import ConcatDataset, DataLoader, Dataset

from msd.train.config import TrainConfig
from msd.train.curriculum import CurriculumSampler
from msd.train.data import MultimodalConversationDataset, TextConversationDataset, collate
from msd.train.target_data import image_check, prompt_template
from msd.train.target_features import FeatureShardDataset, collate_feature_samples

# Sub-folders of a features directory, one per stage's data (``msd features``).
TEXT_FEATURES, MULTIMODAL_FEATURES = "text", "multimodal"


def build_datasets(text_data: str | None, multimodal_data: str | None, image_folder: str | None, processor,
                   max_length: int, target_config) -> dict[str, Dataset]:
    """The stage datasets present, keyed ``"text"`` / ``"multimodal"``, in the prompt template of
    the target of ``target_config`` and checking its images (:mod:`msd.train.target_data`)."""
    datasets = {}
    render = prompt_template(target_config, processor)
    if text_data:
        datasets[TEXT_FEATURES] = TextConversationDataset(text_data, processor.tokenizer, max_length, render)
    if multimodal_data:
        if not image_folder:
            raise ValueError("multimodal data needs an image folder")
        datasets[MULTIMODAL_FEATURES] = MultimodalConversationDataset(
            multimodal_data, image_folder, processor, max_length, render, image_check(target_config))
    if not datasets:
        raise ValueError("no training data: give text data, multimodal data or a features directory")
    return datasets


def feature_datasets(features_dir: str) -> dict[str, Dataset]:
    """The shard datasets ``msd features`` wrote under ``features_dir``."""
    datasets = {kind: FeatureShardDataset(Path(features_dir) / kind)
                for kind in (TEXT_FEATURES, MULTIMODAL_FEATURES) if (Path(features_dir) / kind).is_dir()}
    if not datasets:
        raise ValueError(f"{features_dir} has neither a {TEXT_FEATURES}/ nor a {MULTIMODAL_FEATURES}/ shard folder")
    return datasets


def skipped_records(datasets: dict[str, Dataset]) -> Counter:
    """Records this process's datasets skipped so far, by reason (shard datasets skip none)."""
    return sum((getattr(dataset, "skipped", Counter()) for dataset in datasets.values()), Counter())


class _Tagged(Dataset):
    """A dataset whose items carry ``"multimodal"``: whether they came from the stage-2 data
    (counted per step for the curriculum metrics)."""

    def __init__(self, dataset: Dataset, multimodal: bool):
        self.dataset, self.multimodal = dataset, multimodal

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        item = self.dataset[index]
        return None if item is None else {**item, "multimodal": self.multimodal}


def collate_records(items: list[dict | None], pad_id: int) -> dict | None:
    """:func:`collate` plus the batch's ``samples`` and ``multimodal`` counts."""
    batch = collate(items, pad_id)
    if batch is not None:
        kept = [item for item in items if item is not None]
        batch |= {"samples": len(kept), "multimodal": sum(item["multimodal"] for item in kept)}
    return batch


def collate_shards(items: list[dict]) -> dict:
    """:func:`collate_feature_samples` as a batch dict with the same counts."""
    features, loss_mask = collate_feature_samples(items)
    return {"features": features, "loss_mask": loss_mask, "samples": len(items),
            "multimodal": sum(item["multimodal"] for item in items)}


def curriculum_loader(datasets: dict[str, Dataset], collate_fn, config: TrainConfig, num_replicas: int,
                      rank: int) -> tuple[CurriculumSampler, DataLoader]:
    """This rank's curriculum sampler (at epoch 1) and the loader of its micro-batches. With a
    single stage there is no curriculum: every draw comes from that stage."""
    text_size = len(datasets.get(TEXT_FEATURES, ()))
    multimodal_size = len(datasets.get(MULTIMODAL_FEATURES, ()))
    fixed = None if text_size and multimodal_size else float(multimodal_size > 0)
    sampler = CurriculumSampler(text_size, multimodal_size, epoch=1, total_epochs=config.epochs,
                                seed=config.seed, num_replicas=num_replicas, rank=rank,
                                samples_per_epoch=config.samples_per_epoch, probability=fixed)
    tagged = [_Tagged(datasets[kind], kind == MULTIMODAL_FEATURES)
              for kind in (TEXT_FEATURES, MULTIMODAL_FEATURES) if kind in datasets]
    loader = DataLoader(ConcatDataset(tagged), batch_size=config.batch_size, sampler=sampler,
                        collate_fn=collate_fn, num_workers=config.num_workers)
    return sampler, loader
