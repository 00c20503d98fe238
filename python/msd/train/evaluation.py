"""Acceptance length tau of a draft with the real engine: the pooled greedy measure shared by
the demo / ablation (:func:`greedy_tau`) and the periodic evaluation of ``msd train``
(:class:`TauEvaluator`, prompts from :func:`first_turn_prompts`, set up from the run's
options by :func:`run_evaluator` and run by :func:`evaluate_during_training`).

tau is pooled over all prompts: tokens after the first over target verification forwards, so
long answers weigh more.

Evaluating leaves the training untouched: a run with evaluation trains the same weights,
bitwise (the engine runs a copy of the draft; the random number streams are restored).
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

from msd.draft import MSDDraftModel
from msd.draft_eagle3 import Eagle3DraftModel
from msd.engine import SpeculativeLLaVA
from msd.train.checkpointing import rng_states, set_rng_states
from msd.train.config import TrainConfig
from msd.train.data import MultimodalConversationDataset, TextConversationDataset
from msd.train.distributed import Ranks, barrier, gathered_weights
from msd.train.step import TrainingStep
from msd.train.target_data import prompt_template
from msd.train.template import render_llava_v1


def greedy_tau(engine: SpeculativeLLaVA, prompts: list[dict], max_new_tokens: int) -> tuple[float, list[torch.Tensor]]:
    """Greedy MSD on every prompt: the pooled tau and the outputs (prompt + new tokens)."""
    outputs, produced, forwards = [], 0, 0
    for inputs in prompts:
        outputs.append(engine.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens))
        stats = engine.last_stats
        produced += stats.new_tokens - 1  # the prefill's token is not a verification's
        forwards += stats.steps
    return produced / max(forwards, 1), outputs


def first_turn_prompts(json_path: str | Path, image_folder: str | Path | None, processor, count: int,
                       render=render_llava_v1) -> list[BatchFeature]:
    """Model inputs of the first user turn of the first ``count`` usable records of a ShareGPT /
    LLaVA JSON, rendered as the draft is trained on it (``render``, the prompt ``msd generate``
    gives the target: the ``llava_v1`` template's ``USER: <image>\\n... ASSISTANT:`` or the
    processor's chat template up to its generation prompt); an ``"image"`` is relative to
    ``image_folder``. Records the training data would skip are skipped (and logged) alike."""
    if image_folder is None:
        records = TextConversationDataset(json_path, processor.tokenizer, max_length=0, render=render)
    else:
        records = MultimodalConversationDataset(json_path, image_folder, processor, max_length=0, render=render)
    prompts = []
    for _, record, segments in records.samples[:count]:
        text, _ = segments[0]  # the first question up to where the answer starts
        images = None
        if image_folder is not None and "image" in record:
            with Image.open(Path(image_folder) / record["image"]) as image:
                images = image.convert("RGB")
        prompts.append(processor(images=images, text=text, return_tensors="pt"))
    if not prompts:
        raise ValueError(f"{json_path} holds no usable record to evaluate on")
    return prompts


class TauEvaluator:
    """Greedy tau of a training draft's current weights on fixed prompts.

    The engine runs a private copy of the draft in the target's dtype, on the target's device:
    what ``SpeculativeLLaVA.from_pretrained`` makes of a checkpoint of those weights, without
    touching the training draft (its mode, dtype, gradients).
    """

    def __init__(self, target, draft: MSDDraftModel, prompts: list[BatchFeature], max_new_tokens: int, *, top_k: int,
                 depth: int, total_tokens: int):
        device = target.get_output_embeddings().weight.device
        # memo: an MSD draft's copy shares the target's lm_head instead of duplicating it (an
        # EAGLE-3-style draft's lm_head is its own, trained: copied with the rest).
        shared = {} if isinstance(draft, Eagle3DraftModel) else {id(draft.lm_head): draft.lm_head}
        copy = deepcopy(draft, memo=shared)
        self.draft = copy.to(device=device, dtype=target.dtype).requires_grad_(False)
        self.engine = SpeculativeLLaVA(target, self.draft, top_k=top_k, depth=depth, total_tokens=total_tokens)
        self.prompts = [prompt.to(device, dtype=target.dtype) for prompt in prompts]  # dtype: floats only
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, draft: MSDDraftModel) -> float:
        """tau of ``draft``'s current weights (all of them present: FSDP gathers them first)."""
        self.draft.load_state_dict(draft.state_dict())
        tau, _ = greedy_tau(self.engine, self.prompts, self.max_new_tokens)
        return tau


def run_evaluator(config: TrainConfig, target, draft: MSDDraftModel, processor) -> TauEvaluator:
    """The tau evaluator of a run's ``eval_data`` (rank 0's), made before FSDP shards the
    draft (it copies it); an engine setting the prompts do not fit names its option."""
    prompts = first_turn_prompts(config.eval_data, config.eval_image_folder or config.image_folder, processor,
                                 config.eval_samples, prompt_template(target.config, processor))
    try:
        evaluator = TauEvaluator(target, draft, prompts, config.eval_max_new_tokens, top_k=config.eval_top_k,
                                 depth=config.eval_depth, total_tokens=config.eval_total_tokens)
    except ValueError as error:  # the engine's checks of the tree settings
        raise ValueError(f"eval_top_k / eval_depth / eval_total_tokens: {error}") from None
    limit = target.config.get_text_config().max_position_embeddings
    longest = max(prompt["input_ids"].shape[1] for prompt in prompts)
    if longest + config.eval_max_new_tokens > limit:
        raise ValueError(f"eval_max_new_tokens={config.eval_max_new_tokens} after a {longest}-token eval prompt "
                         f"exceeds the target's {limit} positions")
    return evaluator


def evaluate_during_training(evaluator: TauEvaluator | None, training_step: TrainingStep, fsdp: bool,
                             ranks: Ranks) -> float | None:
    """The current draft's tau on the eval prompts: rank 0's value (its ``evaluator``), None on
    the others (which wait; every rank calls it). Training is left exactly as it was: the
    engine runs a copy of the draft, without autocast or gradients, and the random number
    streams are restored after it."""
    states = rng_states(ranks.device)
    tau = None
    with gathered_weights(training_step.model, fsdp):
        if ranks.main:
            tau = evaluator(training_step.draft)
    set_rng_states(states, ranks.device)
    barrier(ranks)
    return tau
