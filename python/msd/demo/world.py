"""The demo's small world: procedurally drawn scenes and conversations about them.

A scene holds one to four coloured shapes, each in its own slot of a 3x3 grid (the five
named positions top / left / centre / right / bottom). Scenes are rendered with Pillow, one
slot per 32-pixel cell, so that at the vision tower's 48-pixel input each 16-pixel patch
sees exactly one slot. Questions about a scene are phrased in varied ways; each kind of
question has one answer template, so a well-trained target answers confidently and its
answers are checkable against the scene.

The stage-1 corpus is text only: arithmetic and counting in words, facts about shapes and
colours, and scenes told in words. Everything is drawn from ``random.Random(seed)``, so the
same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 135, 30),
}
BACKGROUND = (245, 245, 240)
# Position name -> (row, column) of its grid cell, in the order descriptions list them.
POSITIONS = {"top": (0, 1), "left": (1, 0), "centre": (1, 1), "right": (1, 2), "bottom": (2, 1)}
WHERE = {"top": "at the top", "left": "on the left", "centre": "in the centre", "right": "on the right",
         "bottom": "at the bottom"}
CELL = 32
IMAGE_SIZE = 3 * CELL
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
IMAGE_PLACEHOLDER = "<image>\n"  # LLaVA data puts the image first in the first question
DEFAULT_QUESTION = "Describe the image."  # the demo's question

WORLD_JSON, TEXT_JSON, SCENES_JSON, IMAGE_FOLDER = "llava.json", "sharegpt.json", "scenes.json", "images"


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def a_name(self) -> str:
        """The name with its indefinite article: "a red star", "an orange circle"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"


@dataclass(frozen=True)
class Scene:
    """One to four things in distinct positions, listed in ``POSITIONS`` order."""

    things: tuple[Thing, ...]

    def at(self, position: str) -> Thing | None:
        return next((thing for thing in self.things if thing.position == position), None)

    def of_shape(self, shape: str) -> list[Thing]:
        return [thing for thing in self.things if thing.shape == shape]

    def to_json(self) -> list[list[str]]:
        return [[thing.shape, thing.colour, thing.position] for thing in self.things]

    @classmethod
    def from_json(cls, raw: list[list[str]]) -> Scene:
        return cls(tuple(Thing(*fields) for fields in raw))


def random_scene(rng: random.Random) -> Scene:
    """A scene of one to four random things in random distinct positions."""
    positions = set(rng.sample(list(POSITIONS), rng.randint(1, 4)))
    return Scene(tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), position)
                       for position in POSITIONS if position in positions))


# ---------------------------------------------------------------------- rendering
def render(scene: Scene) -> Image.Image:
    """The scene as an ``IMAGE_SIZE`` square RGB image: each thing fills most of its cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        row, column = POSITIONS[thing.position]
        _draw_shape(draw, thing.shape, COLOURS[thing.colour], (column + 0.5) * CELL, (row + 0.5) * CELL,
                    0.4 * CELL)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill, x: float, y: float, r: float) -> None:
    """Draw ``shape`` centred at ``(x, y)`` within radius ``r``."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x, y, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _star_points(x: float, y: float, r: float) -> list[tuple[float, float]]:
    """The ten vertices of a five-pointed star, point up."""
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.42 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


# ---------------------------------------------------------------------- questions about a scene
def _count_phrase(n: int, noun: str) -> str:
    """``"There is one circle."`` / ``"There are two circles."`` / ``"There are no circles."``"""
    if n == 1:
        return f"There is one {noun}."
    return f"There are {NUMBERS[n] if n else 'no'} {noun}s."


def describe(scene: Scene) -> str:
    """The answer to "Describe the image.": the count, then each thing in position order."""
    parts = [_count_phrase(len(scene.things), "object")]
    parts += [f"{WHERE[thing.position].capitalize()} there is {thing.a_name}." for thing in scene.things]
    return " ".join(parts)


def read_description(text: str) -> dict[str, tuple[str, str]]:
    """``{position: (colour, shape)}`` of the things a description in :func:`describe`'s words
    states (its other sentences are ignored): how a model's answer is scored."""
    return {_PLACE[place.lower()]: (colour, shape) for place, colour, shape in _DESCRIBED.findall(text)}


_PLACE = {where: position for position, where in WHERE.items()}
_DESCRIBED = re.compile(rf"({'|'.join(WHERE.values())}) there is an? (\w+) (\w+)\.", re.IGNORECASE)


