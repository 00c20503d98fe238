"""The ``msd`` command line.

``msd generate`` answers one prompt about zero or more images with ``SpeculativeLLaVA``,
streaming the answer to stdout and the speed statistics to stderr. ``msd features``
pre-computes the target features of the training data; ``msd train`` trains a draft. Each subcommand is an
``add_<name>_command(subcommands)`` function that declares its options and sets ``run``
(a function of the parsed arguments); register new ones in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

from msd.demo.world import DEFAULT_QUESTION
from msd.engine import SpeculativeLLaVA
from msd.errors import UserError
from msd.prompts import encode_prompt
from msd.train.capture import write_features
from msd.train.config import TrainConfig
from msd.train.trainer import train

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------- argument types
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)  # argparse turns the ValueError into "invalid parse value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def temperature(text: str) -> float:
    """An argparse type: a temperature >= 0 (0 means greedy decoding)."""
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a nucleus mass in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device(text: str) -> torch.device:
    """An argparse type: a torch device string such as ``cpu``, ``cuda`` or ``cuda:1``."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None


# ---------------------------------------------------------------------- msd generate
def add_generate_command(subcommands) -> None:
    """Declare ``msd generate``."""
    parser = subcommands.add_parser(
        "generate", help="answer a prompt about images with speculative decoding",
        description="Answer PROMPT about the given images with MSD speculative decoding: the answer "
                    "streams to stdout, then the mean accepted length tau and the speed go to stderr.",
    )
    parser.set_defaults(run=run_generate)
    models = parser.add_argument_group("models")
    models.add_argument("--target", required=True, metavar="PATH_OR_ID",
                        help="LLaVA / LLaVA-NeXT target: local folder or Hugging Face Hub id; its processor "
                             "(tokenizer, image processor, chat template) is loaded from the same place")
    models.add_argument("--draft", required=True, metavar="PATH_OR_ID",
                        help="MSD draft checkpoint matching the target: local folder or Hub id")
    models.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype of both models (default: auto, the checkpoint's own)")
    models.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda when available, else cpu)")

    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                        help="image file (any format Pillow reads); repeat for several images, in order, "
                             "or leave out for a text-only prompt")
    prompt.add_argument("--prompt", required=True, metavar="TEXT",
                        help="the user's question; wrapped in the processor's chat template, or in "
                             "'USER: <image>\\n... ASSISTANT:' when the processor has none")

    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max-new-tokens", type=int_at_least(1), default=256, metavar="N",
                          help="most tokens to generate (default: 256); generation also stops at end of sequence")
    sampling.add_argument("--temperature", type=temperature, default=0.0, metavar="T",
                          help="sampling temperature; 0 decodes greedily (default: 0)")
    sampling.add_argument("--top-k", type=int_at_least(1), metavar="K",
                          help="sample only among the K likeliest tokens (needs --temperature > 0)")
    sampling.add_argument("--top-p", type=probability, metavar="P",
                          help="sample only within the smallest token set of mass P (needs --temperature > 0)")
    sampling.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling")

    tree = parser.add_argument_group("draft tree")
    tree.add_argument("--tree-top-k", type=int_at_least(1), default=10, metavar="K",
                      help="children per node and frontier width of the draft tree (default: 10)")
    tree.add_argument("--depth", type=int_at_least(1), default=5, metavar="D",
                      help="draft expansion steps per decoding step (default: 5)")
    tree.add_argument("--total-tokens", type=int_at_least(2), default=60, metavar="N",
                      help="tree tokens the target verifies per step, root included (default: 60)")


def run_generate(args: argparse.Namespace) -> None:
    """Load the models, stream the answer to stdout and print the statistics line to stderr."""
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--top-k and --top-p shape sampling: give them with --temperature > 0")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this torch has no CUDA device")
    images = [open_image(path) for path in args.image]  # before the slow model loading

    try:
        processor = AutoProcessor.from_pretrained(args.target)
    except (OSError, ValueError) as exc:  # no such folder, or not a Hub id
        raise UserError(f"cannot load the target's processor from {args.target}: {exc}") from None
    if not hasattr(processor, "image_processor"):
        raise UserError(f"{args.target} ships no image processor (expected a LLaVA processor)")
    # Loaded, then moved: device_map would need accelerate, which msd does not depend on.
    target = AutoModelForImageTextToText.from_pretrained(args.target, dtype=DTYPES[args.dtype]).to(args.device)
    engine = SpeculativeLLaVA.from_pretrained(target, args.draft, top_k=args.tree_top_k, depth=args.depth,
                                              total_tokens=args.total_tokens)
    inputs = encode_prompt(processor, args.prompt, images).to(args.device, dtype=engine.target.dtype)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    engine.generate(**inputs, streamer=streamer, **generation_options(args))
    stats = engine.last_stats
    print(f"tau {stats.tau:.2f} | {stats.new_tokens} tokens in {stats.seconds:.2f} s | "
          f"{stats.tokens_per_second:.1f} tokens/s", file=sys.stderr)


