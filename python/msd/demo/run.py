"""``msd demo``: build the small world and its models once, then show MSD at work.

Stages, each in its own folder of the cache (``$MSD_DEMO_DIR``, default
``~/.cache/msd/demo/<DEMO_VERSION>``): ``world`` (images and conversations), ``processor``
(tokenizer trained on the world), ``target`` (tiny LLaVA trained on the world) and ``draft``
(MSD draft trained by :func:`msd.train.trainer.train` in two stages). A stage is complete
when its ``complete.json`` exists; that file is written last, so a run stopped midway
redoes only the unfinished stage (and the ones after it, which depend on it).

Then one held-out scene (never in the training data) is drawn from ``--seed``, and the
question about it is answered twice: streamed by ``SpeculativeLLaVA``, then by the target's
own greedy ``generate``; tau, the speeds and whether the two answers are identical follow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, TextStreamer
from transformers.utils import logging as transformers_logging

from msd.demo.evaluate import DescriptionScore, score_descriptions
from msd.demo.target import MAX_LENGTH, TargetRecipe, train_target
from msd.demo.tokenizer import build_processor
from msd.demo.world import (
    DEFAULT_QUESTION,
    IMAGE_FOLDER,
    TEXT_JSON,
    WORLD_JSON,
    build_world,
    describe,
    held_out_scene,
    load_scenes,
    render,
)
from msd.engine import SpeculativeLLaVA
from msd.errors import UserError
from msd.prompts import encode_prompt

DEMO_VERSION = "v3"  # bump when a recipe changes, so that old caches are not reused
MARKER = "complete.json"
# A small tree: the tiny target verifies any tree in about the same time, so the draft's
# per-step cost (top_k and depth) decides the speed; measured best on two CPU cores.
TREE = {"top_k": 4, "depth": 4, "total_tokens": 16}


@dataclass
class DraftRecipe:
    """How the draft trains (:class:`msd.train.config.TrainConfig` fields)."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    samples_per_epoch: int = 3000


@dataclass
class DemoRecipe:
    """Everything the first run builds, sized to train in minutes on two CPU cores."""

    scenes: int = 5000
    texts: int = 1500
    vocab_size: int = 1024
    target: TargetRecipe = field(default_factory=TargetRecipe)
    draft: DraftRecipe = field(default_factory=DraftRecipe)
    seed: int = 0
    scored_scenes: int = 30  # held-out scenes the built target is scored on (shown by the demo)


@dataclass
class Stage:
    """A cached build step: ``build(folder)`` fills ``folder`` and may return facts (JSON)
    that later steps read back from the stage's marker."""

    name: str
    build: Callable[[Path], dict | None]


def cache_dir() -> Path:
    """``$MSD_DEMO_DIR``, else ``~/.cache/msd/demo/<DEMO_VERSION>``."""
    if os.environ.get("MSD_DEMO_DIR"):
        return Path(os.environ["MSD_DEMO_DIR"])
    return Path.home() / ".cache" / "msd" / "demo" / DEMO_VERSION


def run_stages(root: Path, stages: list[Stage], rebuild: bool = False, log=print) -> dict[str, dict]:
    """Build the stages not complete in ``root`` (all of them with ``rebuild``), in order.

    A stage whose folder lacks the marker is wiped and built again, and so is every stage
    after a rebuilt one. Returns each stage's marker content: what its ``build`` returned
    plus ``seconds`` (the build time).
    """
    markers = {}
    stale = rebuild
    for stage in stages:
        folder = root / stage.name
        marker = folder / MARKER
        if stale or not marker.is_file():
            stale = True
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            log(f"[{stage.name}] building")
            started = time.perf_counter()
            facts = dict(stage.build(folder) or {}, seconds=round(time.perf_counter() - started, 1))
            partial = marker.with_suffix(".tmp")
            partial.write_text(json.dumps(facts), encoding="utf-8")
            partial.replace(marker)  # atomic: the marker is there complete or not at all
            log(f"[{stage.name}] built in {facts['seconds']:.0f} s")
        else:
            log(f"[{stage.name}] cached")
        markers[stage.name] = json.loads(marker.read_text(encoding="utf-8"))
    return markers