def _ask_describe(scene, rng):
    question = rng.choice([DEFAULT_QUESTION, "What do you see in the picture?", "Describe this picture.",
                           "What is in the image?", "Tell me what the image shows."])
    return question, describe(scene)


def _ask_count_shape(scene, rng):
    shape = rng.choice(SHAPES)
    question = rng.choice(["How many {}s are there?", "How many {}s can you see?", "Count the {}s.",
                           "How many {}s are in the picture?"]).format(shape)
    return question, _count_phrase(len(scene.of_shape(shape)), shape)


def _ask_count_all(scene, rng):
    question = rng.choice(["How many objects are there?", "How many shapes are in the image?",
                           "How many things can you see?", "Count the objects."])
    return question, _count_phrase(len(scene.things), "object")


def _ask_colour(scene, rng):
    unique = [thing for thing in scene.things if len(scene.of_shape(thing.shape)) == 1]
    if not unique:
        return None
    thing = rng.choice(unique)
    question = rng.choice(["What colour is the {}?", "Which colour is the {}?", "What is the colour of the {}?",
                           "Tell me the colour of the {}."]).format(thing.shape)
    return question, f"The {thing.shape} is {thing.colour}."


def _ask_position(scene, rng):
    position = rng.choice(list(POSITIONS))
    where = WHERE[position]
    question = rng.choice(["What is {}?", "Which shape is {}?", "What do you see {}?"]).format(where)
    thing = scene.at(position)
    return question, f"There is {thing.a_name} {where}." if thing else f"There is nothing {where}."


def _ask_where(scene, rng):
    thing = rng.choice(scene.things)
    if sum(other.name == thing.name for other in scene.things) > 1:
        return None
    question = rng.choice(["Where is the {}?", "Where can you see the {}?", "In which place is the {}?"]).format(
        thing.name)
    return question, f"The {thing.name} is {WHERE[thing.position]}."


def _ask_exists(scene, rng):
    asked = rng.choice(scene.things) if rng.random() < 0.5 else Thing(rng.choice(SHAPES),
                                                                          rng.choice(list(COLOURS)), "")
    question = rng.choice(["Is there {}?", "Do you see {}?", "Is there {} in the image?"]).format(asked.a_name)
    found = [thing for thing in scene.things if thing.name == asked.name]
    if found:
        return question, f"Yes, there is {asked.a_name} {WHERE[found[0].position]}."
    return question, f"No, there is no {asked.name}."


SCENE_QUESTIONS: tuple[Callable, ...] = (_ask_describe, _ask_count_shape, _ask_count_all, _ask_colour,
                                         _ask_position, _ask_where, _ask_exists)


def scene_qa(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """``turns`` question/answer pairs about ``scene`` (no question twice); the first one
    describes the image half of the time, since that is the demo's default question."""
    pairs = [_ask_describe(scene, rng)] if rng.random() < 0.5 else []
    while len(pairs) < turns:
        pair = rng.choice(SCENE_QUESTIONS)(scene, rng)
        if pair is not None and pair[0] not in (question for question, _ in pairs):
            pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------- text-only conversations
def _ask_sum(rng):
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    question = rng.choice(["What is {} plus {}?", "How much is {} plus {}?", "Add {} and {}."]).format(
        NUMBERS[a], NUMBERS[b])
    return question, f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."


def _ask_difference(rng):
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    question = rng.choice(["What is {} minus {}?", "How much is {} minus {}?", "Take {1} away from {0}."]).format(
        NUMBERS[a], NUMBERS[b])
    return question, f"{NUMBERS[a].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def _ask_counting(rng):
    start = rng.randint(0, 15)
    stop = rng.randint(start + 2, min(start + 6, 20))
    question = rng.choice(["Count from {} to {}.", "Please count from {} to {}."]).format(
        NUMBERS[start], NUMBERS[stop])
    return question, ", ".join(NUMBERS[n] for n in range(start, stop + 1)).capitalize() + "."


def _ask_next(rng):
    n = rng.randint(0, 19)
    question = rng.choice(["What comes after {}?", "Which number follows {}?"]).format(NUMBERS[n])
    return question, f"{NUMBERS[n + 1].capitalize()} comes after {NUMBERS[n]}."


def _ask_bigger(rng):
    a, b = rng.sample(range(21), 2)
    question = rng.choice(["Which is bigger, {} or {}?", "Which number is larger, {} or {}?"]).format(
        NUMBERS[a], NUMBERS[b])
    big, small = max(a, b), min(a, b)
    return question, f"{NUMBERS[big].capitalize()} is bigger than {NUMBERS[small]}."


SIDES = {"triangle": "A triangle has three sides.", "square": "A square has four sides.",
         "circle": "A circle has no sides, it is round.", "star": "A star has five points."}


def _ask_sides(rng):
    shape = rng.choice(SHAPES)
    question = rng.choice(["How many sides does a {} have?", "Tell me about the sides of a {}."]).format(shape)
    return question, SIDES[shape]


FACTS = {"the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white", "a tomato": "red",
         "an orange": "orange", "a plum": "purple", "the sun": "yellow", "a leaf": "green", "a cherry": "red"}


def _ask_fact(rng):
    thing = rng.choice(list(FACTS))
    question = rng.choice(["What colour is {}?", "Which colour does {} have?"]).format(thing)
    return question, f"{thing[0].upper() + thing[1:]} is {FACTS[thing]}."


MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}


