"""MSD's two design principles, measured on the demo world (MSD_SPEC.md section 1).

(a) decoupled vs fused visual inputs: the MSD draft (visual positions take the raw visual
    embedding) against the coupled EAGLE-style draft (``decouple_visual=False``: visual
    positions get ``fc(concat(visual embedding, feature))`` like text), both trained in
    two stages;
(b) two-stage training (text only, then more and more image conversations: the curriculum)
    against multimodal-only and text-only training of the decoupled draft, with the same
    number of training samples.

The world, tokenizer and target are the demo's own (:mod:`msd.demo.run`, the default
:class:`DemoRecipe`: a target that reads its images), cached in ``--root`` like the demo's
stages (``--root`` may be the demo's cache), and so is each trained draft. Every
variant trains with several seeds; tau (greedy, pooled over held-out multimodal prompts,
:mod:`msd.demo.evaluate`) is reported as mean +- std over the seeds, next to an untrained
draft's. Each MSD output is checked against the target's own greedy ``generate``.
Results: ``--out`` (JSON) and the same name with ``.md`` (a markdown table, also printed).

    PYTHONPATH=.:python python3 benchmarks/ablation.py --seeds 0 1 --out benchmarks/results/ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging as transformers_logging

from msd.demo.evaluate import DescriptionScore, greedy_tau, held_out_prompts
from msd.demo.run import TREE, DemoRecipe, Stage, demo_stages, run_stages
from msd.demo.target import MAX_LENGTH
from msd.demo.world import IMAGE_FOLDER, TEXT_JSON, WORLD_JSON
from msd.draft_checkpoint import load_draft
from msd.engine import SpeculativeLLaVA
from msd.testing import random_draft
from msd.train.config import TrainConfig
from msd.train.trainer import train

# The demo's recipe: a smaller target trained for fewer steps does not yet read shapes, and
# then the draft's visual inputs cannot matter.
RECIPE = DemoRecipe()
# Variant name -> (text data, multimodal data, decoupled visual inputs).
VARIANTS = {
    "two-stage, decoupled (MSD)": (True, True, True),
    "two-stage, fused": (True, True, False),
    "multimodal only, decoupled": (False, True, True),
    "text only, decoupled": (True, False, True),
}
UNTRAINED = "untrained (random draft)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "msd" / "ablation",
                        help="cache of the world, target and drafts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draft training seeds")
    parser.add_argument("--epochs", type=int, default=4, help="draft epochs (the curriculum spans them)")
    parser.add_argument("--samples-per-epoch", type=int, default=480, help="draft training samples per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=24, help="held-out multimodal prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.json"))
    return parser.parse_args()


def draft_stage(root: Path, args: argparse.Namespace, variant: str, seed: int) -> Stage:
    """The cached training of one variant with one seed; its marker names the final draft."""
    text, multimodal, decoupled = VARIANTS[variant]
    world = root / "world"

    def build(folder: Path) -> dict:
        final = train(TrainConfig(
            target=str(root / "target"), output_dir=str(folder), text_data=str(world / TEXT_JSON) if text else None,
            multimodal_data=str(world / WORLD_JSON) if multimodal else None, image_folder=str(world / IMAGE_FOLDER),
            decouple_visual=decoupled, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
            max_length=MAX_LENGTH, samples_per_epoch=args.samples_per_epoch, seed=seed, device="cpu",
            progress=False))
        return {"draft": str(final)}

    slug = variant.split(" (")[0].replace(", ", "-").replace(" ", "-")
    name = f"drafts-e{args.epochs}-n{args.samples_per_epoch}-b{args.batch_size}-lr{args.lr}/{slug}-seed{seed}"
    return Stage(name, build)


def main() -> None:
    args = parse_args()
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    markers = run_stages(args.root, demo_stages(args.root, RECIPE, torch.device("cpu"), progress=False)[:3])
    held_out = DescriptionScore(**markers["target"]["held_out"])  # how well the target reads its images
    print(f"target: {held_out.summary()}", flush=True)
    processor = AutoProcessor.from_pretrained(args.root / "target")
    target = LlavaForConditionalGeneration.from_pretrained(args.root / "target").eval()
    prompts = held_out_prompts(args.root / "world", processor, args.prompts)
    options = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    with torch.no_grad():
        reference = [target.generate(**inputs, **options) for inputs in prompts]

    def score(draft) -> float:
        tau, outputs = greedy_tau(SpeculativeLLaVA(target, draft, **TREE), prompts, args.max_new_tokens)
        if not all(torch.equal(a, b) for a, b in zip(outputs, reference)):
            raise SystemExit("MSD's output differs from the target's greedy generate")
        return tau

    taus = {UNTRAINED: [score(random_draft(target, seed)) for seed in args.seeds]}
    for variant in VARIANTS:
        taus[variant] = []
        for seed in args.seeds:
            marker = run_stages(args.root, [draft_stage(args.root, args, variant, seed)]).popitem()[1]
            taus[variant].append(score(load_draft(marker["draft"], target)))
            print(f"{variant}, seed {seed}: tau {taus[variant][-1]:.3f}", flush=True)

    rows = {name: {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "taus": values} for name, values in taus.items()}
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    result = {"settings": settings | {"tree": TREE, "recipe": repr(RECIPE)}, "target_held_out": held_out.to_json(),
              "tau": rows,
              "seconds": round(time.perf_counter() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = [f"| draft ({len(args.seeds)} seeds, {args.prompts} held-out image prompts) | tau mean +- std |",
             "|---|---|"]
    table += [f"| {name} | {row['mean']:.2f} +- {row['std']:.2f} |" for name, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