def open_image(path: Path):
    """The image at ``path`` as RGB, or a ``UserError`` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:  # missing, unreadable, or not an image (UnidentifiedImageError)
        raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from None


def generation_options(args: argparse.Namespace) -> dict:
    """``generate`` keyword arguments from the command line (sampling options only when sampling)."""
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if options["do_sample"]:
        options["temperature"] = args.temperature
        options |= {name: getattr(args, name) for name in ("top_k", "top_p") if getattr(args, name) is not None}
    return options


# ---------------------------------------------------------------------- msd train / msd features
CONFIG_FIELDS = {config_field.name: config_field for config_field in dataclasses.fields(TrainConfig)}
# Data and model options msd features shares with msd train.
FEATURES_OPTIONS = ("target", "text_data", "multimodal_data", "image_folder", "processor", "max_length", "device",
                    "bf16", "draft_kind", "feature_layers")


def add_config_option(parser: argparse.ArgumentParser, name: str, help: str | None = None) -> None:
    """``--name-with-dashes`` for the :class:`TrainConfig` field ``name``: its type, default and
    help text (``help`` replaces the latter); bools get ``--x / --no-x``."""
    config_field = CONFIG_FIELDS[name]
    annotation = typing.get_type_hints(TrainConfig)[name]
    # int for ``int | None``: the non-None member of an optional.
    kind = next((member for member in typing.get_args(annotation) if member is not type(None)), annotation)
    options = {"help": help or config_field.metadata["help"], "dest": name}
    if config_field.default is dataclasses.MISSING:
        options["required"] = True
    else:
        options["default"] = config_field.default
        if config_field.default is not None and kind is not bool:  # argparse adds bools' default itself
            options["help"] += f" (default: {config_field.default})"
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options |= {"type": kind, "metavar": name.upper()}
    parser.add_argument("--" + name.replace("_", "-"), **options)


def log_to_stderr() -> None:
    """Show the training modules' INFO logs (progress notes, skipped records)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_train_command(subcommands) -> None:
    """Declare ``msd train``: one option per :class:`TrainConfig` field, with its help text."""
    parser = subcommands.add_parser(
        "train", help="train an MSD draft on a LLaVA or Qwen2-VL target",
        description="Train an MSD draft head (MSD_SPEC.md 4) on the frozen TARGET: text data, multimodal data "
                    "mixed by the curriculum r(e), or pre-computed features (msd features). Checkpoints go to "
                    "OUTPUT_DIR/step-XXXXXX and OUTPUT_DIR/epoch-XX (released draft layout + trainer_state.pt), "
                    "metrics to OUTPUT_DIR/metrics.csv. Data parallel: torchrun --nproc_per_node N -m msd.train "
                    "OPTIONS.",
    )
    parser.set_defaults(run=run_train)
    for name in CONFIG_FIELDS:
        add_config_option(parser, name)


def run_train(args: argparse.Namespace) -> None:
    """Train with the options as a :class:`TrainConfig`; prints the final draft folder."""
    log_to_stderr()
    print(train(TrainConfig(**{name: getattr(args, name) for name in CONFIG_FIELDS})))


def add_features_command(subcommands) -> None:
    """Declare ``msd features``."""
    parser = subcommands.add_parser(
        "features", help="pre-compute the target features of the training data",
        description="Run the frozen TARGET over the training data once and store its features in safetensors "
                    "shards under OUTPUT_DIR/text and OUTPUT_DIR/multimodal, for msd train --features-dir. "
                    "Skipped records are logged and left out. Rerunning continues after the last complete "
                    "shard.",
    )
    parser.set_defaults(run=run_features)
    add_config_option(parser, "output_dir", help="folder for the feature shards")
    for name in FEATURES_OPTIONS:
        add_config_option(parser, name)
    parser.add_argument("--shard-size", type=int_at_least(1), default=256, metavar="N",
                        help="samples per shard file (default: 256)")


def run_features(args: argparse.Namespace) -> None:
    """Write the shards; prints the samples stored per stage."""
    log_to_stderr()
    options = {name: getattr(args, name) for name in FEATURES_OPTIONS}
    for kind, samples in write_features(output_dir=args.output_dir, shard_size=args.shard_size, **options).items():
        print(f"{kind}: {samples} samples")


# ---------------------------------------------------------------------- msd demo
def add_demo_command(subcommands) -> None:
    """Declare ``msd demo``."""
    parser = subcommands.add_parser(
        "demo", help="train a tiny LLaVA and its MSD draft on a generated world, then show MSD at work",
        description="The first run builds a small image-language world, trains a tokenizer, a tiny LLaVA "
                    "target and its MSD draft on it (minutes on a CPU) and caches them in $MSD_DEMO_DIR "
                    "(default ~/.cache/msd/demo/<version>). Then a scene the models never saw is answered "
                    "by MSD (streamed) and by the target alone: tau, both speeds and whether the two "
                    "answers are identical are printed.",
    )
    parser.set_defaults(run=run_demo)
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to train and run on (default: cuda when available, else cpu)")
    parser.add_argument("--rebuild", action="store_true", help="build and train everything again")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="which held-out scene to show (default: 0)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, metavar="TEXT",
                        help="the question about the scene (default: 'Describe the image.'; also e.g. "
                             "'How many circles are there?', 'What is on the left?', 'Where is the red star?')")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=96, metavar="N",
                        help="most tokens to generate (default: 96)")


def run_demo(args: argparse.Namespace) -> None:
    """Run ``msd demo`` (:mod:`msd.demo.run`, imported here: only the demo needs it)."""
    from msd.demo.run import run_demo as demo

    demo(args)


# ---------------------------------------------------------------------- entry point
COMMANDS = (add_generate_command, add_features_command, add_train_command, add_demo_command)


def build_parser() -> argparse.ArgumentParser:
    """The ``msd`` parser with every subcommand of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="msd", description="Multimodal Speculative Decoding for LLaVA models.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``msd`` with ``argv`` (default: the process arguments); returns the exit status.

    Bad option values exit with status 2 (argparse); user errors found later (unreadable
    files, settings the models reject) print one line and return 1.
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, OSError, ValueError, NotImplementedError) as exc:
        print(f"msd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
