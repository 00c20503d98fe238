"""Scores on held-out demo scenes (scenes in no training data, :func:`msd.demo.world.held_out_scene`).

- A target: :func:`score_descriptions`, how well its greedy answers to "Describe the image."
  state each thing of the scene (the demo's build records it and ``msd demo`` shows it).
- A draft: :func:`held_out_prompts` for :func:`msd.train.evaluation.greedy_tau` (shared with
  ``msd train``'s evaluation), its acceptance length with the engine (the learning test and
  the ablation benchmark ``benchmarks/ablation.py``). A prompt is a held-out scene with one
  question about it, phrased as the world phrases them; tau is pooled over all prompts.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from msd.demo.world import DEFAULT_QUESTION, describe, held_out_scene, load_scenes, read_description, render, scene_qa
from msd.prompts import encode_prompt
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


@dataclass
class DescriptionScore:
    """How a target describes ``scenes`` held-out scenes; the rates are fractions of the scenes
    (``exact``) or of their things (the others; a thing counts when the answer states that
    position with the right attribute)."""

    scenes: int
    exact: float  # answers word for word the truth (:func:`msd.demo.world.describe`)
    things: float  # right colour and shape
    colours: float  # right colour (chance: 1/6)
    shapes: float  # right shape (chance: 1/4)

    def summary(self) -> str:
        """One line for the demo: the rates in percent."""
        return (f"the target describes {self.things:.0%} of the things right ({self.colours:.0%} of the colours, "
                f"{self.shapes:.0%} of the shapes) and {self.exact:.0%} of {self.scenes} held-out scenes exactly")

    def to_json(self) -> dict:
        return {name: round(value, 3) for name, value in asdict(self).items()}


@torch.no_grad()
def score_descriptions(model, processor, world: Path, count: int, max_new_tokens: int = 64) -> DescriptionScore:
    """The target ``model``'s greedy answers to "Describe the image." on held-out scenes
    (seeds 0..count-1, those ``msd demo --seed`` shows) scored against the truth."""
    seen = set(load_scenes(world))
    exact, total, things, colours, shapes = 0, 0, 0, 0, 0
    for seed in range(count):
        scene = held_out_scene(seed, seen)
        inputs = encode_prompt(processor, DEFAULT_QUESTION, [render(scene)]).to(model.device)
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        exact += answer.strip() == describe(scene)
        stated = read_description(answer)
        total += len(scene.things)
        for thing in scene.things:
            colour, shape = stated.get(thing.position, (None, None))
            colours += colour == thing.colour
            shapes += shape == thing.shape
            things += (colour, shape) == (thing.colour, thing.shape)
    return DescriptionScore(count, exact / count, things / total, colours / total, shapes / total)
