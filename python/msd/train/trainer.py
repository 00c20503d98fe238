"""The MSD draft training loop (MSD_SPEC.md section 4): ``msd train`` and :func:`train`.

One optimiser step takes ``grad_accum`` micro-batches of ``batch_size`` samples per rank.
Each micro-batch goes: curriculum-sampled records -> :func:`msd.train.data.collate` -> the
frozen target's features (online, or read from ``msd features`` shards) ->
:func:`draft_training_inputs` -> noise on the input features -> the draft with a causal,
padding-masked attention -> :func:`msd_loss`.

Loss normalisation: a step's gradient is that of ``sum of the per-token losses / tokens``
over ALL the step's answer tokens (every micro-batch of every rank), so a step does not
depend on how its samples were split into micro-batches or ranks (up to float rounding).

Checkpoints (rank 0 writes them): ``output_dir/step-XXXXXX/`` every ``save_every`` steps and
``output_dir/epoch-XX/`` at each epoch end, each a released-layout draft
(:func:`msd.draft_checkpoint.save_draft`) plus ``trainer_state.pt``; written to a temporary
folder then renamed, and only then named in the ``output_dir/last`` file, so a crash never
leaves a half checkpoint behind ``last``. The feature noise of a micro-batch is seeded from
``(seed, step, micro-batch, rank)``, which together with the saved optimiser, schedule and
sampler states makes a resumed run repeat an uninterrupted one exactly (bitwise on CPU).

Data parallel: run under ``torchrun`` (``python -m msd.train ...``); each rank draws its
own share of the curriculum stream (``CurriculumSampler(num_replicas, rank)``), the draft is
wrapped in ``DistributedDataParallel`` (nccl on CUDA, gloo on CPU) or, with ``fsdp``,
``FullyShardedDataParallel`` (either backend).

Evaluation (``eval_data``): at each epoch end, at the last step and every ``eval_every``
steps, rank 0 measures the greedy tau of the real engine (:class:`SpeculativeLLaVA`, the
frozen target with a copy of the current draft) on held-out first user turns; the
``tau`` column of ``metrics.csv`` (empty on other steps), ``eval/tau`` in TensorBoard. It
leaves the training untouched: a run with evaluation trains the same weights, bitwise.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import random
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from msd.draft import MSDDraftModel
from msd.draft_checkpoint import (
    check_keys,
    draft_config_for,
    load_draft,
    read_state_dict,
    save_draft,
)
from msd.train.curriculum import CurriculumSampler
from msd.train.data import MultimodalConversationDataset, TextConversationDataset, collate
from msd.train.evaluation import TauEvaluator, first_turn_prompts
from msd.train.losses import feature_noise, msd_loss
from msd.train.optim import make_optimizer, make_schedule
from msd.train.target_data import image_check, prompt_template
from msd.train.target_features import (
    FeatureShardDataset,
    TargetFeatureExtractor,
    TargetFeatures,
    collate_feature_samples,
    draft_training_inputs,
    write_feature_shards,
)

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LAST_FILE = "last"  # names the newest complete checkpoint folder
METRICS_FILE = "metrics.csv"
METRICS = ("step", "epoch", "loss", "vloss", "ploss", "accuracy", "lr", "samples_per_s", "samples",
           "multimodal_samples", "tokens", "tau")  # tau: empty on steps without evaluation
# Sub-folders of a features directory, one per stage's data (``msd features``).
TEXT_FEATURES, MULTIMODAL_FEATURES = "text", "multimodal"
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("epochs", "batch_size", "grad_accum", "samples_per_epoch", "seed")


def _option(default, help: str):
    """A dataclass field with its ``msd train --help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one draft training run; each field is the ``msd train`` option of the same
    name (``--grad-accum`` for ``grad_accum``), documented by its help text."""

    target: str = field(metadata={"help": "target checkpoint folder (LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / "
                                          "Qwen2.5-VL), kept frozen"})
    output_dir: str = field(metadata={"help": "folder for the checkpoints, metrics.csv and the final draft"})
    text_data: str | None = _option(None, "stage-1 ShareGPT JSON (text-only conversations)")
    multimodal_data: str | None = _option(None, "stage-2 LLaVA instruction JSON (records with an 'image' path)")
    image_folder: str | None = _option(None, "folder the multimodal records' image paths are relative to")
    features_dir: str | None = _option(None, "pre-computed target features (`msd features` output) used instead "
                                              "of running the target online; replaces the data options")
    processor: str | None = _option(None, "processor / tokenizer folder (default: the target's)")
    init_draft: str | None = _option(None, "start from this draft checkpoint (default: a fresh draft, fc and "
                                            "layer random, embeddings copied from the target)")
    epochs: int = _option(10, "epochs E; the multimodal share of epoch e is r(e) (MSD_SPEC.md 4)")
    batch_size: int = _option(4, "samples per micro-batch and rank")
    grad_accum: int = _option(1, "micro-batches per optimiser step")
    lr: float = _option(5e-5, "peak learning rate (AdamW, betas 0.9/0.95, no weight decay)")
    warmup_steps: int = _option(2000, "linear warm-up steps, then linear decay to 0 (capped at the total steps)")
    max_length: int = _option(2048, "longest sample in tokens (image tokens included); longer ones are skipped")
    samples_per_epoch: int | None = _option(None, "curriculum draws per epoch over all ranks "
                                                  "(default: text + multimodal record counts)")
    noise_scale: float = _option(0.2, "uniform feature noise amplitude (x 512 / sequence length); 0 disables it")
    v_weight: float = _option(1.0, "weight of the feature regression loss (SmoothL1)")
    p_weight: float = _option(0.1, "weight of the token distribution loss (cross-entropy)")
    grad_clip: float = _option(0.5, "max global gradient norm")
    save_every: int = _option(0, "write a step-XXXXXX checkpoint every this many steps (0: only at epoch ends)")
    log_every: int = _option(10, "steps between progress-bar / log updates (metrics.csv gets every step)")
    decouple_visual: bool = _option(True, "MSD's decoupled draft inputs (visual positions take the raw visual "
                                          "embedding); --no-decouple-visual fuses them like text (ablation)")
    seed: int = _option(0, "seed of the fresh draft, the curriculum stream and the feature noise")
    device: str | None = _option(None, "device (default: cuda when available, else cpu; "
                                       "under torchrun each rank takes cuda:LOCAL_RANK)")
    bf16: bool | None = _option(None, "bf16 target and autocast (default: on for CUDA, off for CPU)")
    gradient_checkpointing: bool = _option(False, "recompute the draft layer in the backward pass (less memory)")
    fsdp: bool = _option(False, "shard the draft with FullyShardedDataParallel instead of DDP (under torchrun)")
    resume: bool = _option(False, "continue from the checkpoint named in OUTPUT_DIR/last")
    progress: bool = _option(True, "show tqdm progress bars")
    max_steps: int | None = _option(None, "stop (with a checkpoint) after this many optimiser steps in all; "
                                          "the schedule still spans every epoch")
    num_workers: int = _option(0, "DataLoader worker processes per rank")
    tensorboard: bool = _option(False, "also log the metrics to OUTPUT_DIR/tensorboard (needs tensorboard)")
    eval_data: str | None = _option(None, "held-out ShareGPT / LLaVA JSON: the greedy tau of the engine with the "
                                          "current draft on its records' first user turns is logged (the 'tau' "
                                          "column, eval/tau) at each epoch end, at the last step and every "
                                          "eval_every steps; rank 0 evaluates while the others wait")
    eval_image_folder: str | None = _option(None, "folder the eval_data image paths are relative to "
                                                  "(default: image_folder)")
    eval_every: int = _option(0, "also evaluate tau every this many steps (0: only at epoch ends); needs eval_data")
    eval_samples: int = _option(16, "eval_data records evaluated (the first ones that are usable)")
    eval_max_new_tokens: int = _option(64, "tokens generated per evaluation prompt")
    eval_top_k: int = _option(10, "draft tree top_k of the evaluation engine")
    eval_depth: int = _option(5, "draft tree depth of the evaluation engine")
    eval_total_tokens: int = _option(60, "tree tokens verified per step by the evaluation engine")


# ---------------------------------------------------------------------- distributed setup
@dataclass
class _Ranks:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this run initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _device_and_dtype(device: str | None, bf16: bool | None) -> tuple[torch.device, torch.dtype]:
    """The device (default cuda when available) and the target's dtype (bf16 by default on CUDA)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = bf16 if bf16 is not None else device.type == "cuda"
    return device, torch.bfloat16 if bf16 else torch.float32