def demo_stages(root: Path, recipe: DemoRecipe, device: torch.device, progress: bool = True) -> list[Stage]:
    """The four stages of the demo's cache ``root``: world, processor, target, draft."""
    world = root / "world"

    def build_processor_stage(folder: Path) -> None:
        build_processor(world, folder, recipe.vocab_size)

    def build_target(folder: Path) -> dict:
        processor = AutoProcessor.from_pretrained(root / "processor")
        target = train_target(world, processor, folder, recipe.target, seed=recipe.seed, device=device,
                              progress=progress)
        return {"held_out": score_descriptions(target, processor, world, recipe.scored_scenes).to_json()}

    def build_draft(folder: Path) -> dict:
        # The trainer is only needed on a first run.
        from msd.train.config import TrainConfig
        from msd.train.trainer import train

        draft = recipe.draft
        final = train(TrainConfig(
            target=str(root / "target"), output_dir=str(folder), text_data=str(world / TEXT_JSON),
            multimodal_data=str(world / WORLD_JSON), image_folder=str(world / IMAGE_FOLDER), epochs=draft.epochs,
            batch_size=draft.batch_size, lr=draft.lr, warmup_steps=draft.warmup_steps, max_length=MAX_LENGTH,
            samples_per_epoch=draft.samples_per_epoch, seed=recipe.seed, device=str(device), progress=progress))
        return {"draft": str(Path(final).resolve().relative_to(root.resolve()))}

    return [
        Stage("world", lambda folder: build_world(folder, recipe.scenes, recipe.texts, recipe.seed, progress)),
        Stage("processor", build_processor_stage),
        Stage("target", build_target),
        Stage("draft", build_draft),
    ]


# ---------------------------------------------------------------------- the show
def run_demo(args: argparse.Namespace, recipe: DemoRecipe | None = None) -> None:
    """``msd demo``: build what is missing (by ``recipe``, default :class:`DemoRecipe`), then
    answer the question about a held-out scene with MSD (streamed) and with the target alone,
    and compare."""
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this torch has no CUDA device")
    transformers_logging.set_verbosity_error()  # keep the show readable (e.g. the torchvision notice) ...
    transformers_logging.disable_progress_bar()  # ... and without weight-loading bars
    root = cache_dir()
    print(f"msd demo: cache {root}")
    markers = run_stages(root, demo_stages(root, recipe or DemoRecipe(), args.device), rebuild=args.rebuild)

    processor = AutoProcessor.from_pretrained(root / "target")
    target = LlavaForConditionalGeneration.from_pretrained(root / "target").to(args.device)
    engine = SpeculativeLLaVA.from_pretrained(target, root / markers["draft"]["draft"], **TREE)
    scene = held_out_scene(args.seed, set(load_scenes(root / "world")))
    image_path = root / "held-out" / f"scene-seed-{args.seed}.png"
    image_path.parent.mkdir(exist_ok=True)
    image = render(scene)
    image.save(image_path)
    inputs = encode_prompt(processor, args.question, [image]).to(args.device)
    options = {"do_sample": False, "max_new_tokens": args.max_new_tokens}

    # One untimed pass each: first calls pay for one-time set-up (kernel loading, allocations).
    engine.generate(**inputs, **options)
    target.generate(**inputs, **options)

    print(f"\nscores:   {DescriptionScore(**markers['target']['held_out']).summary()}")
    print(f"image:    {image_path}")
    if args.question == DEFAULT_QUESTION:
        print(f"truth:    {describe(scene)}")
    print(f"question: {args.question}")
    print("answer:  ", end="", flush=True)  # the answer's first token brings its own space
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    msd_output = engine.generate(**inputs, streamer=streamer, **options)
    stats = engine.last_stats

    _synchronize(args.device)
    started = time.perf_counter()
    target_output = target.generate(**inputs, **options)
    _synchronize(args.device)
    target_seconds = time.perf_counter() - started
    target_speed = (target_output.shape[1] - inputs["input_ids"].shape[1]) / target_seconds

    print(f"MSD:      tau {stats.tau:.2f} tokens per target forward | {stats.new_tokens} tokens in "
          f"{stats.seconds:.3f} s | {stats.tokens_per_second:.0f} tokens/s")
    print(f"target:   {target_output.shape[1] - inputs['input_ids'].shape[1]} tokens in {target_seconds:.3f} s "
          f"| {target_speed:.0f} tokens/s (its own greedy generate)")
    identical = torch.equal(msd_output, target_output)
    print(f"speedup:  {stats.tokens_per_second / target_speed:.2f}x | outputs identical: "
          f"{'yes' if identical else 'NO'} | device: {args.device}")
    if not identical:
        raise UserError("MSD's output differs from the target's greedy generate")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
