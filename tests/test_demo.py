"""The demo's world, tokenizer, stage cache and command line, at tiny sizes (no draft training).

The world's answers are checked against the RENDERED images: each grid cell's shape and
colour are read back from probe pixels, and every fact an answer states is checked on that
reading, with patterns written here independently of the generator's templates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from msd.cli import build_parser, main
from msd.demo.evaluate import score_descriptions
from msd.demo.run import MARKER, DemoRecipe, DraftRecipe, Stage, demo_stages, run_demo, run_stages
from msd.demo.target import TargetRecipe, cell_labels, make_target, vision_position_embedding
from msd.demo.tokenizer import VISION_PATCH, build_processor
from msd.demo.world import (
    CELL,
    COLOURS,
    IMAGE_FOLDER,
    NUMBERS,
    POSITIONS,
    SHAPES,
    TEXT_JSON,
    WORLD_JSON,
    build_world,
    held_out_scene,
    load_scenes,
    read_description,
    render,
)
from msd.train.data import MultimodalConversationDataset, TextConversationDataset

SCENES, TEXTS = 60, 60
PLACES = {"at the top": "top", "on the left": "left", "in the centre": "centre", "on the right": "right",
          "at the bottom": "bottom"}
PLACE = "|".join(PLACES)
# Pixel offsets from a cell's centre covered by the first shape listed that covers them: the
# top-right corner region only by a square; low on the axis only by a circle (a triangle's base
# and a star's notch stop above it); a little higher by a triangle; anything else is a star.
PROBES, PROBED_SHAPES = ((10, -10), (0, 11), (0, 8)), ("square", "circle", "triangle")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "world"
    build_world(folder, SCENES, TEXTS, seed=7, progress=False)
    return folder


@pytest.fixture(scope="module")
def processor(world):
    return build_processor(world, world.parent / "processor")


def _records(world: Path, name: str) -> list[dict]:
    return json.loads((world / name).read_text())


def _pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


# ---------------------------------------------------------------------- the world
def test_world_is_deterministic(world, tmp_path):
    build_world(tmp_path / "same", SCENES, TEXTS, seed=7, progress=False)
    build_world(tmp_path / "other", SCENES, TEXTS, seed=8, progress=False)
    for name in (WORLD_JSON, TEXT_JSON, f"{IMAGE_FOLDER}/scene-00003.png"):
        assert (tmp_path / "same" / name).read_bytes() == (world / name).read_bytes(), name
    assert (tmp_path / "other" / WORLD_JSON).read_bytes() != (world / WORLD_JSON).read_bytes()


def read_scene(image: Image.Image) -> dict[str, tuple[str, str]]:
    """``{position: (colour, shape)}`` read from the pixels: the cell centre gives the colour,
    the ``PROBES`` the shape."""
    pixels = image.convert("RGB").load()
    palette = {rgb: name for name, rgb in COLOURS.items()}
    seen = {}
    for position, (row, column) in POSITIONS.items():
        x, y = int((column + 0.5) * CELL), int((row + 0.5) * CELL)
        colour = palette.get(pixels[x, y])
        if colour is not None:
            hits = [pixels[x + dx, y + dy] == COLOURS[colour] for dx, dy in PROBES]
            shape = next((shape for shape, hit in zip(PROBED_SHAPES, hits) if hit), "star")
            seen[position] = (colour, shape)
    return seen


def check_answer(scene: dict[str, tuple[str, str]], question: str, answer: str) -> None:
    """Every fact ``answer`` states holds in ``scene`` (as read from the image)."""
    things = list(scene.values())
    for sentence in re.findall(r"[^.]+\.", answer):
        sentence = sentence.strip()
        if m := re.fullmatch(r"There (?:is|are) (\w+) (object|circle|square|triangle|star)s?\.", sentence):
            count = NUMBERS.index(m[1]) if m[1] != "no" else 0
            noun = m[2]
            assert count == sum(noun in ("object", shape) for _, shape in things), (question, answer)
            assert noun == "object" or noun in question, (question, answer)
        elif m := re.fullmatch(rf"(?:(?:{PLACE}) there is|There is|Yes, there is) an? (\w+) (\w+)(?: ({PLACE}))?\.",
                               sentence, flags=re.IGNORECASE):
            place = m[3] or re.match(rf"({PLACE})", sentence, flags=re.IGNORECASE)[1].lower()
            assert scene.get(PLACES[place]) == (m[1], m[2]), (question, answer)
        elif m := re.fullmatch(rf"There is nothing ({PLACE})\.", sentence):
            assert PLACES[m[1]] not in scene and m[1] in question, (question, answer)
        elif m := re.fullmatch(r"The (\w+) is (\w+)\.", sentence):
            assert [c for c, s in things if s == m[1]] == [m[2]], (question, answer)
        elif m := re.fullmatch(rf"The (\w+) (\w+) is ({PLACE})\.", sentence):
            assert scene.get(PLACES[m[3]]) == (m[1], m[2]), (question, answer)
        elif m := re.fullmatch(r"No, there is no (\w+) (\w+)\.", sentence):
            assert (m[1], m[2]) not in things and f"{m[1]} {m[2]}" in question, (question, answer)
        else:
            pytest.fail(f"unexpected answer sentence {sentence!r} to {question!r}")


def test_answers_hold_in_the_rendered_images(world):
    specs = load_scenes(world)
    for index, record in enumerate(_records(world, WORLD_JSON)):
        with Image.open(world / IMAGE_FOLDER / record["image"]) as image:
            scene = read_scene(image)
        assert scene == {t.position: (t.colour, t.shape) for t in specs[index].things}
        assert 1 <= len(scene) <= 4
        for question, answer in _pairs(record):
            check_answer(scene, question, answer)


def test_cell_labels_name_what_each_patch_shows(world):
    """The vision tower's pretraining labels (one per 16-pixel patch of the 48-pixel input,
    row by row) are what the rendered image shows in that patch's grid cell."""
    colour_names, shape_names = [None, *COLOURS], [None, *SHAPES]
    for scene in load_scenes(world)[:20]:
        colours, shapes = cell_labels(scene)
        seen = read_scene(render(scene))
        for row in range(3):
            for column in range(3):
                place = next((name for name, cell in POSITIONS.items() if cell == (row, column)), None)
                labelled = (colour_names[colours[3 * row + column]], shape_names[shapes[3 * row + column]])
                assert labelled == seen.get(place, (None, None)), (scene, row, column)