def _load_target(path: str, dtype: torch.dtype):
    """The frozen target in eval mode, on the CPU."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)


def _setup_ranks(config: TrainConfig) -> _Ranks:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, _ = _device_and_dtype(config.device, config.bf16)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return _Ranks(dist.get_rank(), dist.get_world_size(), device, owns_group)
    return _Ranks(0, 1, device, False)


def _all_reduce(values: list[float], ranks: _Ranks, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64, so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if ranks.world > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------- data
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


def _collate_records(items: list[dict | None], pad_id: int) -> dict | None:
    """:func:`collate` plus the batch's ``samples`` and ``multimodal`` counts."""
    batch = collate(items, pad_id)
    if batch is not None:
        kept = [item for item in items if item is not None]
        batch |= {"samples": len(kept), "multimodal": sum(item["multimodal"] for item in kept)}
    return batch


def _collate_shards(items: list[dict]) -> dict:
    """:func:`collate_feature_samples` as a batch dict with the same counts."""
    features, loss_mask = collate_feature_samples(items)
    return {"features": features, "loss_mask": loss_mask, "samples": len(items),
            "multimodal": sum(item["multimodal"] for item in items)}


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


def _feature_datasets(features_dir: str) -> dict[str, Dataset]:
    """The shard datasets ``msd features`` wrote under ``features_dir``."""
    datasets = {kind: FeatureShardDataset(Path(features_dir) / kind)
                for kind in (TEXT_FEATURES, MULTIMODAL_FEATURES) if (Path(features_dir) / kind).is_dir()}
    if not datasets:
        raise ValueError(f"{features_dir} has neither a {TEXT_FEATURES}/ nor a {MULTIMODAL_FEATURES}/ shard folder")
    return datasets


