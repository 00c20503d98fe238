"""Acceptance length on held-out demo scenes: how the learning test and the ablation
benchmark (``benchmarks/ablation.py``) score a draft.

A prompt is a scene that is in no training data (:func:`msd.demo.world.held_out_scene`) with
one question about it, phrased as the world phrases them; tau is pooled over all prompts
(:func:`msd.train.evaluation.greedy_tau`, shared with ``msd train``'s evaluation).
"""

from __future__ import annotations

import random
from pathlib import Path

from msd.cli import encode_prompt
from msd.demo.world import held_out_scene, load_scenes, render, scene_qa
from msd.train.evaluation import greedy_tau  # noqa: F401 - re-exported: the learning test and ablation score with it


def held_out_prompts(world: Path, processor, count: int) -> list[dict]:
    """``count`` model inputs, each a held-out scene (seeds 0..count-1) and a question about it."""
    seen = set(load_scenes(world))
    prompts = []
    for seed in range(count):
        scene = held_out_scene(seed, seen)
        (question, _), = scene_qa(scene, random.Random(seed), turns=1)
        prompts.append(encode_prompt(processor, question, [render(scene)]))
    return prompts
