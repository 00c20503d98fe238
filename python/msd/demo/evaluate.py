"""Acceptance length on held-out demo scenes: how the learning test and the ablation
benchmark (``benchmarks/ablation.py``) score a draft.

A prompt is a scene that is in no training data (:func:`msd.demo.world.held_out_scene`) with
one question about it, phrased as the world phrases them; tau is pooled over all prompts
(tokens after the first over target verification forwards), so long answers weigh more.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from msd.cli import encode_prompt
from msd.demo.world import held_out_scene, load_scenes, render, scene_qa
from msd.engine import SpeculativeLLaVA


def held_out_prompts(world: Path, processor, count: int) -> list[dict]:
    """``count`` model inputs, each a held-out scene (seeds 0..count-1) and a question about it."""
    seen = set(load_scenes(world))
    prompts = []
    for seed in range(count):
        scene = held_out_scene(seed, seen)
        (question, _), = scene_qa(scene, random.Random(seed), turns=1)
        prompts.append(encode_prompt(processor, question, [render(scene)]))
    return prompts


def greedy_tau(engine: SpeculativeLLaVA, prompts: list[dict], max_new_tokens: int) -> tuple[float, list[torch.Tensor]]:
    """Greedy MSD on every prompt: the pooled tau and the outputs (prompt + new tokens)."""
    outputs, produced, forwards = [], 0, 0
    for inputs in prompts:
        outputs.append(engine.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens))
        stats = engine.last_stats
        produced += stats.new_tokens - 1  # the prefill's token is not a verification's
        forwards += stats.steps
    return produced / max(forwards, 1), outputs