def _skipped(datasets: dict[str, Dataset], ranks: _Ranks) -> Counter:
    """Records skipped so far by reason, summed over the ranks (shard datasets skip none)."""
    counts = sum((getattr(dataset, "skipped", Counter()) for dataset in datasets.values()), Counter())
    if ranks.world > 1:
        gathered = [None] * ranks.world
        dist.all_gather_object(gathered, counts)
        counts = sum(gathered, Counter())
    return counts


def _to_device(value, device: torch.device, dtype: torch.dtype):
    """A tensor on ``device``, floating-point ones (pixels, features) cast to ``dtype``."""
    return value.to(device, dtype=dtype if value.is_floating_point() else None)


def _draft_inputs(batch: dict | None, extractor: TargetFeatureExtractor | None, device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The draft's shifted training tensors of one micro-batch (None for an all-skipped one)."""
    if batch is None:
        return None
    if "features" in batch:  # read from shards
        features = TargetFeatures(*(_to_device(getattr(batch["features"], f.name), device, dtype)
                                    for f in dataclasses.fields(TargetFeatures)))
    else:
        inputs = {name: _to_device(batch[name], device, dtype) for name in extractor.input_names if name in batch}
        features = extractor(batch["input_ids"].to(device), batch["attention_mask"].to(device), **inputs)
    return draft_training_inputs(features, batch["loss_mask"].to(device))


def _empty_inputs(hidden: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One position with an empty loss mask: what a rank runs for a micro-batch whose records
    were all skipped, so that every rank runs the same number of forward/backward passes."""
    zeros = torch.zeros(1, 1, hidden, device=device, dtype=dtype)
    index = torch.zeros(1, 1, dtype=torch.long, device=device)
    return {"input_ids": index, "visual_embeds": zeros, "visual_mask": index.bool(), "features": zeros,
            "target": zeros, "loss_mask": index, "attention_mask": ~index.bool(), "position_ids": index}


def write_features(target: str, output_dir: str, text_data: str | None = None, multimodal_data: str | None = None,
                   image_folder: str | None = None, processor: str | None = None, max_length: int = 2048,
                   shard_size: int = 256, device: str | None = None, bf16: bool | None = None) -> dict[str, int]:
    """``msd features``: store the target features of each stage's data in
    ``output_dir/text`` and ``output_dir/multimodal`` (:func:`write_feature_shards` shards,
    read back by ``TrainConfig(features_dir=output_dir)``). Skipped records are left out;
    running it again continues after the last complete shard. Returns the samples stored
    per stage."""
    device, dtype = _device_and_dtype(device, bf16)
    model = _load_target(target, dtype).to(device)
    datasets = build_datasets(text_data, multimodal_data, image_folder,
                              AutoProcessor.from_pretrained(processor or target), max_length, model.config)
    extractor = TargetFeatureExtractor(model)
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


# ---------------------------------------------------------------------- the draft's training forward
def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool real positions -> ``[B, 1, N, N]`` bool SDPA mask (True = attend):
    causal, and no query attends to padding. Every row keeps key 0, so none is all-masked."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class DraftTrainingForward(nn.Module):
    """Fuse inputs + draft layer as ONE module, so that DDP / FSDP see every trainable
    parameter used inside the forward they wrap."""

    def __init__(self, draft: MSDDraftModel, gradient_checkpointing: bool = False):
        super().__init__()
        self.draft = draft
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``draft_training_inputs`` tensors (features noised) -> draft hidden ``[B, N, H]``."""
        fused = self.draft.fuse_inputs(inputs["input_ids"], inputs["features"], inputs["visual_embeds"],
                                       inputs["visual_mask"])
        args = (fused, inputs["position_ids"], causal_padding_mask(inputs["attention_mask"]))
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self.draft, *args, use_reentrant=False)
        return self.draft(*args)


def _fresh_draft(target, seed: int, decouple_visual: bool) -> MSDDraftModel:
    """A new float32 draft of the target's width: random fc/layer (seeded), a frozen float32
    copy of the target's embeddings (never the target's own module, which stays untouched)."""
    config = draft_config_for(target)
    weight = target.get_input_embeddings().weight.detach().to(torch.float32).clone()
    torch.manual_seed(seed)
    return MSDDraftModel(config, nn.Embedding.from_pretrained(weight, freeze=True), decouple_visual=decouple_visual)


def _wrap(module: DraftTrainingForward, config: TrainConfig, ranks: _Ranks) -> nn.Module:
    """DDP / FSDP around the training forward when there are several ranks (or FSDP asked)."""
    if config.fsdp:
        if ranks.world == 1:
            raise ValueError("fsdp shards the draft over several ranks: run under torchrun --nproc_per_node N")
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullyShardedDataParallel, StateDictType

        # use_orig_params: the frozen embedding shares flat parameters with trainable weights.
        model = FullyShardedDataParallel(module, device_id=ranks.device, use_orig_params=True)
        # The checkpoint's optimiser state is gathered into one buffer reused for every state
        # name; "offloading" it to the CPU makes no copy when it already is there, so on CPU
        # exp_avg would alias exp_avg_sq (torch 2.13). Without offloading it is cloned.
        FullyShardedDataParallel.set_state_dict_type(
            model, StateDictType.FULL_STATE_DICT,
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=ranks.device.type != "cpu"))
        return model
    if ranks.world > 1:
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(output_dir: Path, name: str, draft: MSDDraftModel, state: dict) -> Path:
    """Write ``output_dir/name`` atomically (temporary folder, rename), then point ``last`` at it."""
    final, temporary = output_dir / name, output_dir / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    save_draft(draft, temporary)
    torch.save(state, temporary / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    pointer = output_dir / f".{LAST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, output_dir / LAST_FILE)
    return final


def _rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``output_dir/last`` names, or None before the first one."""
    pointer = Path(output_dir) / LAST_FILE
    return Path(output_dir) / pointer.read_text().strip() if pointer.is_file() else None


def _noise_generator(device: torch.device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The feature-noise stream of one micro-batch: a pure function of its place in the run,
    so resuming needs no generator state (hashes of int tuples are the same in every process)."""
    return torch.Generator(device).manual_seed(hash((seed, step, micro, rank)) & (2**63 - 1))


# ---------------------------------------------------------------------- metrics
class _Metrics:
    """Per-step rows in ``metrics.csv`` (and TensorBoard when asked); rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool):
        self.path = output_dir / METRICS_FILE
        rows = []
        if self.path.is_file():  # a resumed run drops the rows logged after its checkpoint
            with open(self.path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 - open for the run, see close()
        self.writer = csv.DictWriter(self.file, METRICS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(f"tensorboard logging needs the tensorboard package: {error}") from None
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "vloss", "ploss", "accuracy", "lr", "samples_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            if row.get("tau") is not None:
                self.tensorboard.add_scalar("eval/tau", row["tau"], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------- the loop
def _check_options(config: TrainConfig) -> None:
    """Reject bad settings before anything slow is loaded; the message names the option."""
    for name in ("epochs", "batch_size", "grad_accum", "eval_samples", "eval_max_new_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {config.eval_every}")
    if config.eval_data is None:
        if config.eval_every:
            raise ValueError(f"eval_every={config.eval_every} needs eval_data (the held-out prompts)")
        return
    if not Path(config.eval_data).is_file():
        raise FileNotFoundError(f"eval_data {config.eval_data} does not exist")
    if config.eval_image_folder is not None and not Path(config.eval_image_folder).is_dir():
        raise FileNotFoundError(f"eval_image_folder {config.eval_image_folder} is not a folder")


def train(config: TrainConfig) -> Path:
    """Train an MSD draft; returns the last checkpoint folder (a released-layout draft that
    ``SpeculativeLLaVA`` / :func:`msd.draft_checkpoint.load_draft` load)."""
    ranks = _setup_ranks(config)
    try:
        return _Run(config, ranks).run()
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


class _Run:
    """The state of one training run (one per rank)."""

    def __init__(self, config: TrainConfig, ranks: _Ranks):
        _check_options(config)
        self.config, self.ranks, device = config, ranks, ranks.device
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _, self.dtype = _device_and_dtype(config.device, config.bf16)
        self.autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                enabled=self.dtype == torch.bfloat16)

        target = _load_target(config.target, self.dtype)
        processor = AutoProcessor.from_pretrained(config.processor or config.target) if (
            config.eval_data or not config.features_dir) else None
        if config.features_dir:  # the target only lends its head (and the fresh draft's embeddings)
            self.extractor = None
            datasets = _feature_datasets(config.features_dir)
            collate_fn = _collate_shards
            if config.eval_data and ranks.main:  # the evaluation runs the whole target
                target.to(device)
            lm_head = target.get_output_embeddings().to(device)
        else:
            datasets = build_datasets(config.text_data, config.multimodal_data, config.image_folder, processor,
                                      config.max_length, target.config)
            collate_fn = partial(_collate_records, pad_id=next(iter(datasets.values())).pad_id)
            self.extractor = TargetFeatureExtractor(target.to(device))
            lm_head = target.get_output_embeddings()
        self.datasets = datasets
        skipped = _skipped(datasets, ranks)
        if ranks.main and skipped:
            logger.warning("skipped records found when scanning the data: %s", dict(skipped))

        text_size = len(datasets.get(TEXT_FEATURES, ()))
        multimodal_size = len(datasets.get(MULTIMODAL_FEATURES, ()))
        fixed = None if text_size and multimodal_size else float(multimodal_size > 0)
        self.sampler = CurriculumSampler(text_size, multimodal_size, epoch=1, total_epochs=config.epochs,
                                         seed=config.seed, num_replicas=ranks.world, rank=ranks.rank,
                                         samples_per_epoch=config.samples_per_epoch, probability=fixed)
        tagged = [_Tagged(datasets[kind], kind == MULTIMODAL_FEATURES)
                  for kind in (TEXT_FEATURES, MULTIMODAL_FEATURES) if kind in datasets]
        self.loader = DataLoader(ConcatDataset(tagged), batch_size=config.batch_size, sampler=self.sampler,
                                 collate_fn=collate_fn, num_workers=config.num_workers)

        if config.init_draft:
            draft = load_draft(config.init_draft, target, dtype=torch.float32, device="cpu")
            if draft.decouple_visual != config.decouple_visual:
                raise ValueError(f"init_draft {config.init_draft} has decouple_visual={draft.decouple_visual}, "
                                 f"this run asks for {config.decouple_visual}")
        else:
            draft = _fresh_draft(target, config.seed, config.decouple_visual)
        draft.set_lm_head(lm_head)
        self.draft = draft.to(device).train()
        # Built before FSDP shards the draft: the evaluator copies it.
        self.evaluator = self._evaluator(target, processor) if config.eval_data and ranks.main else None
        self.draft_forward = DraftTrainingForward(self.draft, config.gradient_checkpointing)
        self.model = _wrap(self.draft_forward, config, ranks)
        self.optimizer = make_optimizer(self.model.parameters(), lr=config.lr)
        batches = len(self.loader)
        self.steps_per_epoch = -(-batches // config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.scheduler = make_schedule(self.optimizer, total_steps=total, warmup_steps=min(config.warmup_steps, total))
        self.step, self.epoch, self.consumed = 0, 1, 0
        self.last_tau = None  # shown in the progress bar
        if config.resume:
            self._resume()
        self.metrics = _Metrics(self.output_dir, self.step, config.tensorboard) if ranks.main else None

    def _evaluator(self, target, processor) -> TauEvaluator:
        """The tau evaluator of ``eval_data`` (rank 0's)."""
        config = self.config
        prompts = first_turn_prompts(config.eval_data, config.eval_image_folder or config.image_folder, processor,
                                     config.eval_samples, prompt_template(target.config, processor))
        try:
            evaluator = TauEvaluator(target, self.draft, prompts, config.eval_max_new_tokens, top_k=config.eval_top_k,
                                     depth=config.eval_depth, total_tokens=config.eval_total_tokens)
        except ValueError as error:  # the engine's checks of the tree settings
            raise ValueError(f"eval_top_k / eval_depth / eval_total_tokens: {error}") from None
        limit = target.config.get_text_config().max_position_embeddings
        longest = max(prompt["input_ids"].shape[1] for prompt in prompts)
        if longest + config.eval_max_new_tokens > limit:
            raise ValueError(f"eval_max_new_tokens={config.eval_max_new_tokens} after a {longest}-token eval prompt "
                             f"exceeds the target's {limit} positions")
        return evaluator

    # -------------------------------------------------------------- resume
    def _resume(self) -> None:
        folder = last_checkpoint(self.output_dir)
        if folder is None:
            raise FileNotFoundError(f"resume: {self.output_dir} has no checkpoint ({LAST_FILE} is missing)")
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        for key in RESUME_KEYS:
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(f"resume: the checkpoint was trained with {key}={state['config'][key]}, "
                                 f"this run has {getattr(self.config, key)}")
        weights = check_keys(read_state_dict(folder), self.draft.config.qkv_bias)
        if self.config.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.model, writeback=True):
                self.draft.load_state_dict(weights, strict=False)
            optimizer_state = FullyShardedDataParallel.optim_state_dict_to_load(
                self.model, self.optimizer, state["optimizer"])
        else:
            self.draft.load_state_dict(weights, strict=False)
            optimizer_state = state["optimizer"]
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_states(state["rng"], self.ranks.device)
        self.step, self.epoch = state["step"], state["epoch"]
        if state["sampler"]["start"] >= len(self.sampler):  # stopped at the epoch's end
            self.epoch += 1
            if self.epoch <= self.config.epochs:
                self.sampler.set_epoch(self.epoch)
        if self.ranks.main:
            logger.info("resumed from %s (epoch %d, step %d)", folder, self.epoch, self.step)

    def _full_weights(self):
        """A context in which rank 0's ``self.draft`` holds all its weights (FSDP gathers the
        shards: collective, every rank enters it)."""
        if not self.config.fsdp:
            return nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.model, writeback=False, rank0_only=True)

    def _checkpoint(self, name: str) -> Path:
        """Write checkpoint ``name`` (collective under FSDP: every rank calls it)."""
        optimizer_state = None
        if self.config.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            optimizer_state = FullyShardedDataParallel.optim_state_dict(self.model, self.optimizer)
        with self._full_weights():
            if self.ranks.main:
                state = {"step": self.step, "epoch": self.epoch, "sampler": self.sampler.state_dict(self.consumed),
                         "optimizer": optimizer_state or self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "rng": _rng_states(self.ranks.device),
                         "config": dataclasses.asdict(self.config)}
                _save_checkpoint(self.output_dir, name, self.draft, state)
        return self.output_dir / name

    # -------------------------------------------------------------- training
    def run(self) -> Path:
        """Train to the end (or ``max_steps``); returns the last checkpoint folder."""
        final = last_checkpoint(self.output_dir) if self.config.resume else None
        while self.epoch <= self.config.epochs and not self._stopped():
            final = self._epoch() or final
        total = _skipped(self.datasets, self.ranks)
        if self.ranks.main:
            if total:
                logger.warning("skipped records in all: %s", dict(total))
            self.metrics.close()
        if self.ranks.world > 1:
            dist.barrier()  # rank 0's last checkpoint is complete for everyone
        return final

    def _stopped(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _epoch(self) -> Path | None:
        """Train the rest of the current epoch (from the sampler's position), checkpoint at its
        end and move the sampler to the next epoch; returns the last checkpoint written."""
        config, written = self.config, None
        # Sampler indices left in this epoch on this rank; ``consumed`` counts from there.
        remaining = len(self.sampler) - self.sampler.state_dict(0)["start"]
        self.consumed = 0
        batches = iter(self.loader)
        steps = -(-remaining // (config.batch_size * config.grad_accum))
        bar = tqdm(total=steps, disable=not (config.progress and self.ranks.main),
                   desc=f"epoch {self.epoch}/{config.epochs}")
        with bar:
            for taken in range(1, steps + 1):
                window = list(islice(batches, config.grad_accum))
                self.consumed = min(remaining, self.consumed + len(window) * config.batch_size)
                row = self._optimizer_step(window)
                bar.update()
                if row is not None and config.eval_data and (
                        config.eval_every and self.step % config.eval_every == 0 or taken == steps
                        or self._stopped()):
                    row["tau"] = self._evaluate()
                if row is not None and self.ranks.main:
                    self.metrics.write(row)
                    if self.step % config.log_every == 0 or row.get("tau") is not None:
                        bar.set_postfix(self._postfix(row))
                if row is not None and (config.save_every and self.step % config.save_every == 0
                                        or self._stopped()):
                    written = self._checkpoint(f"step-{self.step:06d}")
                if self._stopped():
                    return written
        written = self._checkpoint(f"epoch-{self.epoch:02d}")
        self.epoch += 1
        if self.epoch <= config.epochs:
            self.sampler.set_epoch(self.epoch)
        return written

    def _postfix(self, row: dict) -> dict[str, str]:
        """The progress bar's figures: the step's, and the last evaluated tau."""
        if row.get("tau") is not None:
            self.last_tau = row["tau"]
        postfix = {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.3f}", "lr": f"{row['lr']:.2e}"}
        return postfix | ({"tau": f"{self.last_tau:.2f}"} if self.last_tau is not None else {})

    def _evaluate(self) -> float | None:
        """The current draft's tau on the eval prompts: rank 0's value, None on the others
        (which wait). Training is left exactly as it was: the engine runs a copy of the draft,
        without autocast or gradients, and the random number streams are restored after it."""
        states = _rng_states(self.ranks.device)
        tau = None
        with self._full_weights():
            if self.ranks.main:
                tau = self.evaluator(self.draft)
        _set_rng_states(states, self.ranks.device)
        if self.ranks.world > 1:
            dist.barrier()
        return tau

    def _optimizer_step(self, window: list[dict | None]) -> dict | None:
        """One optimiser step over ``window``'s micro-batches (this rank's); returns its
        metrics row, or None when the whole step (all ranks) had no answer token."""
        config, ranks, device = self.config, self.ranks, self.ranks.device
        started = time.perf_counter()
        inputs = [_draft_inputs(batch, self.extractor, device, self.dtype) for batch in window]
        local_tokens = sum(float(x["loss_mask"].sum()) for x in inputs if x is not None)
        (tokens,) = _all_reduce([local_tokens], ranks, device)
        if tokens == 0:
            logger.warning("step %d: no answer token in its records (all skipped?): no update", self.step + 1)
            return None
        sums = torch.zeros(3, dtype=torch.float64)  # token-weighted vloss, ploss, accuracy
        for micro, x in enumerate(inputs):
            x = x or _empty_inputs(self.draft.config.hidden_size, device, self.dtype)
            if config.noise_scale:
                noise = _noise_generator(device, config.seed, self.step, micro, ranks.rank)
                x["features"] = feature_noise(x["features"], x["attention_mask"], noise, config.noise_scale)
            # Gradients are all-reduced on the step's last micro-batch only.
            last = micro == len(inputs) - 1
            with nullcontext() if last or self.model is self.draft_forward else self.model.no_sync():
                with self.autocast():
                    terms = msd_loss(self.model(x), x["target"], self.draft.compute_logits, x["loss_mask"],
                                     config.v_weight, config.p_weight)
                # Sum of this micro-batch's token losses over the step's tokens; x world undoes
                # DDP's gradient averaging over the ranks.
                (terms.loss * terms.tokens * (ranks.world / tokens)).backward()
            sums += torch.stack([terms.vloss, terms.ploss, terms.accuracy]).detach().double().cpu() * float(
                terms.tokens)
        if config.fsdp:
            self.model.clip_grad_norm_(config.grad_clip)
        else:
            nn.utils.clip_grad_norm_(self.draft.parameters(), config.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        samples = sum(batch["samples"] for batch in window if batch is not None)
        multimodal = sum(batch["multimodal"] for batch in window if batch is not None)
        vloss, ploss, accuracy, samples, multimodal = _all_reduce([*sums.tolist(), samples, multimodal], ranks,
                                                                  device)
        vloss, ploss, accuracy = vloss / tokens, ploss / tokens, accuracy / tokens
        return {"step": self.step, "epoch": self.epoch, "loss": config.v_weight * vloss + config.p_weight * ploss,
                "vloss": vloss, "ploss": ploss, "accuracy": accuracy, "lr": lr,
                "samples_per_s": samples / (time.perf_counter() - started), "samples": int(samples),
                "multimodal_samples": int(multimodal), "tokens": int(tokens)}