def test_text_corpus_is_text_only_and_answers_arithmetic_right(world):
    sums = 0
    for record in _records(world, TEXT_JSON):
        assert "image" not in record
        for question, answer in _pairs(record):
            assert "<image>" not in question
            if m := re.fullmatch(r"(\w+) (plus|minus) (\w+) is (\w+)\.", answer):
                a, b, result = (NUMBERS.index(word.lower()) for word in (m[1], m[3], m[4]))
                assert result == (a + b if m[2] == "plus" else a - b)
                sums += 1
    assert sums > 0


def test_read_description_reads_back_each_thing():
    answer = "There are three objects. On the left there is an orange star. In the centre there is a blue moon."
    assert read_description(answer + " at the bottom there is a red circle.") == {
        "left": ("orange", "star"), "centre": ("blue", "moon"), "bottom": ("red", "circle")}
    assert read_description("There are two objects.") == {}


def test_held_out_scene_is_not_a_training_scene(world):
    seen = set(load_scenes(world))
    assert held_out_scene(0, seen) not in seen
    assert held_out_scene(0, seen) == held_out_scene(0, seen)


# ---------------------------------------------------------------------- tokenizer and data
def test_tokenizer_round_trips_the_corpus(world, processor):
    tokenizer = processor.tokenizer
    for name in (WORLD_JSON, TEXT_JSON):
        for record in _records(world, name):
            for turn in record["conversations"]:
                ids = tokenizer(turn["value"]).input_ids
                assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
                assert tokenizer.decode(ids, skip_special_tokens=True) == turn["value"].replace("<image>", "")


def test_world_files_are_valid_training_data(world, processor):
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    text = TextConversationDataset(world / TEXT_JSON, processor.tokenizer, max_length=256)
    images = MultimodalConversationDataset(world / WORLD_JSON, world / IMAGE_FOLDER, processor, max_length=256)
    assert (len(text), len(images)) == (TEXTS, SCENES)
    items = [dataset[i] for dataset in (text, images) for i in range(len(dataset))]
    assert not text.skipped and not images.skipped and None not in items
    for item in items[TEXTS:]:
        assert int((item["input_ids"] == image_token).sum()) == 9  # one token per grid cell
        assert item["pixel_values"].shape == (1, 3, 48, 48)


def test_processor_gives_empty_cells_nothing_but_position(processor):
    """Pixels are normalised around the background: the vision tower sees an empty cell as
    zeros (only its position embedding tells it apart) and a drawn thing as strongly non-zero;
    and the target's position embeddings start as loud as a drawn patch, not at CLIP's 0.02."""
    scene = held_out_scene(0, set())
    pixels = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"][0]
    patches = pixels.unfold(1, VISION_PATCH, VISION_PATCH).unfold(2, VISION_PATCH, VISION_PATCH)  # [3, 3, 3, 16, 16]
    for position, (row, column) in POSITIONS.items():
        strength = patches[:, row, column].abs().mean().item()
        assert (strength > 0.3) if scene.at(position) else (strength < 0.02), (position, strength)
    target = make_target(TargetRecipe(hidden=32, layers=1, vision_hidden=16, vision_layers=1), processor)
    assert vision_position_embedding(target).weight.std().item() > 0.3