def _ask_mix(rng):
    (a, b), mixed = rng.choice(list(MIXES.items()))
    if rng.random() < 0.5:
        a, b = b, a
    question = rng.choice(["What do you get when you mix {} and {}?", "What colour is {} mixed with {}?"]).format(
        a, b)
    return question, f"Mixing {a} and {b} gives {mixed}."


def _ask_told_scene(rng):
    """A scene told in words, and a question about it: bridges the text and image tasks."""
    scene = random_scene(rng)
    told = " and ".join(f"{thing.a_name} {WHERE[thing.position]}" for thing in scene.things)
    question, answer = rng.choice(SCENE_QUESTIONS[1:])(scene, rng) or _ask_count_all(scene, rng)
    return f"A picture has {told}. {question}", answer


TEXT_QUESTIONS: tuple[Callable, ...] = (_ask_sum, _ask_difference, _ask_counting, _ask_next, _ask_bigger,
                                        _ask_sides, _ask_fact, _ask_mix, _ask_told_scene)


def text_qa(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """``turns`` text-only question/answer pairs on mixed topics."""
    return [rng.choice(TEXT_QUESTIONS)(rng) for _ in range(turns)]


# ---------------------------------------------------------------------- the files
def conversation(pairs: list[tuple[str, str]], image: bool) -> list[dict]:
    """ShareGPT/LLaVA ``conversations`` turns; with ``image`` the first question starts with it."""
    turns = []
    for index, (question, answer) in enumerate(pairs):
        prefix = IMAGE_PLACEHOLDER if image and index == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def build_world(folder: Path, num_scenes: int, num_text: int, seed: int = 0, progress: bool = True) -> None:
    """Write the world into ``folder``: ``images/scene-N.png``, the LLaVA JSON ``llava.json``
    (one record per scene, one to three turns), the ShareGPT JSON ``sharegpt.json``
    (``num_text`` conversations of one to three turns) and ``scenes.json`` (the scene specs)."""
    rng = random.Random(seed)
    images = folder / IMAGE_FOLDER
    images.mkdir(parents=True, exist_ok=True)
    scenes, records = [], []
    for index in tqdm(range(num_scenes), desc="world: drawing scenes", disable=not progress, unit="scene"):
        scene = random_scene(rng)
        name = scene_image(index)
        render(scene).save(images / name)
        scenes.append(scene.to_json())
        records.append({"id": f"scene-{index}", "image": name,
                        "conversations": conversation(scene_qa(scene, rng, rng.randint(1, 3)), image=True)})
    texts = [{"id": f"text-{index}", "conversations": conversation(text_qa(rng, rng.randint(1, 3)), image=False)}
             for index in range(num_text)]
    for name, content in ((WORLD_JSON, records), (TEXT_JSON, texts), (SCENES_JSON, scenes)):
        (folder / name).write_text(json.dumps(content, indent=1), encoding="utf-8")


def scene_image(index: int) -> str:
    """The file name, in the world's image folder, of scene ``index`` (its place in ``scenes.json``)."""
    return f"scene-{index:05d}.png"


def load_scenes(folder: Path) -> list[Scene]:
    """The scene specs :func:`build_world` wrote, in image order."""
    return [Scene.from_json(raw) for raw in json.loads((folder / SCENES_JSON).read_text(encoding="utf-8"))]


def held_out_scene(seed: int, seen: set[Scene]) -> Scene:
    """A scene drawn from ``seed`` that is not among the training scenes ``seen``."""
    rng = random.Random(f"held-out-{seed}")
    while (scene := random_scene(rng)) in seen:
        pass
    return scene
