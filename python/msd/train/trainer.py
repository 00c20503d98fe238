"""The MSD draft training run (MSD_SPEC.md section 4): ``msd train`` and :func:`train`.

One optimiser step takes ``grad_accum`` micro-batches of ``batch_size`` samples per rank.
Each micro-batch goes: curriculum-sampled records (:mod:`msd.train.datasets`) ->
:func:`msd.train.data.collate` -> the frozen target's features, online or read from
``msd features`` shards (:mod:`msd.train.capture`) -> the draft's training step
(:mod:`msd.train.step`: feature noise, the draft with a causal, padding-masked attention,
:func:`msd.train.losses.msd_loss`, the optimiser step).

This module is the orchestration: it sets the run up from :class:`TrainConfig`
(:mod:`msd.train.config`) and runs the epochs, deciding when to evaluate, log, checkpoint
and stop. The parts live beside it:

- :mod:`msd.train.distributed`: data parallel under ``torchrun`` (``python -m msd.train
  ...``); each rank draws its own share of the curriculum stream
  (``CurriculumSampler(num_replicas, rank)``), the draft is wrapped in
  ``DistributedDataParallel`` (nccl on CUDA, gloo on CPU) or, with ``fsdp``,
  ``FullyShardedDataParallel`` (either backend).
- :mod:`msd.train.checkpointing`: ``output_dir/step-XXXXXX/`` every ``save_every`` steps and
  ``output_dir/epoch-XX/`` at each epoch end (rank 0 writes them), named in
  ``output_dir/last``; a resumed run repeats an uninterrupted one exactly (bitwise on CPU).
- :mod:`msd.train.evaluation` (``eval_data``): at each epoch end, at the last step and every
  ``eval_every`` steps, rank 0 measures the greedy tau of the real engine
  (:class:`SpeculativeLLaVA`, the frozen target with a copy of the current draft) on
  held-out first user turns, leaving the training untouched.
- :mod:`msd.train.metrics`: ``metrics.csv`` (the ``tau`` column empty on steps without
  evaluation), TensorBoard (``eval/tau``), the progress bar.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoProcessor

from msd.train.capture import draft_inputs, load_target, run_feature_layers
from msd.train.checkpointing import Checkpoints, last_checkpoint
from msd.train.config import TrainConfig, check_options, device_and_dtype
from msd.train.datasets import (
    build_datasets,
    collate_records,
    collate_shards,
    curriculum_loader,
    feature_datasets,
    skipped_records,
)
from msd.train.distributed import Ranks, all_reduce, barrier, release_ranks, setup_ranks, sum_counts
from msd.train.evaluation import evaluate_during_training, run_evaluator
from msd.train.metrics import MetricsLog
from msd.train.step import training_draft, training_step
from msd.train.target_features import TargetFeatureExtractor
from msd.train.vocabulary import count_answer_tokens

logger = logging.getLogger(__name__)


def train(config: TrainConfig) -> Path:
    """Train an MSD draft; returns the last checkpoint folder (a released-layout draft that
    ``SpeculativeLLaVA`` / :func:`msd.draft_checkpoint.load_draft` load)."""
    ranks = setup_ranks(config)
    try:
        last = _Run(config, ranks).run()
        # Every rank's collectives are done before any rank destroys the group: a rank that
        # left early while gloo still ran FSDP's last collective aborted at exit, now and then.
        barrier(ranks)
        return last
    finally:
        release_ranks(ranks)


class _Run:
    """The state of one training run (one per rank)."""

    def __init__(self, config: TrainConfig, ranks: Ranks):
        check_options(config)
        self.config, self.ranks, device = config, ranks, ranks.device
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _, self.dtype = device_and_dtype(config.device, config.bf16)

        target = load_target(config.target, self.dtype)
        feature_layers = run_feature_layers(config, target)
        processor = AutoProcessor.from_pretrained(config.processor or config.target) if (
            config.eval_data or not config.features_dir) else None
        if config.features_dir:  # the target only lends its head (and the fresh draft's embeddings)
            self.extractor = None
            datasets = feature_datasets(config.features_dir)
            stored = {dataset.feature_layers for dataset in datasets.values()}
            if stored != {feature_layers}:
                raise ValueError(f"features_dir {config.features_dir} holds the features of layers {stored.pop()}, "
                                 f"this draft reads {feature_layers}: run msd features with the same draft options")
            collate_fn = collate_shards
            if config.eval_data and ranks.main:  # the evaluation runs the whole target
                target.to(device)
            lm_head = target.get_output_embeddings().to(device)
        else:
            datasets = build_datasets(config.text_data, config.multimodal_data, config.image_folder, processor,
                                      config.max_length, target.config)
            collate_fn = partial(collate_records, pad_id=next(iter(datasets.values())).pad_id)
            self.extractor = TargetFeatureExtractor(target.to(device), feature_layers)
            lm_head = target.get_output_embeddings()
        self.datasets = datasets
        skipped = sum_counts(skipped_records(datasets), ranks)
        if ranks.main and skipped:
            logger.warning("skipped records found when scanning the data: %s", dict(skipped))
        self.sampler, self.loader = curriculum_loader(datasets, collate_fn, config, ranks.world, ranks.rank)

        counts = None
        if config.draft_kind == "eagle3" and config.draft_vocab_size is not None and not config.init_draft:
            counts = count_answer_tokens(dataset[i] for dataset in datasets.values() for i in range(len(dataset)))
        draft = training_draft(config, target, lm_head, device, counts)
        # Built before FSDP shards the draft: the evaluator copies it.
        self.evaluator = run_evaluator(config, target, draft, processor) if config.eval_data and ranks.main else None
        total_steps = -(-len(self.loader) // config.grad_accum) * config.epochs
        self.training_step = training_step(draft, lm_head, config, ranks, self.dtype, total_steps)
        self.checkpoints = Checkpoints(self.output_dir, config, ranks, self.training_step, self.sampler)
        self.step, self.epoch, self.consumed = 0, 1, 0
        if config.resume:
            self._resume()
        self.metrics = MetricsLog(self.output_dir, self.step, config.tensorboard) if ranks.main else None

    def _resume(self) -> None:
        """Continue from the checkpoint ``last`` names, at the step and epoch it was saved in."""
        folder, state = self.checkpoints.restore_last()
        self.step, self.epoch = state["step"], state["epoch"]
        if state["sampler"]["start"] >= len(self.sampler):  # stopped at the epoch's end
            self.epoch += 1
            if self.epoch <= self.config.epochs:
                self.sampler.set_epoch(self.epoch)
        if self.ranks.main:
            logger.info("resumed from %s (epoch %d, step %d)", folder, self.epoch, self.step)

    def _checkpoint(self, name: str) -> Path:
        """Write checkpoint ``name`` (collective under FSDP: every rank calls it)."""
        return self.checkpoints.save(name, self.step, self.epoch, self.consumed)

    def run(self) -> Path:
        """Train to the end (or ``max_steps``); returns the last checkpoint folder."""
        final = last_checkpoint(self.output_dir) if self.config.resume else None
        while self.epoch <= self.config.epochs and not self._stopped():
            final = self._epoch() or final
        total = sum_counts(skipped_records(self.datasets), self.ranks)
        if self.ranks.main:
            if total:
                logger.warning("skipped records in all: %s", dict(total))
            self.metrics.close()
        barrier(self.ranks)  # rank 0's last checkpoint is complete for everyone
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
                    row["tau"] = evaluate_during_training(self.evaluator, self.training_step, config.fsdp,
                                                          self.ranks)
                if row is not None and self.ranks.main:
                    self.metrics.write(row)
                    if self.step % config.log_every == 0 or row.get("tau") is not None:
                        bar.set_postfix(self.metrics.postfix(row))
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

    def _optimizer_step(self, window: list[dict | None]) -> dict | None:
        """One optimiser step over ``window``'s micro-batches (this rank's); returns its
        metrics row, or None when the whole step (all ranks) had no answer token."""
        ranks, device = self.ranks, self.ranks.device
        started = time.perf_counter()
        inputs = [draft_inputs(batch, self.extractor, device, self.dtype) for batch in window]
        result = self.training_step(inputs, self.step)
        if result is None:
            return None
        self.step += 1
        samples = sum(batch["samples"] for batch in window if batch is not None)
        multimodal = sum(batch["multimodal"] for batch in window if batch is not None)
        # One collective for the loss sums and the sample counts.
        *sums, samples, multimodal = all_reduce([*result.sums.values(), samples, multimodal], ranks)
        return {"step": self.step, "epoch": self.epoch,
                **self.training_step.mean_terms(dict(zip(result.sums, sums)), result.tokens), "lr": result.lr,
                "samples_per_s": samples / (time.perf_counter() - started), "samples": int(samples),
                "multimodal_samples": int(multimodal), "tokens": int(result.tokens)}