# ---------------------------------------------------------------------- the stage cache
def counting_stages(calls: list[str], fail: str | None = None) -> list[Stage]:
    """Stages that write a file and record their call; ``fail`` stops halfway through."""
    def build(name):
        def run(folder: Path) -> dict:
            calls.append(name)
            (folder / "part").write_text(name)
            if name == fail:
                raise KeyboardInterrupt  # an interrupted run
            return {"name": name}
        return run
    return [Stage(name, build(name)) for name in ("a", "b", "c")]


def test_stage_cache_skips_complete_stages_and_redoes_the_rest(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_stages(tmp_path, counting_stages(calls, fail="b"), log=lambda _: None)
    assert calls == ["a", "b"] and (tmp_path / "b" / "part").exists() and not (tmp_path / "b" / MARKER).exists()

    calls.clear()
    markers = run_stages(tmp_path, counting_stages(calls), log=lambda _: None)
    assert calls == ["b", "c"]  # a was complete; b was interrupted
    assert [markers[name]["name"] for name in "abc"] == ["a", "b", "c"] and markers["a"]["seconds"] >= 0

    calls.clear()
    run_stages(tmp_path, counting_stages(calls), log=lambda _: None)
    assert calls == []

    (tmp_path / "b" / MARKER).unlink()
    run_stages(tmp_path, counting_stages(calls), log=lambda _: None)
    assert calls == ["b", "c"]  # a stage after a rebuilt one is rebuilt

    calls.clear()
    run_stages(tmp_path, counting_stages(calls), rebuild=True, log=lambda _: None)
    assert calls == ["a", "b", "c"]


TINY = DemoRecipe(scenes=8, texts=8, draft=DraftRecipe(epochs=2, batch_size=4, warmup_steps=1, samples_per_epoch=8),
                  target=TargetRecipe(hidden=32, layers=1, vision_hidden=16, vision_layers=1, vision_steps=2, epochs=1,
                                      batch_size=8, warmup_steps=1))


def test_demo_stages_build_and_skip_at_tiny_sizes(tmp_path):
    """World, processor and target (the draft stage needs the trainer: see the next test)."""
    stages = demo_stages(tmp_path, TINY, device="cpu", progress=False)[:3]
    assert [stage.name for stage in stages] == ["world", "processor", "target"]
    logs = []
    run_stages(tmp_path, stages, log=logs.append)
    assert (tmp_path / "target" / "model.safetensors").is_file()
    assert (tmp_path / "target" / "tokenizer.json").is_file()  # the processor travels with the target
    before = [(tmp_path / name / MARKER).stat().st_mtime_ns for name in ("world", "processor", "target")]
    logs.clear()
    run_stages(tmp_path, stages, log=logs.append)
    assert logs == ["[world] cached", "[processor] cached", "[target] cached"]
    assert before == [(tmp_path / name / MARKER).stat().st_mtime_ns for name in ("world", "processor", "target")]


def test_demo_end_to_end_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    """Every stage, then the show: MSD's answer is the target's own, and a second run is all cached."""
    pytest.importorskip("msd.train.trainer")
    monkeypatch.setenv("MSD_DEMO_DIR", str(tmp_path))
    args = build_parser().parse_args(["demo", "--device", "cpu", "--max-new-tokens", "12", "--seed", "2"])
    run_demo(args, TINY)
    first = capsys.readouterr().out
    assert "[draft] built in" in first and (tmp_path / "held-out" / "scene-seed-2.png").is_file()
    assert re.search(r"\nMSD: +tau \d+\.\d\d ", first), first
    assert re.search(r"\nspeedup: +\d+\.\d\dx \| outputs identical: yes", first), first
    run_demo(args, TINY)
    second = capsys.readouterr().out
    assert "built" not in second and "[draft] cached" in second and "outputs identical: yes" in second


# The demo target's held-out floor (issue 13): what a newcomer sees must be a model that reads
# its images. Measured at 46c9694: 100% of things and of scenes on transformers 5.24 and 4.56
# (target stage 268 s on two cores).
THINGS_FLOOR, EXACT_FLOOR = 0.90, 0.60


def test_demo_target_reads_held_out_scenes(tmp_path):
    """The demo's own recipe, trained fresh: its saved target describes held-out scenes (never
    in the training world) right, scored from the saved folder as the demo loads it."""
    markers = run_stages(tmp_path, demo_stages(tmp_path, DemoRecipe(), device="cpu", progress=False)[:3],
                         log=lambda _: None)
    processor = AutoProcessor.from_pretrained(tmp_path / "target")
    target = LlavaForConditionalGeneration.from_pretrained(tmp_path / "target").eval()
    score = score_descriptions(target, processor, tmp_path / "world", DemoRecipe().scored_scenes)
    assert score.to_json() == markers["target"]["held_out"]  # what the demo prints
    assert score.things >= THINGS_FLOOR and score.exact >= EXACT_FLOOR, score.summary()


# ---------------------------------------------------------------------- command line
def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--device", "--rebuild", "--seed", "--question", "--max-new-tokens", "MSD_DEMO_DIR"):
        assert option in out
